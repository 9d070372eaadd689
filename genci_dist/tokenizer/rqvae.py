"""RQ-VAE (paper §2.2.1, Eq. 3; TIGER's tokenizer): MLP encoder → N-level residual quantiser
→ MLP decoder, trained on the item text embeddings.

Own code rather than vector-quantize-pytorch's ResidualVQ: that library is not installed (the
project pins its stack and installs nothing extra), and what we need is small — exact Eq. 3
argmin codes, k-means initialisation on the encoded residuals of *all* items (they are few),
EMA or straight-through updates, dead-code reset from batch residuals, and bit-for-bit seeded
determinism — all of which are tested against a direct float64 computation of Eq. 3.

Scale path (`train_sample` / `train_steps` / `kmeans_sample` > 0): training, normalisation and
k-means see only a fixed seeded sample of the items and run a fixed number of steps, so the
cost no longer grows with the catalogue; `assign_codes` then gives every item its codes in
batches (memory O(batch), rows read from a memory map or the .npy file). With all three at 0
the original full-data path runs unchanged (same ids as before for the same seed).

Shapes: x [B, D_in] embeddings, z [B, D] latents, codebooks [N, K, D], codes [B, N].
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from genci_dist.tokenizer.config import TokenizerConfig
from genci_dist.tokenizer.embed import drop_pages, take_rows

_DIST_CHUNK = 2048


def squared_distances(r: Tensor, codebook: Tensor) -> Tensor:
    """||r_b - c_k||^2 computed from the differences (no ||r||^2 - 2 r.c + ||c||^2 expansion,
    whose cancellation can flip a near-tie argmin). r [B, D], codebook [K, D] → [B, K]."""
    return (r.unsqueeze(1) - codebook.unsqueeze(0)).pow(2).sum(-1)


def nearest_code(r: Tensor, codebook: Tensor, exact: bool = True) -> Tensor:
    """argmin_k ||r_b - c_k||^2 (ties → lowest k), chunked over B. → LongTensor [B].
    exact=False uses the matmul expansion (several times faster; near-ties may differ) — for
    training steps only; the semantic IDs themselves always come from the exact form."""
    if not exact:
        return (codebook.pow(2).sum(1) - 2 * r @ codebook.T).argmin(1)
    out = [squared_distances(chunk, codebook).argmin(1) for chunk in r.split(_DIST_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def residual_quantize(x: Tensor, codebooks: Tensor, sizes: Sequence[int] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 3: z_n = argmin_k ||r_n - c^n_k||^2, r_{n+1} = r_n - c^n_{z_n}, r_1 = x, with k
    over the first sizes[n] codes of level n (all K when sizes is None).

    Returns codes [B, N] (long), quantized = sum_n c^n_{z_n} [B, D] and the residuals
    r_1..r_N entering each level [B, N, D]."""
    r = x
    codes, residuals = [], []
    quantized = torch.zeros_like(x)
    for n in range(codebooks.shape[0]):
        cb = codebooks[n] if sizes is None else codebooks[n, :sizes[n]]
        z = nearest_code(r, cb)
        q = cb[z]
        codes.append(z)
        residuals.append(r)
        quantized = quantized + q
        r = r - q
    return torch.stack(codes, 1), quantized, torch.stack(residuals, 1)


