"""A checkpoint folder on disk: its file names, the project's checkpoint errors, loading without
running code (`SafeReader` for DCP's pickled `.metadata`, `SafeLoadPlanner` and
`load_train_state` with weights_only=True), and finding the newest complete checkpoint
(`inspect_checkpoint`, `resolve`, the fallback past damaged ones). `genci_dist.runtime.checkpoint`
(saving, resuming, the manager) builds on it; see its docstring for the whole design.
"""

from __future__ import annotations

import io
import json
import pickle
import random
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

from genci_dist.runtime.dcp_reader import NoCopyReader

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
