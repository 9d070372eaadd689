"""RQ-VAE: Eq. 3 against a float64 brute force, residual bookkeeping, EMA and dead-code
updates, k-means init, seeded determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from genci_dist.tokenizer.config import TokenizerConfig
from genci_dist.tokenizer.rqvae import (
    ResidualQuantizer,
    kmeans,
    nearest_code,
    residual_quantize,
    train_rqvae,
)


def _reference_eq3(x: np.ndarray, codebooks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct float64 Eq. 3, one item and one code at a time."""
    x = x.astype(np.float64)
    cbs = codebooks.astype(np.float64)
    codes = np.zeros((len(x), len(cbs)), dtype=np.int64)
    quantized = np.zeros_like(x)
    for b in range(len(x)):
        r = x[b].copy()
        for n, cb in enumerate(cbs):
            dists = [float(((r - c) ** 2).sum()) for c in cb]
            codes[b, n] = int(np.argmin(dists))
            quantized[b] += cb[codes[b, n]]
            r = r - cb[codes[b, n]]
    return codes, quantized


def test_quantisation_equals_float64_argmin() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    cbs = torch.randn(3, 16, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 0.25]).view(3, 1, 1)
    ref_codes, ref_q = _reference_eq3(x.numpy(), cbs.numpy())

    codes, quantized, _ = residual_quantize(x, cbs)
    assert np.array_equal(codes.numpy(), ref_codes)
    np.testing.assert_allclose(quantized.numpy(), ref_q, rtol=0, atol=1e-12)

    # float32 agrees wherever the float64 winner is not a near-tie
    codes32, _, res32 = residual_quantize(x.float(), cbs.float())
    agree = codes32.numpy() == ref_codes
    r = x.numpy().copy()
    for n in range(3):
        d = ((r[:, None, :] - cbs[n].numpy()[None]) ** 2).sum(-1)
        gap = np.sort(d, axis=1)[:, 1] - np.sort(d, axis=1)[:, 0]
        first_diff = ~agree[:, n] & agree[:, :n].all(1)
        assert (gap[first_diff] < 1e-4).all()
        r = r - cbs[n].numpy()[ref_codes[:, n]]
    assert agree.mean() > 0.99


def test_fast_training_distance_matches_exact_on_separated_codes() -> None:
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(32, 6, generator=g)
    r = cb[torch.randint(0, 32, (500,), generator=g)] + 0.01 * torch.randn(500, 6, generator=g)
    assert torch.equal(nearest_code(r, cb, exact=False), nearest_code(r, cb, exact=True))


def test_residuals_sum_back_to_quantised_vector() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    cbs = torch.randn(4, 10, 5, generator=g, dtype=torch.float64)
    codes, quantized, residuals = residual_quantize(x, cbs)
    chosen = torch.stack([cbs[n][codes[:, n]] for n in range(4)], 1)  # [B, N, D]
    torch.testing.assert_close(chosen.sum(1), quantized, rtol=0, atol=1e-12)
    torch.testing.assert_close(residuals[:, 0], x)
    for n in range(3):  # r_{n+1} = r_n - c_{z_n}
        torch.testing.assert_close(residuals[:, n + 1], residuals[:, n] - chosen[:, n])
    torch.testing.assert_close(x - quantized, residuals[:, 3] - chosen[:, 3], rtol=0, atol=1e-12)


def test_quantizer_forward_is_eq3_and_straight_through() -> None:
    q = ResidualQuantizer(2, 8, 4, mode="ste").double()
    z = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    q.eval()
    z_q, codes, loss, _ = q(z)
    ref_codes, ref_q = _reference_eq3(z.detach().numpy(), q.codebooks.detach().numpy())
    assert np.array_equal(codes.numpy(), ref_codes)
    np.testing.assert_allclose(z_q.detach().numpy(), ref_q, atol=1e-12)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient to the encoder


