"""The model options that reproduce the official GenCI release's choices (each off by default):
model.mlp_dropout = "before" (Dropout→Linear→ReLU blocks) and model.init = "xavier_normal"
(the dense modules re-drawn as the official `self.apply(_init_weights)`), checked against
hand-built float64 references; and their reach from the CLI with range checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipes.batch import Batch
from genci_dist.config import load_config
from genci_dist.config_loader import ConfigError
from genci_dist.model.config import ModelConfig
from genci_dist.model.heads import mlp
from tests.test_model_task import SMALL, first_batch, make_task

P = 0.4


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def _dropout_linear_relu(x: Tensor, linears: list[nn.Linear], p: float, train: bool) -> Tensor:
    """The official MLPLayers + predict layer, written out: each hidden block is
    F.dropout → F.linear → relu, then a plain final linear."""
    for lin in linears[:-1]:
        x = torch.relu(F.linear(F.dropout(x, p, training=train), lin.weight, lin.bias))
    return F.linear(x, linears[-1].weight, linears[-1].bias)


@pytest.mark.parametrize("hidden", [(7, 5), (6,), (4, 4, 3)])
def test_before_mlp_equals_dropout_linear_relu_blocks_in_train_mode(hidden: tuple[int, ...]
                                                                     ) -> None:
    """Train mode, same seed for both: the module's output is the hand-built
    Dropout→Linear→ReLU chain's, bit for bit (float64), and its first op drops inputs: an
    input entry the first mask zeroes has no gradient."""
    torch.manual_seed(0)
    m = mlp(9, hidden, P, dropout_at="before").double().train()
    assert [type(x) for x in m] == [nn.Dropout, nn.Linear, nn.ReLU] * len(hidden) + [nn.Linear]
    x = torch.randn(64, 9, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(123)
    out = m(x)
    torch.manual_seed(123)
    ref = _dropout_linear_relu(x, _linears(m), P, train=True)
    assert torch.equal(out, ref)
    torch.manual_seed(123)  # the first mask, drawn exactly as the module's first Dropout does
    first_mask = F.dropout(torch.ones_like(x), P, training=True) != 0
    out.sum().backward()
    assert (~first_mask).any() and (x.grad[~first_mask] == 0).all()
    assert not torch.equal(out, _dropout_linear_relu(x, _linears(m), 0.0, train=False))


@pytest.mark.parametrize("hidden", [(7, 5), (6,)])
def test_both_placements_in_eval_mode_equal_the_no_dropout_mlp(hidden: tuple[int, ...]) -> None:
    """Eval mode: "before" and "after" (same weights) both compute the plain MLP
    relu(W x + b) ... → W_out h + b_out, hand-written in float64."""
    torch.manual_seed(1)
    before = mlp(9, hidden, P, dropout_at="before").double().eval()
    after = mlp(9, hidden, P, dropout_at="after").double().eval()
    for src, dst in zip(_linears(before), _linears(after), strict=True):
        dst.load_state_dict(src.state_dict())
    x = torch.randn(32, 9, dtype=torch.float64)
    h = x
    for lin in _linears(before)[:-1]:
        h = torch.clamp(h @ lin.weight.T + lin.bias, min=0.0)
    plain = h @ _linears(before)[-1].weight.T + _linears(before)[-1].bias
    assert torch.allclose(before(x), plain, rtol=0, atol=1e-12)
    assert torch.allclose(after(x), plain, rtol=0, atol=1e-12)


def test_after_is_todays_layout() -> None:
    """The default keeps Linear→ReLU→Dropout blocks (state-dict keys and maths unchanged)."""
    assert ModelConfig().mlp_dropout == "after"
    m = mlp(9, (4, 3), P)
    assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    with pytest.raises(ValueError, match="dropout_at"):
        mlp(9, (4,), P, dropout_at="middle")


@pytest.mark.parametrize("name", ["genci", "deepfm", "dcnv2", "din"])
def test_mlp_dropout_reaches_every_deep_part(tiny_dataset: Path, name: str) -> None:
    """GenCI's Eq. 10 MLP and its SR teacher's deep part, and each baseline's deep part, are
    built with the configured placement (a change that helps GenCI applies to the baselines);
    DIN's activation unit (no dropout) is unaffected."""
    cfg = dataclasses.replace(SMALL, name=name, dropout=0.2, deepfm_dropout=0.3,
                              mlp_dropout="before")
    task = make_task(tiny_dataset, cfg)
    if name == "genci":
        deep = [(task.mlp, 0.2), (task.teacher.dnn, 0.3)]
    elif name == "din":
        deep = [(task.head, 0.2)]
    else:
        deep = [(task.head.dnn, 0.3 if name == "deepfm" else 0.2)]
    for seq, p in deep:
        assert isinstance(seq[0], nn.Dropout) and isinstance(seq[1], nn.Linear)
        assert seq[0].p == p
    if name == "din":
        assert isinstance(task.attention.att[0], nn.Linear)


