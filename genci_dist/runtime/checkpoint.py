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

import io
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torchrec.distributed.types import ShardingPlan

from genci_dist.config import JobConfig, load_config
from genci_dist.config_loader import ConfigError, to_plain
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.dcp_reader import NoCopyReader
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import plan_to_dict

META = "meta.json"
TRAIN_STATE = "train_state.pt"
DCP_METADATA = ".metadata"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or not safely loadable (one line)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint at all where one was asked for (also a FileNotFoundError)."""


# ---- loading without running code ------------------------------------------------------------
_META_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata`: its own dataclasses and enums, torch.Size, dtypes, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (module == "torch.distributed.checkpoint.metadata"
              or (module, name) in _META_CLASSES
              or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path) -> Metadata:
    with open(path, "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(md).__name__}, not DCP Metadata")
    return md


class SafeReader(NoCopyReader):
    """DCP's file reader whose `.metadata` goes through `_MetadataUnpickler`, and which reads a
    whole stored tensor straight into its destination (`NoCopyReader`: loading a checkpoint
    does not hold a second copy of a table shard)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries (LR schedule) with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state: dict[str, Any], ckpt: Path, pg: Any = None) -> None:
    """dcp.load through SafeReader/SafeLoadPlanner; a failed read (DCP raises a
    BaseException carrying every rank's traceback) → CheckpointError naming the cause."""
    try:
        dcp.load(state, checkpoint_id=str(ckpt), storage_reader=SafeReader(str(ckpt)),
                 planner=SafeLoadPlanner(), process_group=pg)
    except CheckpointException as e:
        first = next(iter(e.failures.values()), e) if e.failures else e
        cause = first[0] if isinstance(first, tuple) else first
        raise CheckpointError(f"{ckpt}: load failed ({type(cause).__name__}: "
                              f"{_one_line(cause)})") from None


