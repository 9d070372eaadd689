"""Damaged and hostile checkpoints, in one process without a process group (DCP no-dist):
each kind of damage to `latest` (missing/truncated shard, garbled shard bytes, missing/
truncated/hostile `.metadata`, missing/garbled meta.json, missing/garbled/poisoned
train_state.pt) makes the resume fall back to the previous checkpoint with one warning line
naming what was skipped and why, and `resolve` (evaluate) do the same from `latest`/`best`;
an explicitly named damaged folder, or nothing complete left, is one CheckpointError line. A
pickle `__reduce__` payload planted in train_state.pt or .metadata never runs."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

import genci_dist.runtime.checkpoint as ckpt_mod
from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError
from genci_dist.runtime.checkpoint import (
    CheckpointError,
    CheckpointManager,
    fingerprint_differences,
    load_model_only,
    resolve,
)
from genci_dist.runtime.distributed import DistEnv


class Loader:
    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.pos = s["pos"]


def _parts() -> tuple[nn.Linear, CombinedOptimizer, Any, Loader]:
    model = nn.Linear(3, 2)
    dense = KeyedOptimizerWrapper(dict(model.named_parameters()),
                                  lambda ps: torch.optim.Adam(ps, lr=0.1))
    opt = CombinedOptimizer([("dense", dense)])
    sched = torch.optim.lr_scheduler.LambdaLR(dense, lambda s: 1.0 / (s + 1))
    return model, opt, sched, Loader()


ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
              device=torch.device("cpu"), backend=None, pg=None)


def _cfg(*extra: str) -> JobConfig:
    return load_config(None, ["--data.dir", "data/x", "--data.max_history", "20", *extra])


def _two_checkpoints(root: Path) -> dict[int, torch.Tensor]:
    """Steps 1 and 2 (AUC .7 then .6: best = 1, latest = 2); returns each step's weights."""
    model, opt, sched, loader = _parts()
    mgr = CheckpointManager(root, ENV, keep_last=2)
    weights = {}
    for step, metric in ((1, 0.7), (2, 0.6)):
        opt.zero_grad()
        model(torch.ones(4, 3)).square().mean().backward()
        opt.step()
        sched.step()
        loader.pos = 10 * step
        weights[step] = model.weight.detach().clone()
        mgr.save(step=step, model=model, optimizer=opt, scheduler=sched, loader=loader,
                 train_state={"step": step}, config=_cfg(), semantic_hash="h", metric=metric,
                 plan=None)
    return weights