def kmeans(points: Tensor, k: int, seed: int, iters: int) -> Tensor:
    """k centres [k, D] for points [M, D] (scikit-learn k-means++ / Lloyd, seeded). With fewer
    distinct points than k, the missing centres are jittered copies of points."""
    from sklearn.cluster import KMeans

    pts = points.detach().double().numpy()
    n_unique = len(np.unique(pts, axis=0))
    if n_unique >= k:
        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(pts)
        centres = km.cluster_centers_
    else:
        rng = np.random.default_rng(seed)
        base = np.unique(pts, axis=0)
        extra = base[rng.integers(0, len(base), k - len(base))]
        scale = 1e-3 * (pts.std() + 1e-12)
        centres = np.concatenate([base, extra + rng.normal(0, scale, extra.shape)])
    return torch.from_numpy(centres).to(points.dtype)


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ResidualQuantizer(nn.Module):
    """N codebooks of K codes of dimension D, trained by EMA or straight-through. With
    `sizes`, level n uses only its first sizes[n] codes (the rest are never chosen, updated or
    reset: TokenizerConfig.codebook_sizes)."""

    def __init__(self, levels: int, codebook_size: int, dim: int, *, beta: float = 0.25,
                 mode: str = "ema", ema_decay: float = 0.95,
                 sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        if mode not in ("ema", "ste"):
            raise ValueError(f"quantizer mode must be 'ema' or 'ste', got {mode!r}")
        self.sizes = list(sizes) if sizes is not None else [codebook_size] * levels
        if len(self.sizes) != levels or not all(1 <= k <= codebook_size for k in self.sizes):
            raise ValueError(f"sizes must give one size in [1, {codebook_size}] per level "
                             f"({levels}), got {self.sizes}")
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.beta, self.mode, self.ema_decay = beta, mode, ema_decay
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, dim) / math.sqrt(dim),
                                      requires_grad=(mode == "ste"))
        self.register_buffer("ema_count", torch.ones(levels, codebook_size))
        self.register_buffer("ema_sum", self.codebooks.detach().clone())
        self.register_buffer("steps_unused", torch.zeros(levels, codebook_size, dtype=torch.long))

    @torch.no_grad()
    def init_kmeans(self, z: Tensor, seed: int, iters: int) -> None:
        """Codebook n ← k-means of the level-n residuals of all latents z [M, D]."""
        r = z.detach()
        for n in range(self.levels):
            centres = kmeans(r, self.sizes[n], seed + n, iters).to(r.dtype)
            self.codebooks.data[n, :self.sizes[n]] = centres
            r = r - centres[nearest_code(r, centres)]
        self.ema_sum.copy_(self.codebooks.data)
        self.ema_count.fill_(1.0)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z [B, D] → (z_q [B, D] straight-through, codes [B, N], vq loss scalar,
        residuals [B, N, D] detached). EMA statistics are updated in training mode."""
        r = z
        z_hat = torch.zeros_like(z)
        loss = z.new_zeros(())
        codes, residuals = [], []
        for n in range(self.levels):
            cb = self.codebooks[n, :self.sizes[n]]
            idx = nearest_code(r.detach(), cb.detach(), exact=not self.training)
            q = cb[idx]
            if self.mode == "ste":
                loss = loss + (q - r.detach()).pow(2).mean() + self.beta * (r - q.detach()).pow(2).mean()
            else:
                loss = loss + self.beta * (r - q.detach()).pow(2).mean()
                if self.training:
                    self._ema_update(n, r.detach(), idx)
            codes.append(idx)
            residuals.append(r.detach())
            z_hat = z_hat + q.detach()
            r = r - q.detach()
        z_q = z + (z_hat - z).detach()
        return z_q, torch.stack(codes, 1), loss, torch.stack(residuals, 1)

    @torch.no_grad()
    def _ema_update(self, n: int, r: Tensor, idx: Tensor) -> None:
        k, d = self.sizes[n], self.ema_decay
        counts = torch.bincount(idx, minlength=k).to(r.dtype)
        sums = torch.zeros(k, r.shape[1], dtype=r.dtype).index_add_(0, idx, r)
        ema_count, ema_sum = self.ema_count[n, :k], self.ema_sum[n, :k]
        ema_count.mul_(d).add_(counts, alpha=1 - d)
        ema_sum.mul_(d).add_(sums, alpha=1 - d)
        total = ema_count.sum()
        eps = 1e-5
        smoothed = (ema_count + eps) / (total + k * eps) * total
        self.codebooks.data[n, :k] = ema_sum / smoothed.unsqueeze(1)

    @torch.no_grad()
    def reset_dead_codes(self, codes: Tensor, residuals: Tensor, threshold: int,
                         generator: torch.Generator, allow_reset: bool) -> int:
        """Counts steps since each code was chosen (codes [B, N] of this step); codes idle for
        >= threshold steps get a random residual of this batch (residuals [B, N, D]).
        Returns how many codes were reset."""
        n_reset = 0
        b = codes.shape[0]
        for n in range(self.levels):
            k = self.sizes[n]
            used = torch.bincount(codes[:, n], minlength=k) > 0
            self.steps_unused[n, :k] += 1
            self.steps_unused[n, :k][used] = 0
            if not allow_reset or threshold <= 0:
                continue
            dead = (self.steps_unused[n, :k] >= threshold).nonzero().squeeze(1)
            if dead.numel() == 0:
                continue
            if dead.numel() <= b:
                pick = torch.randperm(b, generator=generator)[: dead.numel()]
            else:
                pick = torch.randint(0, b, (dead.numel(),), generator=generator)
            new = residuals[pick, n]
            self.codebooks.data[n, dead] = new
            self.ema_sum[n, dead] = new
            self.ema_count[n, dead] = 1.0
            self.steps_unused[n, dead] = 0
            n_reset += dead.numel()
        return n_reset


class RQVAE(nn.Module):
    """Embedding x [B, D_in] → encoder → z [B, D] → residual quantiser → decoder → x̂."""

    def __init__(self, in_dim: int, cfg: TokenizerConfig) -> None:
        super().__init__()
        dims = [in_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = _mlp(dims, cfg.dropout)
        self.decoder = _mlp(dims[::-1], cfg.dropout)
        self.quantizer = ResidualQuantizer(cfg.levels, cfg.codebook_size, cfg.latent_dim,
                                           beta=cfg.beta, mode=cfg.quantizer,
                                           ema_decay=cfg.ema_decay, sizes=cfg.level_sizes)
        # Inputs are standardised (sentence embeddings are unit vectors with tiny coordinates).
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_scale", torch.ones(()))

    @torch.no_grad()
    def fit_normalisation(self, x: Tensor) -> None:
        self.x_mean.copy_(x.mean(0))
        self.x_scale.copy_((x - self.x_mean).pow(2).mean().sqrt().clamp_min(1e-12))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder((x - self.x_mean) / self.x_scale)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q) * self.x_scale + self.x_mean

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """→ (x̂ [B, D_in], codes [B, N], recon loss, vq loss, residuals [B, N, D]); the recon
        loss is measured in standardised units."""
        z_q, codes, vq_loss, residuals = self.quantizer(self.encode(x))
        x_hat = self.decode(z_q)
        recon = ((x_hat - x) / self.x_scale).pow(2).mean()
        return x_hat, codes, recon, vq_loss, residuals

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic inference: codes [M, N] (Eq. 3 on the encoded x) and x̂ [M, D_in]."""
        was = self.training
        self.eval()
        codes, quantized, _ = residual_quantize(self.encode(x), self.quantizer.codebooks.detach(),
                                                self.quantizer.sizes)
        x_hat = self.decode(quantized)
        self.train(was)
        return codes, x_hat


