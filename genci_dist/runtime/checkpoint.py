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

Loading runs no code from the files. train_state.pt holds only tensors and plain values (RNG
states as tensors/lists) and is read with `torch.load(weights_only=True)`. DCP itself reads
`.metadata` with a bare `pickle.load` and its non-tensor entries with
`torch.load(weights_only=False)` (torch 2.13, filesystem.py / default_planner.py); here they go
through `SafeReader` (an unpickler that admits only DCP's metadata classes, torch.Size and
dtypes) and `SafeLoadPlanner` (weights_only=True). A file holding anything else is refused as
damaged. Tensor shards DCP already reads with weights_only=True.

Damage: before a checkpoint is used it is inspected (meta.json parses, `.metadata` unpickles
safely, every shard file it names exists and is long enough, train_state.pt loads safely).
`resume = auto` and `resolve()` (evaluate, reports) skip a damaged checkpoint behind `latest`
/ `best` for the newest complete one (for `best`: the best-scoring complete one), with one
warning line naming what was skipped and why; an explicitly named checkpoint folder that is
damaged, or nothing complete left, raises `CheckpointError` (one line). A checkpoint of another
model config/dataset is refused (ConfigError) naming only the fields that differ.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.types import ShardingPlan

from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError, to_plain
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.checkpoint_files import (  # noqa: F401 - re-exported
    DCP_METADATA,
    META,
    TRAIN_STATE,
    CheckpointError,
    CheckpointNotFound,
    SafeLoadPlanner,
    SafeReader,
    _candidates,
    _dcp_load,
    _failed,
    _first_good,
    _plain,
    _read_meta,
    _rng_state,
    _set_rng_state,
    _warn_skipped,
    _warned,
    inspect_checkpoint,
    load_train_state,
    read_dcp_metadata,
    resolve,
)
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import plan_to_dict