def test_ema_update_moves_codes_to_decayed_means() -> None:
    q = ResidualQuantizer(1, 2, 1, mode="ema", ema_decay=0.5)
    q.codebooks.data[0] = torch.tensor([[0.0], [10.0]])
    q.ema_sum.copy_(q.codebooks.data)
    q.ema_count.fill_(1.0)
    q.train()
    q(torch.tensor([[1.0], [3.0], [9.0]]))
    # code 0: count 0.5*1 + 0.5*2 = 1.5, sum 0.5*0 + 0.5*4 = 2 → 4/3; code 1: (5 + 4.5)/1 = 9.5
    np.testing.assert_allclose(q.codebooks.detach().numpy().ravel(), [4 / 3, 9.5], rtol=1e-4)


def test_dead_code_reset_uses_batch_residuals() -> None:
    q = ResidualQuantizer(1, 4, 2, mode="ema")
    codes = torch.zeros(5, 1, dtype=torch.long)  # only code 0 is ever used
    residuals = torch.arange(10, dtype=torch.float32).view(5, 1, 2) + 100
    gen = torch.Generator().manual_seed(0)
    assert q.reset_dead_codes(codes, residuals, 2, gen, allow_reset=True) == 0
    assert q.reset_dead_codes(codes, residuals, 2, gen, allow_reset=True) == 3
    new = q.codebooks.detach()[0, 1:]
    batch = residuals[:, 0]
    assert all(any(torch.equal(row, b) for b in batch) for row in new)
    assert len({tuple(r.tolist()) for r in new}) == 3  # three distinct residuals
    assert q.steps_unused[0].tolist() == [0, 0, 0, 0]
    assert q.reset_dead_codes(codes, residuals, 1, gen, allow_reset=False) == 0


def test_kmeans_init_beats_random_and_handles_few_points() -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(8, 3, generator=g) * 10
    pts = centres.repeat(20, 1) + 0.01 * torch.randn(160, 3, generator=g)
    found = kmeans(pts, 8, seed=0, iters=50)
    d = ((found[:, None] - centres[None]) ** 2).sum(-1)
    assert sorted(d.argmin(0).tolist()) == list(range(8))  # one found centre per true centre
    few = kmeans(pts[:3], 6, seed=0, iters=10)
    assert few.shape == (6, 3) and torch.isfinite(few).all()


def _tiny_cfg(**kw: object) -> TokenizerConfig:
    base = TokenizerConfig(levels=3, codebook_size=16, hidden_dims=(32,), latent_dim=8,
                           epochs=15, batch_size=64, dead_code_threshold=5, kmeans_iters=20,
                           progress_bar=False)
    return replace(base, **kw)


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 24))
    return (centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, 24))).astype(np.float32)


def test_same_seed_same_ids_and_other_seed_differs() -> None:
    x = _clustered(300, 0)
    ids = []
    for seed in (7, 7, 8):
        model, _ = train_rqvae(x, _tiny_cfg(seed=seed))
        ids.append(model.tokenize(torch.from_numpy(x))[0])
    assert torch.equal(ids[0], ids[1])
    assert not torch.equal(ids[0], ids[2])


def test_training_reduces_reconstruction_and_uses_codes() -> None:
    x = _clustered(400, 1)
    xt = torch.from_numpy(x)
    short, _ = train_rqvae(x, _tiny_cfg(epochs=1))
    long, stats = train_rqvae(x, _tiny_cfg(epochs=40))
    err = [float(((m.tokenize(xt)[1] - xt) ** 2).mean()) for m in (short, long)]
    assert err[1] < 0.8 * err[0]
    codes = long.tokenize(xt)[0]
    assert len(torch.unique(codes[:, 0])) >= 12  # every cluster has a level-1 code of its own
    assert stats.steps == 40 * 7


def test_ste_mode_trains_codebooks() -> None:
    x = _clustered(200, 2)
    model, _ = train_rqvae(x, _tiny_cfg(quantizer="ste", epochs=3, kmeans_init=False))
    assert model.quantizer.codebooks.requires_grad
    codes, x_hat = model.tokenize(torch.from_numpy(x))
    assert codes.shape == (200, 3) and torch.isfinite(x_hat).all()