@dataclass
class TrainStats:
    steps: int
    codes_reset: int
    final_loss: float
    final_recon: float


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: Tensor,
                cfg: TokenizerConfig, gen: torch.Generator, allow_reset: bool
                ) -> tuple[int, float, float]:
    """One optimizer step on batch xb, then dead-code resets → (resets, loss, recon loss)."""
    _, codes, recon, vq, residuals = model(xb)
    loss = recon + vq
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    resets = model.quantizer.reset_dead_codes(codes, residuals, cfg.dead_code_threshold, gen,
                                              allow_reset=allow_reset)
    return resets, loss.item(), recon.item()


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    # Near-equal batches: a tiny last batch would make the EMA statistics jumpy.
    perm = torch.randperm(n, generator=gen)
    yield from perm.tensor_split(max(1, math.ceil(n / batch_size)))


def train_rqvae(embeddings: np.ndarray, cfg: TokenizerConfig,
                progress: bool = False) -> tuple[RQVAE, TrainStats]:
    """Trains an RQ-VAE on embeddings [M, D_in]; same inputs + seed → identical weights
    (for a given thread count)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # free here: every op used has a CPU fast path
    try:
        return _train(embeddings, cfg, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of min(k, n) rows out of n (k = 0 → all rows)."""
    if k <= 0 or k >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5A4D])
    return np.sort(rng.choice(n, size=k, replace=False))


def _train(embeddings: np.ndarray, cfg: TokenizerConfig,
           progress: bool) -> tuple[RQVAE, TrainStats]:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_sample > 0 or cfg.train_steps > 0 or cfg.kmeans_sample > 0:
        return _train_sampled(embeddings, cfg, progress, gen)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    model = RQVAE(x.shape[1], cfg)
    model.fit_normalisation(x)
    if cfg.kmeans_init:
        with torch.no_grad():
            model.quantizer.init_kmeans(model.encode(x), cfg.seed, cfg.kmeans_iters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.batch_size))
    reset_stop = int(cfg.reset_until * cfg.epochs * steps_per_epoch)
    step = n_reset = 0
    loss_v = recon_v = float("nan")
    model.train()
    bar = tqdm(range(cfg.epochs), desc="rq-vae", disable=not progress, unit="ep")
    for _ in bar:
        for idx in _batches(x.shape[0], cfg.batch_size, gen):
            resets, loss_v, recon_v = _train_step(model, opt, x[idx], cfg, gen,
                                                  allow_reset=step < reset_stop)
            n_reset += resets
            step += 1
        bar.set_postfix(loss=f"{loss_v:.4f}", recon=f"{recon_v:.4f}", reset=n_reset)
    model.eval()
    return model, TrainStats(step, n_reset, loss_v, recon_v)


