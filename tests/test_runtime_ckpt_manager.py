"""CheckpointManager bookkeeping, in one process without a process group (DCP no-dist mode):
which folders survive keep_last/keep_best, where `latest`/`best` point, that an interrupted
save (failure after dcp.save, before publish) leaves `latest` on the previous checkpoint, that
RNG and loader state come back exactly, and that foreign checkpoints are refused."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as real_dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

import genci_dist.runtime.checkpoint as ckpt_mod
from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError
from genci_dist.runtime.checkpoint import CheckpointManager, load_model_only
from genci_dist.runtime.distributed import DistEnv


class Loader:
    """Stands in for the resumable train loader: its whole state is a position."""

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


def _env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                   device=torch.device("cpu"), backend=None, pg=None)


def _train_step(model: nn.Linear, opt: CombinedOptimizer, sched: Any) -> None:
    opt.zero_grad()
    model(torch.ones(4, 3)).square().mean().backward()
    opt.step()
    sched.step()


def _cfg(data_dir: str = "data/x", d_model: int | None = None) -> JobConfig:
    extra = [] if d_model is None else ["--model.d_model", str(d_model)]
    return load_config(None, ["--data.dir", data_dir, *extra])


def test_keep_last_best_pointers_interrupted_save_and_exact_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_last=2 + best: steps 1..5 with AUCs .60 .70 – .65 .55 leave {2 (best), 4, 5};
    a save that dies after dcp.save leaves `latest` on step 5 and the .tmp unpublished; the
    resume restores step 5's weights, Adam moments, LR schedule, loader and RNG streams."""
    root = tmp_path / "checkpoints"
    env, cfg = _env(), _cfg()
    model, opt, sched, loader = _parts()
    mgr = CheckpointManager(root, env, keep_last=2, keep_best=True)
    metrics = [0.60, 0.70, None, 0.65, 0.55]
    weights = {}
    for step, metric in enumerate(metrics, start=1):
        _train_step(model, opt, sched)
        loader.pos = 10 * step
        weights[step] = model.weight.detach().clone()
        saved_opt = {k: v.clone() for k, v in
                     opt.state_dict()["state"]["dense.weight"].items()}
        mgr.save(step=step, model=model, optimizer=opt, scheduler=sched, loader=loader,
                 train_state={"step": step, "epoch": 0}, config=cfg, semantic_hash="h1",
                 metric=metric, plan=None)
    after_save = (torch.rand(3), np.random.rand(2), random.random())
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "best", "latest", "step-0000002", "step-0000004", "step-0000005"]
    assert os.readlink(root / "latest") == "step-0000005"
    assert os.readlink(root / "best") == "step-0000002"
    meta = json.loads((root / "latest" / "meta.json").read_text())
    assert (meta["step"], meta["metric"], meta["semantic_hash"]) == (5, 0.55, "h1")
    assert meta["config"]["data"]["dir"] == "data/x"

    # interrupted save: every rank's shards written, then the process dies before publish
    class Dying:
        @staticmethod
        def save(*args: Any, **kwargs: Any) -> None:
            real_dcp.save(*args, **kwargs)
            raise RuntimeError("killed after dcp.save")

        load = staticmethod(real_dcp.load)

    _train_step(model, opt, sched)
    monkeypatch.setattr(ckpt_mod, "dcp", Dying)
    with pytest.raises(RuntimeError, match="killed"):
        mgr.save(step=6, model=model, optimizer=opt, scheduler=sched, loader=loader,
                 train_state={"step": 6, "epoch": 0}, config=cfg, semantic_hash="h1",
                 metric=0.99, plan=None)
    monkeypatch.undo()
    assert os.readlink(root / "latest") == "step-0000005"
    assert os.readlink(root / "best") == "step-0000002"
    assert (root / "step-0000006.tmp" / ".metadata").is_file()
    assert not (root / "step-0000006").exists()

    # resume in "fresh" objects with perturbed RNGs
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    model2, opt2, sched2, loader2 = _parts()
    state = CheckpointManager(root, env).load_latest(
        model=model2, optimizer=opt2, scheduler=sched2, loader=loader2, config=cfg,
        semantic_hash="h1")
    assert state == {"step": 5, "epoch": 0}
    assert torch.equal(model2.weight, weights[5])
    got_opt = opt2.state_dict()["state"]["dense.weight"]
    for k, v in saved_opt.items():
        assert torch.equal(got_opt[k], v), k
    assert sched2.last_epoch == 5 and dict(opt2.optimizers)["dense"].param_groups[0][
        "lr"] == pytest.approx(0.1 / 6)
    assert loader2.pos == 50
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(again[0], after_save[0]) and np.array_equal(again[1], after_save[1])
    assert again[2] == after_save[2]

    # a later save at the same step publishes normally over the leftover .tmp
    mgr.save(step=6, model=model, optimizer=opt, scheduler=sched, loader=loader,
             train_state={"step": 6, "epoch": 0}, config=cfg, semantic_hash="h1",
             metric=0.99, plan=None)
    assert os.readlink(root / "latest") == "step-0000006"
    assert os.readlink(root / "best") == "step-0000006"
    assert not (root / "step-0000006.tmp").exists()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000005", "step-0000006"]

    # the plain-module loader follows `best` from the checkpoints folder
    plain = nn.Linear(3, 2)
    load_model_only(plain, root)
    assert torch.equal(plain.weight, model.weight)


def test_foreign_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    """Another model config, dataset or semantic-ID hash is refused before anything loads."""
    root = tmp_path / "checkpoints"
    env = _env()
    model, opt, sched, loader = _parts()
    CheckpointManager(root, env).save(
        step=1, model=model, optimizer=opt, scheduler=sched, loader=loader,
        train_state={"step": 1}, config=_cfg(d_model=32), semantic_hash="h1", metric=None,
        plan=None)
    mgr = CheckpointManager(root, env)
    kw = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
    with pytest.raises(ConfigError, match=r"step-0000001: checkpoint was written by another "
                                          r"model config or dataset: model.d_model: 32 → 48$"):
        mgr.load_latest(**kw, config=_cfg(d_model=48), semantic_hash="h1")
    with pytest.raises(ConfigError, match="another model config or dataset"):
        mgr.load_latest(**kw, config=_cfg("data/y", d_model=32), semantic_hash="h1")
    with pytest.raises(ConfigError, match=r"semantic IDs 'h1', the dataset now has 'h2'"):
        mgr.load_latest(**kw, config=_cfg(d_model=32), semantic_hash="h2")
    assert CheckpointManager(tmp_path / "none", env).load_latest(
        **kw, config=_cfg(d_model=32), semantic_hash="h1") is None