# ---- fingerprint -------------------------------------------------------------------------------
def _identity(fp: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without the model's execution-only fields (also an older, fuller one)."""
    skip = ModelConfig.EXECUTION_FIELDS
    return {**fp, "model": {k: v for k, v in fp["model"].items() if k not in skip}}


def fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What must match for a checkpoint to load: the model section (its execution-only
    fields aside), the dataset and the history length the model was trained on."""
    return _identity({"model": to_plain(cfg.model), "data_dir": cfg.data.dir,
                      "data": {"max_history": cfg.data.max_history}})


def _dotted(fp: dict[str, Any]) -> dict[str, Any]:
    out = {f"model.{k}": v for k, v in _identity(fp).get("model", {}).items()}
    if "data_dir" in fp:
        out["data.dir"] = fp["data_dir"]
    out |= {f"data.{k}": v for k, v in (fp.get("data") or {}).items()}
    return out


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key: old → new` for every field both fingerprints have and that differs; a
    field one of them lacks (written by an older or newer version) is unknown, not
    different."""
    a, b = _dotted(stored), _dotted(current)
    return [f"{k}: {json.dumps(a[k])} → {json.dumps(b[k])}"
            for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


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
        per_rank = self.env.all_gather_object({"loader": _plain(loader.state_dict()),
                                               "rng": _rng_state()})
        if self.env.rank == 0:
            torch.save({"train": _plain(train_state), "ranks": per_rank,
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
        try:
            m = json.loads((link / META).read_text()).get("metric")
        except (OSError, ValueError, AttributeError):
            return float("-inf")  # none yet, or damaged: any new score replaces it
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
    def _resumable(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint (`latest` unless damaged); None without any."""
        if not self.root.is_dir():
            return None
        return _first_good(self.root, "latest", train_state=True)

    def latest_sharding_types(self) -> dict[str, str]:
        """{table: sharding type} of the plan the checkpoint a resume will use was saved
        with; {} without one."""
        found = self._resumable()
        if found is None:
            return {}
        plan = found[1].get("plan") or {}
        return {table: p["sharding_type"] for tables in plan.values()
                for table, p in tables.items()}

    def _check(self, ckpt: Path, config: JobConfig, semantic_hash: str,
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = _read_meta(ckpt) if meta is None else meta
        diffs = fingerprint_differences(meta["fingerprint"], fingerprint(config))
        if diffs:
            raise ConfigError(f"{ckpt}: checkpoint was written by another model config or "
                              f"dataset: {', '.join(diffs)}")
        if meta.get("semantic_hash", "") != semantic_hash:
            raise ConfigError(f"{ckpt}: checkpoint used semantic IDs {meta['semantic_hash']!r}, "
                              f"the dataset now has {semantic_hash!r}")
        return meta

    def load_latest(self, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    loader: Any, config: JobConfig, semantic_hash: str) -> dict[str, Any] | None:
        """Restores everything from the newest complete checkpoint (`latest`, or the one
        before it when damaged: one warning line); returns the train state, or None if there
        is no checkpoint. All checkpoints damaged → CheckpointError; another config →
        ConfigError naming the differing fields."""
        skipped: list[str] = []
        for ckpt in _candidates(self.root, "latest"):
            try:
                meta = inspect_checkpoint(ckpt, train_state=True)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            self._check(ckpt, config, semantic_hash, meta)
            try:  # inspection cannot see garbled bytes inside a shard of the right length
                load_full(model, optimizer, scheduler, ckpt, self.env)
                blob = load_train_state(ckpt)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            _warn_skipped(skipped, ckpt)
            break
        else:
            if skipped:
                raise CheckpointError(f"{self.root}: no complete checkpoint left "
                                      f"({len(skipped)} damaged; {skipped[0]})")
            return None
        if blob["world_size"] == self.env.world_size:
            mine = blob["ranks"][self.env.rank]
            loader.load_state_dict(mine["loader"])
            _set_rng_state(mine["rng"])
        elif self.env.rank == 0:
            print(f"[resume] world size {blob['world_size']} → {self.env.world_size}: the "
                  "loader restarts the current epoch", flush=True)
        return blob["train"]

    def load_best(self, model: torch.nn.Module) -> bool:
        if not (self.root / "best").is_symlink():
            return False
        load_model_sharded(model, self.root / "best")
        return True


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def load_full(model: torch.nn.Module, optimizer: Any, scheduler: Any, ckpt: Path,
              env: DistEnv) -> None:
    """Model + optimizer + LR schedule into a DMP (any plan/world size: DCP reshards)."""
    optimizer.init_state()  # torch optimizers create state lazily; DCP needs it to exist
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    _dcp_load(state, ckpt, env.pg)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    # The schedule in a load of its own: a rank without a shard of some table (table-wise)
    # does not request that key, DCP then falls back to its pre-2.4 key format, in which the
    # scheduler's non-tensor entries are one key "sched" the checkpoint does not have.
    sched = {"sched": scheduler.state_dict()}
    _dcp_load(sched, ckpt, env.pg)
    scheduler.load_state_dict(sched["sched"])
    # KeyedOptimizer state carries no param_groups and a scheduler's load_state_dict does not
    # touch the optimizer: without this the first resumed step would run at the lr of step 0.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                         strict=True):
        group["lr"] = lr


def load_model_sharded(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Model weights only, into a DMP or a plain module (with or without a process group)."""
    sd = model.state_dict()
    while True:  # ends: every failure adds a checkpoint resolve() skips from then on
        found = resolve(ckpt)
        try:
            _dcp_load({"model": sd}, found)
            break
        except CheckpointError as e:
            _failed[found] = str(e)
    model.load_state_dict(sd)


def load_model_only(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Into a plain unsharded module in one process with no process group (DCP no-dist)."""
    load_model_sharded(model, ckpt)


def load_checkpoint_config(ckpt: str | Path, overrides: list[str]) -> JobConfig:
    """The config a checkpoint was trained with, plus CLI overrides (e.g. a new sharding)."""
    import tempfile

    import tomli_w

    meta = _read_meta(resolve(ckpt))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(tomli_w.dumps(meta["config"]))
        return load_config(path, overrides)
