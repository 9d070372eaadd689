"""GenCI's loss composition and the four Table 4 ablation switches, on real batches of a tiny
prepared dataset (tokenizer-written semantic IDs and cohorts), plus a single-process overfit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from data_pipes.schema import feature_specs, load_manifest
from data_pipes.stream import build_loader
from genci_dist.model.build import build_task, load_generation_assets
from genci_dist.model.config import ModelConfig

SMALL = ModelConfig(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                    num_heads=2, d_kv=8, mlp=(32,), deepfm_mlp=(16,), attn_heads=2,
                    dropout=0.0, deepfm_dropout=0.0, attn_dropout=0.0)


def _setup(ds: Path, cfg: ModelConfig, batch_size: int = 64):  # noqa: ANN202
    m = load_manifest(ds)
    torch.manual_seed(0)
    task = build_task(cfg, feature_specs(m), load_generation_assets(ds, m, cfg),
                      torch.device("cpu"))
    batch = next(iter(build_loader(ds, "train", batch_size=batch_size, seed=0)))
    return task, batch


def _grads(task: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in task.named_parameters()}


def test_full_loss_is_ctr_plus_mu_ntp_plus_eta_sr(tiny_dataset: Path) -> None:
    cfg = dataclasses.replace(SMALL, mu=0.7, eta=1.9)
    task, batch = _setup(tiny_dataset, cfg)
    loss, parts, logits, labels = task(batch)
    assert set(parts) == {"ctr", "ntp", "sr"}
    assert loss.item() == pytest.approx((parts["ctr"] + 0.7 * parts["ntp"]
                                         + 1.9 * parts["sr"]).item(), rel=1e-6)
    assert logits.shape == labels.shape == (batch.size,)
    loss.backward()
    g = _grads(task)
    for prefix in ("generator.t5.encoder", "generator.t5.decoder", "cohort_attn", "mlp",
                   "teacher", "sparse.ebc", "intent_emb"):
        assert any(v for n, v in g.items() if n.startswith(prefix)), prefix


@pytest.mark.parametrize("switch, gone_part, gone_modules", [
    ("use_ntp", "ntp", ("generator.t5.decoder",)),
    ("use_sr", "sr", ("teacher",)),
    ("use_st_intent", None, ("cohort_attn", "intent_emb")),
    ("use_lt_intent", None, ()),
])
def test_each_ablation_removes_exactly_its_term(tiny_dataset: Path, switch: str,
                                                gone_part: str | None,
                                                gone_modules: tuple[str, ...]) -> None:
    task, batch = _setup(tiny_dataset, dataclasses.replace(SMALL, **{switch: False}))
    loss, parts, _, _ = task(batch)
    expected = {"ctr", "ntp", "sr"} - ({gone_part} if gone_part else set())
    assert set(parts) == expected
    loss.backward()
    g = _grads(task)
    for prefix in gone_modules:  # removed branch: absent, or present without gradient
        assert not any(v for n, v in g.items() if n.startswith(prefix)), prefix
    n_features = len(load_manifest(tiny_dataset)["features"])
    full_width = 2 * SMALL.d_model + n_features * SMALL.embedding_dim
    mlp_in = task.mlp[0].in_features
    if switch in ("use_st_intent", "use_lt_intent"):
        assert mlp_in == full_width - SMALL.d_model   # one intent vector fewer in Eq. 10
    else:
        assert mlp_in == full_width


def test_ntp_on_positives_ignores_negative_targets(tiny_dataset: Path) -> None:
    task, batch = _setup(tiny_dataset, SMALL)
    neg = (batch.labels == 0).nonzero().flatten()
    assert len(neg) > 0
    changed = dataclasses.replace(batch, target_tokens=batch.target_tokens.clone())
    changed.target_tokens[neg] = batch.target_tokens[(batch.labels == 1).nonzero()[0]]
    with torch.no_grad():
        a = task(batch)[1]["ntp"]
        b = task(changed)[1]["ntp"]
    assert a == pytest.approx(b.item(), abs=1e-6)
    task_all, _ = _setup(tiny_dataset, dataclasses.replace(SMALL, ntp_on="all"))
    with torch.no_grad():
        assert task_all(batch)[1]["ntp"].item() != pytest.approx(
            task_all(changed)[1]["ntp"].item(), abs=1e-6)


def test_genci_overfits_a_fixed_batch(tiny_dataset: Path) -> None:
    """256 fixed samples, 60 Adam steps: the CTR loss must drop far below the label entropy
    (~0.5-0.69 nats for these labels), which only a graph that learns end to end can do."""
    task, batch = _setup(tiny_dataset, SMALL, batch_size=256)
    opt = torch.optim.Adam(task.parameters(), lr=0.01)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss, parts, _, _ = task(batch)
        loss.backward()
        opt.step()
        first = first if first is not None else parts["ctr"].item()
    assert parts["ctr"].item() < 0.15 < first