# numpy's array rebuild: only for train_state.pt files written before RNG states were tensors
_OLD_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,  # type: ignore[attr-defined]
              np.dtypes.UInt32DType]


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch's weights_only refusal is a paragraph; its informative line names the global
    key = next((ln for ln in lines if any(m in ln for m in (
        "Unsupported global", "Unsupported operand", "but got"))), lines[0])
    return key if len(key) <= 200 else key[:197] + "..."


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """train_state.pt with weights_only=True; CheckpointError when missing or refused."""
    path = Path(ckpt) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: {TRAIN_STATE} is missing")
    try:
        with torch.serialization.safe_globals(_OLD_NUMPY):
            blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: not loadable, say why
        raise CheckpointError(f"{path}: not safely loadable ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    if not (isinstance(blob, dict) and {"train", "ranks", "world_size"} <= blob.keys()):
        raise CheckpointError(f"{path}: not a train state (keys train, ranks, world_size)")
    return blob


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                      int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _plain(obj: Any) -> Any:
    """numpy scalars/arrays → Python values/tensors, recursively (loader states)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---- inspection and fallback -----------------------------------------------------------------
def _read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None
    if not isinstance(meta, dict) or not {"step", "fingerprint", "config"} <= meta.keys():
        raise CheckpointError(f"{path}: not a checkpoint's meta (needs step, fingerprint, "
                              "config)")
    return meta


def inspect_checkpoint(ckpt: str | Path, train_state: bool = False) -> dict[str, Any]:
    """meta.json of a complete, readable checkpoint folder, else CheckpointError (one line):
    meta.json parses, `.metadata` unpickles safely, every shard it names is there and long
    enough, and (train_state) train_state.pt loads safely. Reads no tensor data.

    A folder that is not one of the trainer's `step-N` checkpoints and holds a bare DCP save
    (`.metadata`, no meta.json: e.g. initial weights written with `dcp.save`) passes with
    meta {} — its weights load (`load_model_sharded`); its config does not exist."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointNotFound(f"{ckpt}: no checkpoint folder")
    bare = (not (ckpt / META).exists() and (ckpt / DCP_METADATA).is_file()
            and not ckpt.name.startswith("step-") and not train_state)
    meta = {} if bare else _read_meta(ckpt)
    md_path = ckpt / DCP_METADATA
    if not md_path.is_file():
        raise CheckpointError(f"{ckpt}: DCP {DCP_METADATA} is missing")
    try:
        md = read_dcp_metadata(md_path)
    except Exception as e:  # noqa: BLE001 - truncated, garbled or foreign
        raise CheckpointError(f"{md_path}: unreadable ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    if not need:
        raise CheckpointError(f"{md_path}: names no shard files")
    for rel, n in sorted(need.items()):
        shard = ckpt / rel
        if not shard.is_file():
            raise CheckpointError(f"{ckpt}: shard {rel} is missing")
        size = shard.stat().st_size
        if size < n:
            raise CheckpointError(f"{ckpt}: shard {rel} is truncated ({size} of {n} bytes)")
    if train_state:
        load_train_state(ckpt)
    return meta


_warned: set[str] = set()
# checkpoints that passed inspection but failed to load in this process (garbled bytes inside a
# shard of the right length), with the reason: the next resolve() skips them
_failed: dict[Path, str] = {}


def _warn_skipped(skipped: list[str], using: Path) -> None:
    """One line per skipped checkpoint, once per process, on rank 0 only."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    for reason in skipped:
        line = f"[checkpoint] warning: skipped damaged checkpoint ({reason}); using {using.name}"
        if line not in _warned:
            _warned.add(line)
            print(line, file=sys.stderr, flush=True)


def _complete_steps(root: Path) -> list[Path]:
    """step-N folders (not .tmp), newest first."""
    return sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                  key=lambda p: p.name, reverse=True)


def _candidates(root: Path, link: str) -> list[Path]:
    """`link`'s target first, then the other step folders: newest first for `latest`, best
    metric first (then newest) for `best`."""
    first = [(root / link).resolve()] if (root / link).is_symlink() else []
    rest = [p for p in _complete_steps(root) if p.resolve() not in first]
    if link == "best":
        def score(p: Path) -> float:
            try:
                m = json.loads((p / META).read_text()).get("metric")
                return float("-inf") if m is None else float(m)
            except (OSError, ValueError, AttributeError, TypeError):
                return float("-inf")
        rest.sort(key=score, reverse=True)  # stable: equal scores stay newest first
    return first + rest


def _first_good(root: Path, link: str, train_state: bool) -> tuple[Path, dict[str, Any]] | None:
    """The first complete checkpoint among `_candidates`; None when there is none at all;
    CheckpointError (naming the first reason) when all there are are damaged."""
    skipped: list[str] = []
    for cand in _candidates(root, link):
        if cand.resolve() in _failed:
            skipped.append(_failed[cand.resolve()])
            continue
        try:
            meta = inspect_checkpoint(cand, train_state=train_state)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        _warn_skipped(skipped, cand)
        return cand, meta
    if skipped:
        raise CheckpointError(f"{root}: no complete checkpoint left ({len(skipped)} damaged; "
                              f"{skipped[0]})")
    return None


def resolve(path: str | Path) -> Path:
    """A complete checkpoint folder from itself, from its `best`/`latest` link (damaged →
    the next complete one, with a warning), from a checkpoints/ folder or a run folder (best,
    else latest). A damaged folder named explicitly → CheckpointError."""
    p = Path(path)
    if p.name in ("best", "latest") and p.is_symlink():
        found = _first_good(p.parent, p.name, train_state=False)
        if found is None:
            raise CheckpointNotFound(f"{path}: dangling link, no checkpoint next to it")
        return found[0].resolve()
    if p.is_dir() and ((p / DCP_METADATA).exists() or (p / META).exists()
                       or p.name.startswith("step-") or any(p.glob("*.distcp"))):
        if p.resolve() in _failed:
            raise CheckpointError(_failed[p.resolve()])
        inspect_checkpoint(p)
        return p.resolve()
    for root in (p, p / "checkpoints"):
        if (root / "best").is_symlink() or (root / "latest").is_symlink() \
                or _complete_steps(root):
            link = "best" if (root / "best").is_symlink() else "latest"
            found = _first_good(root, link, train_state=False)
            if found is not None:
                return found[0].resolve()
    raise CheckpointNotFound(f"{path}: no checkpoint (no .metadata, best or latest) found")


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