def _train_sampled(embeddings: np.ndarray, cfg: TokenizerConfig, progress: bool,
                   gen: torch.Generator) -> tuple[RQVAE, TrainStats]:
    """Training on a seeded sample of rows (`train_sample`), for `train_steps` batches (or
    `epochs` passes over the sample), k-means on a sub-sample (`kmeans_sample`). Only the
    sample is copied into memory (embeddings may be a read-only memory map)."""
    from tqdm.auto import tqdm

    n = embeddings.shape[0]
    rows = sample_rows(n, cfg.train_sample, cfg.seed)
    x = torch.from_numpy(take_rows(embeddings, rows))   # RSS: the sample, not the map
    model = RQVAE(x.shape[1], cfg)
    model.fit_normalisation(x)
    if cfg.kmeans_init:
        km_rows = torch.from_numpy(sample_rows(x.shape[0], cfg.kmeans_sample, cfg.seed + 1))
        with torch.no_grad():
            model.quantizer.init_kmeans(model.encode(x[km_rows]), cfg.seed, cfg.kmeans_iters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.batch_size))
    total = cfg.train_steps if cfg.train_steps > 0 else cfg.epochs * steps_per_epoch
    reset_stop = int(cfg.reset_until * total)
    n_reset = 0
    loss_v = recon_v = float("nan")
    model.train()
    bar = tqdm(total=total, desc="rq-vae", disable=not progress, unit="step")
    batches: Iterator[Tensor] = iter(())
    for step in range(total):
        idx = next(batches, None)
        if idx is None:  # a fresh seeded permutation of the sample
            batches = _batches(x.shape[0], cfg.batch_size, gen)
            idx = next(batches)
        resets, loss_v, recon_v = _train_step(model, opt, x[idx], cfg, gen,
                                              allow_reset=step < reset_stop)
        n_reset += resets
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_v:.4f}", recon=f"{recon_v:.4f}", reset=n_reset)
    bar.close()
    model.eval()
    return model, TrainStats(total, n_reset, loss_v, recon_v)


@dataclass
class Assignment:
    codes: np.ndarray
    """int32 [M, N]: Eq. 3 codes of every item."""
    sq_err: float
    """sum over items and dims of (x̂ - x)^2, float64 accumulated."""
    sq_dev: float
    """sum of (x - mean x)^2 (two passes: the mean first), float64."""
    n_values: int


@torch.no_grad()
def assign_codes(model: RQVAE, embeddings: np.ndarray, batch_size: int = 65536) -> Assignment:
    """Codes of every row of embeddings [M, D_in] (an array or memory map), batch by batch:
    memory O(batch_size), plus the reconstruction figures of the quality report."""
    was = model.training
    model.eval()
    m, d = embeddings.shape
    codes = np.empty((m, model.quantizer.levels), dtype=np.int32)
    total = np.zeros(d, dtype=np.float64)
    for lo in range(0, m, batch_size):
        total += np.asarray(embeddings[lo:lo + batch_size], dtype=np.float64).sum(0)
        drop_pages(embeddings)
    mean = total / max(m, 1)
    sq_err = sq_dev = 0.0
    for lo in range(0, m, batch_size):
        xb = np.array(embeddings[lo:lo + batch_size], dtype=np.float32)  # own, writable copy
        c, x_hat = model.tokenize(torch.from_numpy(xb))
        codes[lo:lo + len(xb)] = c.numpy()
        sq_err += float(((x_hat.double() - torch.from_numpy(xb).double()) ** 2).sum())
        sq_dev += float(((xb.astype(np.float64) - mean) ** 2).sum())
        drop_pages(embeddings)
    model.train(was)
    return Assignment(codes, sq_err, sq_dev, m * d)
