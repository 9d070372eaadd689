"""Writes a prepared dataset (SPEC §2): sample shards, items/users tables and the manifest,
into a temporary folder that is published by one rename, so a failed prepare leaves nothing
that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.protocol import Samples
from data_pipes.schema import (
    HISTORY,
    ITEM,
    ITEMS,
    LABEL,
    MANIFEST,
    RAW_ID,
    SCHEMA_VERSION,
    SPLITS,
    TEXT,
    TIMESTAMP,
    USER,
    USERS,
    DatasetError,
    FeatureSpec,
)


@dataclass
class SideTable:
    """Per-entity (user or item) features indexed by dense id; row 0 is padding.

    single: name → int32 [n+1]; multi: name → pa.ListArray of length n+1 (row 0 empty)."""

    raw_ids: np.ndarray                       # object/str [n] raw id of dense id k at k-1
    single: dict[str, np.ndarray]
    multi: dict[str, pa.ListArray]
    text: list[str] | None = None             # items only: text of dense id k at k-1


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values.astype(np.int32), type=pa.int32()))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_list(user: SideTable, item: SideTable) -> list[FeatureSpec]:
    """Manifest feature order: user_id, user features, item_id, item features."""
    out: list[FeatureSpec] = []
    for side, key, tbl in (("user", USER, user), ("item", ITEM, item)):
        out.append(FeatureSpec(key, side, False, len(tbl.raw_ids) + 1))
        for name, arr in tbl.single.items():
            out.append(FeatureSpec(name, side, False, int(arr.max(initial=0)) + 1))
        for name, lst in tbl.multi.items():
            vals = lst.values.to_numpy(zero_copy_only=False)
            out.append(FeatureSpec(name, side, True, int(vals.max(initial=0)) + 1))
    return out


def sample_table(s: Samples, user: SideTable, item: SideTable,
                 features: list[FeatureSpec]) -> pa.Table:
    cols: dict[str, Any] = {
        USER: pa.array(s.user, pa.int32()), ITEM: pa.array(s.item, pa.int32()),
        LABEL: pa.array(s.label, pa.int8()), TIMESTAMP: pa.array(s.timestamp, pa.int64()),
        HISTORY: list_array(s.hist_offsets, s.hist_values),
    }
    for f in features:
        if f.name in (USER, ITEM):
            continue
        tbl, ids = (user, s.user) if f.side == "user" else (item, s.item)
        if f.multi:
            cols[f.name] = tbl.multi[f.name].take(pa.array(ids))
        else:
            cols[f.name] = pa.array(tbl.single[f.name][ids], pa.int32())
    return pa.table(cols)


def side_table(tbl: SideTable, key: str, features: list[FeatureSpec], side: str) -> pa.Table:
    n = len(tbl.raw_ids)
    ids = np.arange(1, n + 1)
    cols: dict[str, Any] = {key: pa.array(ids, pa.int32()),
                            RAW_ID: pa.array([str(r) for r in tbl.raw_ids], pa.string())}
    if tbl.text is not None:
        cols[TEXT] = pa.array(tbl.text, pa.string())
    for f in features:
        if f.side != side or f.name == key:
            continue
        cols[f.name] = (tbl.multi[f.name].take(pa.array(ids)) if f.multi
                        else pa.array(tbl.single[f.name][ids], pa.int32()))
    return pa.table(cols)


@contextmanager
def staging(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yields a temp folder next to `out_dir`; on success publishes it by rename (replacing an
    old dataset only with force), on failure removes it."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not force:
        raise DatasetError(f"{out_dir}: a prepared dataset already exists (use --force)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists() \
            and not force:
        raise DatasetError(f"{out_dir}: exists and is not a prepared dataset (use --force)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_split(tmp: Path, split: str, table: pa.Table, row_group_size: int, shard_rows: int,
                files: dict[str, Any], tick: Callable[[int], None]) -> None:
    (tmp / split).mkdir()
    shard_rows = max(row_group_size, shard_rows // row_group_size * row_group_size)
    n = table.num_rows
    for k, start in enumerate(range(0, max(n, 1), shard_rows)):
        part = table.slice(start, shard_rows)
        rel = f"{split}/part-{k:05d}.parquet"
        pq.write_table(part, tmp / rel, row_group_size=row_group_size)
        files[rel] = {"rows": part.num_rows,
                      "row_groups": pq.ParquetFile(tmp / rel).metadata.num_row_groups}
        tick(part.num_rows)


def write_dataset(out_dir: Path, *, dataset: str, protocol: dict[str, Any], samples: Samples,
                  user: SideTable, item: SideTable, row_group_size: int = 8192,
                  shard_rows: int = 1 << 18, seed: int = 0, force: bool = False,
                  source: dict[str, Any] | None = None,
                  tick: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Writes everything and returns the manifest."""
    if len(samples) == 0:
        raise DatasetError(f"{dataset}: no samples to write")
    features = feature_list(user, item)
    files: dict[str, Any] = {}
    counts: dict[str, Any] = {"samples": len(samples),
                              # table sizes (every user/item has at least one sample here)
                              "users": len(user.raw_ids), "items": len(item.raw_ids),
                              "n_users": len(user.raw_ids), "n_items": len(item.raw_ids)}
    hist_len = np.diff(samples.hist_offsets)
    with staging(Path(out_dir), force) as tmp:
        for code, split in enumerate(SPLITS):
            idx = np.flatnonzero(samples.split == code)
            if split == "train":  # readers take contiguous runs: store train globally shuffled
                idx = idx[np.random.default_rng(seed).permutation(idx.size)]
            part = samples.take(idx)
            write_split(tmp, split, sample_table(part, user, item, features), row_group_size,
                        shard_rows, files, tick)
            counts[split] = {"rows": int(idx.size), "positives": int(part.label.sum()),
                             "positive_rate": float(part.label.mean()) if idx.size else 0.0,
                             "avg_history": float(hist_len[idx].mean()) if idx.size else 0.0}
        pq.write_table(side_table(item, ITEM, features, "item"), tmp / ITEMS)
        pq.write_table(side_table(user, USER, features, "user"), tmp / USERS)
        files[ITEMS] = {"rows": len(item.raw_ids)}
        files[USERS] = {"rows": len(user.raw_ids)}
        for rel in files:   # what `genci-prepare verify` and the reader check files against
            files[rel]["bytes"] = (tmp / rel).stat().st_size
            files[rel]["sha256"] = sha256_file(tmp / rel)
        counts["positive_rate"] = float(samples.label.mean())
        counts["avg_history"] = float(hist_len.mean())
        manifest = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "protocol": protocol,
                    "counts": counts, "features": [f.to_json() for f in features],
                    "row_group_size": row_group_size, "files": files, "source": source or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