# ---- init = "xavier_normal" ----------------------------------------------------------------

INIT = dataclasses.replace(SMALL, d_model=64, d_ff=128, num_heads=4, d_kv=16, attn_heads=2,
                           mlp=(256,), deepfm_mlp=(128,))
LARGE = 2048  # entries: the empirical std is then within ~1.6 % (1 sigma) of the true one


def _dense(task: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in task.named_modules()
            if isinstance(m, nn.Linear | nn.Embedding) and ".ebc." not in f".{n}."
            and "history.embeddings" not in n}


@pytest.mark.parametrize("name", ["genci", "dcnv2", "deepfm", "din"])
def test_xavier_normal_redraws_every_dense_linear_and_embedding(tiny_dataset: Path,
                                                                name: str) -> None:
    """Every nn.Linear / dense nn.Embedding weight: mean ≈ 0 and empirical std ≈
    sqrt(2/(fan_in+fan_out)) within 4 sampling sigmas (sd of a sample std ≈ std/sqrt(2n))
    for the large ones, kurtosis ≈ 3 (normal; the default Xavier-uniform MLPs have the same
    std but kurtosis 1.8), every Linear bias exactly 0. TorchRec tables and
    MultiheadAttention's packed in_proj (not nn.Linear, as in the official code) keep the
    values the default build draws under the same seed."""
    cfg = dataclasses.replace(INIT, name=name)
    default = make_task(tiny_dataset, cfg, seed=3)
    xavier = make_task(tiny_dataset, dataclasses.replace(cfg, init="xavier_normal"), seed=3)
    mods = _dense(xavier)
    assert any(isinstance(m, nn.Embedding) for m in mods.values()) == (name == "genci")
    checked = 0
    for n, m in mods.items():
        w = m.weight.detach().double()
        fan_out, fan_in = w.shape
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert (m.bias == 0).all(), n
        if w.numel() < LARGE:
            continue
        std = math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel()), n
        assert w.std().item() == pytest.approx(std, rel=4 / math.sqrt(2 * w.numel())), n
        kurt = (((w - w.mean()) / w.std()) ** 4).mean().item()
        assert 2.4 < kurt < 3.6, (n, kurt)
        checked += 1
    assert checked >= (10 if name == "genci" else 1)
    before, after = default.state_dict(), xavier.state_dict()
    kept = [k for k in before if "embedding_bags" in k or "in_proj" in k
            or "history.embeddings" in k]
    assert kept or name in ("deepfm", "dcnv2")
    for k in kept:
        assert torch.equal(before[k], after[k]), k
    redrawn = [f"{n}.weight" for n in mods]
    assert all(not torch.equal(before[k], after[k]) for k in redrawn if k in before)


def test_xavier_normal_genci_still_trains(tiny_dataset: Path) -> None:
    """One backward pass of the re-initialised GenCI: finite loss, every parameter a gradient."""
    task = make_task(tiny_dataset, dataclasses.replace(INIT, init="xavier_normal"))
    batch: Batch = first_batch(tiny_dataset)
    loss = task(batch)[0]
    assert torch.isfinite(loss)
    loss.backward()
    dead = [n for n, p in task.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, dead


# ---- config reach ---------------------------------------------------------------------------

def test_options_reach_from_the_cli_and_default_to_todays_behaviour() -> None:
    cfg = load_config(None, ["--model.mlp_dropout", "before", "--model.init", "xavier_normal",
                             "--model.sr_teacher_history", "true"])
    assert (cfg.model.mlp_dropout, cfg.model.init, cfg.model.sr_teacher_history) == (
        "before", "xavier_normal", True)
    d = ModelConfig()
    assert (d.mlp_dropout, d.init, d.sr_teacher_history) == ("after", "default", False)


@pytest.mark.parametrize("key, value", [("mlp_dropout", "middle"), ("init", "kaiming"),
                                        ("sr_teacher_history", "maybe")])
def test_bad_option_values_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}"):
        load_config(None, [f"--model.{key}", value])
    if key != "sr_teacher_history":  # a config built in code is range-checked as well
        with pytest.raises(ConfigError, match=f"model.{key}"):
            ModelConfig(**{key: value})