class Payload:
    """Unpickling this writes a marker file: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran"))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _shard(ck: Path) -> Path:
    (shard,) = ck.glob("*.distcp")
    return shard


def _zero_shard(ck: Path) -> None:
    s = _shard(ck)
    s.write_bytes(bytes(s.stat().st_size))


def _poison(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"train": Payload(marker), "ranks": [], "world_size": 1}))


MARKER = "pwned.txt"
# (damage, words the one-line reason must contain)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing_shard": (lambda ck: _shard(ck).unlink(), "shard __0_0.distcp is missing"),
    "truncated_shard": (lambda ck: _truncate(_shard(ck)), "shard __0_0.distcp is truncated"),
    "zeroed_shard": (_zero_shard, "load failed"),
    "missing_metadata": (lambda ck: (ck / ".metadata").unlink(), ".metadata is missing"),
    "truncated_metadata": (lambda ck: _truncate(ck / ".metadata"), ".metadata: unreadable"),
    "hostile_metadata": (lambda ck: _poison(ck / ".metadata", ck.parent.parent / MARKER),
                         "refused global"),
    "missing_meta_json": (lambda ck: (ck / "meta.json").unlink(), "meta.json is missing"),
    "garbled_meta_json": (lambda ck: (ck / "meta.json").write_text('{"step": 2, '),
                          "meta.json: unreadable"),
    "missing_train_state": (lambda ck: (ck / "train_state.pt").unlink(),
                            "train_state.pt is missing"),
    "garbled_train_state": (lambda ck: _truncate(ck / "train_state.pt"),
                            "train_state.pt: not safely loadable"),
    "poisoned_train_state": (lambda ck: _poison(ck / "train_state.pt",
                                                ck.parent.parent / MARKER),
                             "train_state.pt: not safely loadable"),
}


def _resume(root: Path) -> tuple[dict[str, Any] | None, nn.Linear, Loader]:
    model, opt, sched, loader = _parts()
    state = CheckpointManager(root, ENV).load_latest(
        model=model, optimizer=opt, scheduler=sched, loader=loader, config=_cfg(),
        semantic_hash="h")
    return state, model, loader


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_latest_falls_back_then_fails_in_one_line(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "checkpoints"
    weights = _two_checkpoints(root)
    ckpt_mod._warned.clear()
    damage, reason = CASES[case]
    damage(root / "step-0000002")

    # resume: step 1's weights, loader position and train state, one warning line
    state, model, loader = _resume(root)
    assert state == {"step": 1} and loader.pos == 10
    assert torch.equal(model.weight, weights[1])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "skipped damaged checkpoint" in err[0] and "step-0000002" in err[0], err
    assert reason in err[0] and err[0].endswith("using step-0000001"), err

    # evaluate: `latest` falls back to step 1 (train_state is not needed to evaluate);
    # the damaged folder named explicitly is one CheckpointError line
    needs_weights = "train_state" not in case
    if needs_weights and case != "zeroed_shard":  # zeroed bytes show only when loading
        assert resolve(root / "latest") == (root / "step-0000001").resolve()
    plain = nn.Linear(3, 2)
    load_model_only(plain, root / "latest")
    assert torch.equal(plain.weight, weights[1 if needs_weights else 2])
    if needs_weights:
        with pytest.raises(CheckpointError) as info:
            load_model_only(nn.Linear(3, 2), root / "step-0000002")
        assert reason in str(info.value) and "\n" not in str(info.value)
    load_model_only(plain, root / "best")  # best (step 1) is intact
    assert torch.equal(plain.weight, weights[1])

    # nothing complete left: one line, for the resume and for evaluate
    damage(root / "step-0000001")
    with pytest.raises(CheckpointError) as info:
        _resume(root)
    msg = str(info.value)
    assert "no complete checkpoint left" in msg and reason in msg and "\n" not in msg, msg
    if needs_weights:
        with pytest.raises(CheckpointError, match="no complete checkpoint left"):
            load_model_only(nn.Linear(3, 2), root / "best")
    assert not (tmp_path / MARKER).exists()  # no payload ever ran


def test_the_payload_really_runs_under_a_plain_unpickler(tmp_path: Path) -> None:
    """The poisoned files of the test above are live: a bare pickle.load runs them."""
    _poison(tmp_path / "train_state.pt", tmp_path / MARKER)
    pickle.loads((tmp_path / "train_state.pt").read_bytes())
    assert (tmp_path / MARKER).read_text() == "code ran"


def test_rng_and_train_state_hold_no_pickled_objects(tmp_path: Path) -> None:
    """A fresh train_state.pt loads under torch's weights_only unpickler with no extra
    globals allowed (RNG states are tensors and plain values)."""
    root = tmp_path / "checkpoints"
    _two_checkpoints(root)
    blob = torch.load(root / "latest" / "train_state.pt", weights_only=True)
    assert blob["world_size"] == 1 and blob["ranks"][0]["loader"] == {"pos": 20}
    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        root / "latest" / "train_state.pt") == []


def test_refused_resume_names_only_the_differing_fields(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _two_checkpoints(root)
    model, opt, sched, loader = _parts()
    mgr = CheckpointManager(root, ENV)
    kw = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader,
          "semantic_hash": "h"}
    with pytest.raises(ConfigError) as info:
        mgr.load_latest(**kw, config=_cfg("--model.d_model", "32", "--data.max_history", "5"))
    d_model = _cfg().model.d_model
    assert str(info.value) == (
        f"{(root / 'step-0000002').resolve()}: checkpoint was written by another model config "
        f"or dataset: data.max_history: 20 → 5, model.d_model: {d_model} → 32")
    # a checkpoint written before max_history was in the fingerprint: unknown, not different
    meta_path = root / "latest" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["fingerprint"]["data"]
    meta_path.write_text(json.dumps(meta))
    assert mgr.load_latest(**kw, config=_cfg("--data.max_history", "5")) == {"step": 2}
    assert fingerprint_differences(meta["fingerprint"], ckpt_mod.fingerprint(
        _cfg("--data.dir", "data/y"))) == ['data.dir: "data/x" → "data/y"']


def test_old_train_state_with_numpy_rng_still_resumes(tmp_path: Path) -> None:
    """train_state.pt files written before this change held numpy arrays (the numpy RNG
    state): they load through a narrow allowlist (numpy array rebuild only)."""
    import numpy as np

    root = tmp_path / "checkpoints"
    _two_checkpoints(root)
    path = root / "latest" / "train_state.pt"
    blob = torch.load(path, weights_only=True)
    np.random.seed(5)
    old = np.random.get_state()
    blob["ranks"][0]["rng"]["numpy"] = old  # as the old writer stored it
    torch.save(blob, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)  # really old-style
    np.random.seed(99)
    state, _model, _loader = _resume(root)
    assert state == {"step": 2}
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.set_state(old)
    assert np.array_equal(np.random.rand(3), expected)
    assert os.path.isdir(root / "step-0000001")
