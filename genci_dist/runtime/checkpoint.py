"""The one module that owns checkpoints (torch.distributed.checkpoint).

Layout of `<run>/checkpoints/`::

    step-0000120/        .metadata + one __R_0.distcp per rank (model shards, optimizer state)
                         meta.json (step, epoch, metric, config, semantic-ID hash, plan)
                         train_state.pt (train counters, per-rank loader + RNG states)
    latest -> step-...   relative symlinks, replaced atomically
    best   -> step-...

A save goes to `step-N.tmp/`, every rank writes its shards, a barrier, then rank 0 writes the
sidecars and publishes by rename + symlink swap: a crash at any point before leaves `latest`
on the previous complete checkpoint. Loader/RNG state is gathered to rank 0 (a few KB) and
restored per rank when the world size is unchanged; at another world size the epoch plan
differs, so the loader restarts the current epoch (said in the log), and the trainer keeps the
checkpoint's sharding types (`latest_sharding_types`, sharding.keep_sharding_types) so that the
optimizer state has the same layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.types import ShardingPlan

from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError, to_plain
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import plan_to_dict

META = "meta.json"
TRAIN_STATE = "train_state.pt"


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from itself, a checkpoints/ folder (best, else latest) or a run."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return p.resolve()
    for cand in (p / "best", p / "latest", p / "checkpoints" / "best",
                 p / "checkpoints" / "latest"):
        if (cand / ".metadata").is_file():
            return cand.resolve()
    raise FileNotFoundError(f"{path}: no checkpoint (no .metadata, best or latest) found")


def _identity(fp: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without the model's execution-only fields (also an older, fuller one)."""
    skip = ModelConfig.EXECUTION_FIELDS
    return {**fp, "model": {k: v for k, v in fp["model"].items() if k not in skip}}


def fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What must match for a checkpoint to load: the model section (its execution-only
    fields aside) and the dataset."""
    return _identity({"model": to_plain(cfg.model), "data_dir": cfg.data.dir})


class CheckpointManager:
    def __init__(self, root: Path, env: DistEnv, keep_last: int = 2,
                 keep_best: bool = True) -> None:
        self.root = Path(root)
        self.env = env
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best

    # ---- save ---------------------------------------------------------------------------
    def save(self, *, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
             loader: Any, train_state: dict[str, Any], config: JobConfig, semantic_hash: str,
             metric: float | None, plan: Any) -> Path:
        name = f"step-{step:07d}"
        final = self.root / name
        tmp = self.root / f"{name}.tmp"
        if self.env.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.env.barrier()
        state = {"model": model.state_dict(), "optim": optimizer.state_dict(),
                 "sched": scheduler.state_dict()}
        dcp.save(state, checkpoint_id=str(tmp), process_group=self.env.pg)
        per_rank = self.env.all_gather_object({"loader": loader.state_dict(),
                                               "rng": _rng_state()})
        if self.env.rank == 0:
            torch.save({"train": train_state, "ranks": per_rank,
                        "world_size": self.env.world_size}, tmp / TRAIN_STATE)
            meta = {"step": step, "epoch": train_state.get("epoch"), "metric": metric,
                    "semantic_hash": semantic_hash, "world_size": self.env.world_size,
                    "fingerprint": fingerprint(config), "config": config.to_dict(),
                    "plan": plan_to_dict(plan) if isinstance(plan, ShardingPlan) else plan}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _swap_link(self.root / "latest", name)
            if metric is not None and self.keep_best and metric > self._best_metric():
                _swap_link(self.root / "best", name)
            self._prune()
        self.env.barrier()
        return final

    def _best_metric(self) -> float:
        link = self.root / "best"
        if not (link / META).is_file():
            return float("-inf")
        m = json.loads((link / META).read_text()).get("metric")
        return float("-inf") if m is None else float(m)

    def _prune(self) -> None:
        keep = set()
        for link in ("latest", "best"):
            if (self.root / link).is_symlink():
                keep.add(os.readlink(self.root / link))
        done = sorted(p.name for p in self.root.glob("step-*") if not p.name.endswith(".tmp"))
        keep.update(done[-self.keep_last:])
        for name in done:
            if name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------
    def latest_sharding_types(self) -> dict[str, str]:
        """{table: sharding type} of the plan `latest` was saved with; {} without one."""
        meta = self.root / "latest" / META
        if not meta.is_file():
            return {}
        plan = json.loads(meta.read_text()).get("plan") or {}
        return {table: p["sharding_type"] for tables in plan.values()
                for table, p in tables.items()}

    def _check(self, ckpt: Path, config: JobConfig, semantic_hash: str) -> dict[str, Any]:
        meta = json.loads((ckpt / META).read_text())
        expected = fingerprint(config)
        if _identity(meta["fingerprint"]) != expected:
            raise ConfigError(f"{ckpt}: checkpoint was written by another model config or "
                              f"dataset ({meta['fingerprint']} vs {expected})")
        if meta.get("semantic_hash", "") != semantic_hash:
            raise ConfigError(f"{ckpt}: checkpoint used semantic IDs {meta['semantic_hash']!r}, "
                              f"the dataset now has {semantic_hash!r}")
        return meta

    def load_latest(self, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    loader: Any, config: JobConfig, semantic_hash: str) -> dict[str, Any] | None:
        """Restores everything from `latest`; returns the train state, or None if none."""
        link = self.root / "latest"
        if not (link / ".metadata").is_file():
            return None
        ckpt = link.resolve()
        self._check(ckpt, config, semantic_hash)
        load_full(model, optimizer, scheduler, ckpt, self.env)
        blob = torch.load(ckpt / TRAIN_STATE, weights_only=False)
        if blob["world_size"] == self.env.world_size:
            mine = blob["ranks"][self.env.rank]
            loader.load_state_dict(mine["loader"])
            _set_rng_state(mine["rng"])
        elif self.env.rank == 0:
            print(f"[resume] world size {blob['world_size']} → {self.env.world_size}: the "
                  "loader restarts the current epoch", flush=True)
        return blob["train"]

    def load_best(self, model: torch.nn.Module) -> bool:
        link = self.root / "best"
        if not (link / ".metadata").is_file():
            return False
        load_model_sharded(model, link.resolve())
        return True


def load_full(model: torch.nn.Module, optimizer: Any, scheduler: Any, ckpt: Path,
              env: DistEnv) -> None:
    """Model + optimizer + LR schedule into a DMP (any plan/world size: DCP reshards)."""
    optimizer.init_state()  # torch optimizers create state lazily; DCP needs it to exist
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), process_group=env.pg)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    # The schedule in a load of its own: a rank without a shard of some table (table-wise)
    # does not request that key, DCP then falls back to its pre-2.4 key format, in which the
    # scheduler's non-tensor entries are one key "sched" the checkpoint does not have.
    sched = {"sched": scheduler.state_dict()}
    dcp.load(sched, checkpoint_id=str(ckpt), process_group=env.pg)
    scheduler.load_state_dict(sched["sched"])
    # KeyedOptimizer state carries no param_groups and a scheduler's load_state_dict does not
    # touch the optimizer: without this the first resumed step would run at the lr of step 0.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                         strict=True):
        group["lr"] = lr


def load_model_sharded(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Model weights only, into a DMP or a plain module (with or without a process group)."""
    sd = model.state_dict()
    dcp.load({"model": sd}, checkpoint_id=str(resolve(ckpt)))
    model.load_state_dict(sd)


def load_model_only(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Into a plain unsharded module in one process with no process group (DCP no-dist)."""
    load_model_sharded(model, ckpt)


def load_checkpoint_config(ckpt: str | Path, overrides: list[str]) -> JobConfig:
    """The config a checkpoint was trained with, plus CLI overrides (e.g. a new sharding)."""
    import tempfile

    import tomli_w

    meta = json.loads((resolve(ckpt) / META).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(tomli_w.dumps(meta["config"]))
        return load_config(path, overrides)
