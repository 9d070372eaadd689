"""Per-level codebook sizes (tokenizer.codebook_sizes): level n of the RQ-VAE draws codes from
[0, K_n) only — Eq. 3 over the first K_n codes against a float64 brute force, EMA updates and
dead-code resets confined to them, a trained tokenizer that never emits a code >= K_n — and
the model side, whose token layout keeps codebook_size slots per level, runs unchanged on
such IDs (generated codes stay within K_n, as the trie holds only existing items' paths)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from genci_dist.config import load_config
from genci_dist.config_loader import ConfigError
from genci_dist.tokenizer.cli import quality_report
from genci_dist.tokenizer.config import TokenizerConfig
from genci_dist.tokenizer.rqvae import ResidualQuantizer, residual_quantize, train_rqvae
from tests.conftest import write_tiny_dataset
from tests.test_model_task import SMALL, first_batch, make_task


def test_eq3_over_the_first_k_n_codes_equals_float64_brute_force() -> None:
    """Codes, quantised vector and residuals equal a one-item-at-a-time float64 Eq. 3 whose
    level-n argmin runs over the first sizes[n] codes only (the other codes sit nearer)."""
    g = torch.Generator().manual_seed(0)
    cbs = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    sizes = [2, 6, 3]
    codes, quantized, residuals = residual_quantize(x, cbs, sizes)
    for b in range(len(x)):
        r = x[b].clone()
        q = torch.zeros(4, dtype=torch.float64)
        for n, k in enumerate(sizes):
            assert torch.equal(residuals[b, n], r)
            d = [float(((r - c) ** 2).sum()) for c in cbs[n, :k]]
            z = int(np.argmin(d))
            assert codes[b, n] == z
            q, r = q + cbs[n, z], r - cbs[n, z]
        assert torch.allclose(quantized[b], q, rtol=0, atol=1e-12)
    assert codes[:, 0].max() < 2 and codes[:, 2].max() < 3
    full, _, _ = residual_quantize(x, cbs)  # without sizes: all K codes, as before
    assert (full[:, 0] >= 2).any()


def test_ema_and_dead_code_resets_touch_only_the_first_k_n_codes() -> None:
    """Training-mode forward (EMA) and dead-code resets change codebook rows < K_n only; the
    unused rows, their EMA statistics and idle counters stay as built."""
    torch.manual_seed(0)
    q = ResidualQuantizer(2, 8, 3, mode="ema", ema_decay=0.5, sizes=[3, 8])
    before = (q.codebooks.detach().clone(), q.ema_count.clone(), q.ema_sum.clone())
    z = torch.randn(64, 3)
    for _ in range(4):
        _, codes, _, res = q.train()(z)
        assert codes[:, 0].max() < 3
        q.reset_dead_codes(codes, res, threshold=1, generator=torch.Generator().manual_seed(1),
                           allow_reset=True)
    for now, was in zip((q.codebooks.detach(), q.ema_count, q.ema_sum), before, strict=True):
        assert torch.equal(now[0, 3:], was[0, 3:])
        assert not torch.equal(now[0, :3], was[0, :3])
    assert (q.steps_unused[0, 3:] == 0).all()
    with pytest.raises(ValueError, match="sizes"):
        ResidualQuantizer(2, 8, 3, sizes=[3, 9])


def _cfg(**kw: object) -> TokenizerConfig:
    base = TokenizerConfig(levels=3, codebook_size=16, hidden_dims=(32,), latent_dim=8,
                           epochs=5, batch_size=64, dead_code_threshold=5, kmeans_iters=20,
                           progress_bar=False)
    return replace(base, **kw)


def test_trained_tokenizer_keeps_every_level_within_its_size() -> None:
    """A trained RQ-VAE with sizes [4, 16, 8] emits level codes < K_n and uses most of each
    level; the quality report's utilisation is per K_n; sizes equal to K everywhere give
    exactly the IDs of no sizes (the default path is unchanged)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 24))
    x = (centres[rng.integers(0, 12, 300)] + 0.3 * rng.normal(size=(300, 24))).astype(np.float32)
    xt = torch.from_numpy(x)
    model, _ = train_rqvae(x, _cfg(codebook_sizes=(4, 16, 8)))
    codes, x_hat = model.tokenize(xt)
    sizes = (4, 16, 8)
    for n, k in enumerate(sizes):
        assert codes[:, n].max() < k
        assert len(torch.unique(codes[:, n])) >= k // 2
    util = quality_report(codes.numpy(), x, x_hat.numpy(), sizes)["utilisation"]
    assert util == [round(len(np.unique(codes[:, n])) / k, 4) for n, k in enumerate(sizes)]
    plain = train_rqvae(x, _cfg())[0].tokenize(xt)[0]
    same = train_rqvae(x, _cfg(codebook_sizes=(16, 16, 16)))[0].tokenize(xt)[0]
    assert torch.equal(plain, same)


def test_codebook_sizes_config_is_checked_and_reaches_from_the_cli() -> None:
    cfg = load_config(None, ["--tokenizer.codebook_sizes", "[64, 256, 256]"])
    assert cfg.tokenizer.codebook_sizes == (64, 256, 256)
    assert cfg.tokenizer.level_sizes == (64, 256, 256)
    assert TokenizerConfig().level_sizes == (256, 256, 256)
    with pytest.raises(ConfigError, match="one size per level"):
        TokenizerConfig(codebook_sizes=(64, 256))
    with pytest.raises(ConfigError, match=r"in \[2, codebook_size = 256\]"):
        TokenizerConfig(codebook_sizes=(64, 512, 256))
    with pytest.raises(ConfigError, match="codebook_sizes"):
        load_config(None, ["--tokenizer.codebook_sizes", "[1, 256, 256]"])


def test_genci_runs_on_ids_with_a_smaller_first_level(tmp_path: Path) -> None:
    """IDs whose level 1 uses 2 of the 4 slots (written by the tokenizer's own writers): the
    task builds with the unchanged vocab, trie widths and cohort ids, trains, and every
    generated level-1 code is < 2; the cohorts of the unused codes are empty."""
    from genci_dist.tokenizer.cohorts import CohortIndex
    from genci_dist.tokenizer.semantic_ids import build_semantic_ids, write_semantic_ids

    ds = write_tiny_dataset(tmp_path / "ds", semantic_ids=False)
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 2, 40), rng.integers(0, 4, 40)], axis=1)
    manifest = json.loads((ds / "manifest.json").read_text())
    sids = build_semantic_ids(codes, 4, model="test",
                              items_hash=manifest["files"]["items.parquet"]["sha256"])
    write_semantic_ids(ds, sids)
    cohorts = CohortIndex.build(codes, 4, content_hash=sids.content_hash)
    cohorts.save(ds)
    indptr, _ = cohorts.csr("code")
    assert (np.diff(indptr.numpy())[2:4] == 0).all()  # level-1 codes 2 and 3: no members
    cfg = dataclasses.replace(SMALL, beam_width=2)
    task = make_task(ds, cfg)
    batch = first_batch(ds)
    task(batch)[0].backward()
    enc, mask = task.generator.encode(batch.history_tokens)
    gen, _ = task.generator.beam_search(enc.detach(), mask, task.trie, 2, steps=2)
    assert gen[:, :, 0].max() < 2
