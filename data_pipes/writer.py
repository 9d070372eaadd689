"""Writes a prepared dataset (SPEC §2): sequence shards, items/users tables and the manifest,
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
    ITEM,
    ITEMS,
    MANIFEST,
    RAW_ID,
    SCHEMA_VERSION,
    SPLITS,
    TEXT,
    USER,
    USERS,
    DatasetError,
    FeatureSpec,
)
from data_pipes.sequence_writer import SequenceWriter, list_column, sequence_table


@dataclass
class SideTable:
    """Per-entity (user or item) features indexed by dense id; row 0 is padding.

    single: name → int32 [n+1]; multi: name → pa.ListArray of length n+1 (row 0 empty)."""

    raw_ids: np.ndarray                       # object/str [n] raw id of dense id k at k-1
    single: dict[str, np.ndarray]
    multi: dict[str, pa.ListArray]
    text: list[str] | None = None             # items only: text of dense id k at k-1


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list<int32> column (side-table multi-valued features)."""
    return list_column(offsets, values.astype(np.int32), pa.int32())


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


def split_counts(samples: Samples) -> dict[str, dict[str, Any]]:
    """The manifest's per-split counts (rows, positives, positive_rate, avg_history) and,
    under "hist", the split's total history length (to merge partitions' counts)."""
    hist_len = np.diff(samples.hist_offsets)
    out = {}
    for code, split in enumerate(SPLITS):
        sel = samples.split == code
        n = int(sel.sum())
        out[split] = {"rows": n, "positives": int(samples.label[sel].sum()),
                      "hist": int(hist_len[sel].sum())}
    return out


def finish_counts(counts: dict[str, dict[str, int]], base: dict[str, Any]) -> dict[str, Any]:
    """Merged per-split {rows, positives, hist} → the manifest's `counts` (with `base`)."""
    total = sum(counts[s]["rows"] for s in SPLITS)
    out = dict(base, samples=total)
    for s in SPLITS:
        c = counts[s]
        out[s] = {"rows": c["rows"], "positives": c["positives"],
                  "positive_rate": c["positives"] / c["rows"] if c["rows"] else 0.0,
                  "avg_history": c["hist"] / c["rows"] if c["rows"] else 0.0}
    out["positive_rate"] = sum(counts[s]["positives"] for s in SPLITS) / max(total, 1)
    out["avg_history"] = sum(counts[s]["hist"] for s in SPLITS) / max(total, 1)
    return out


def write_dataset(out_dir: Path, *, dataset: str, protocol: dict[str, Any], samples: Samples,
                  user: SideTable, item: SideTable, row_group_size: int = 8192,
                  shard_rows: int = 1 << 18, seed: int = 0, force: bool = False,
                  source: dict[str, Any] | None = None,
                  tick: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Writes everything and returns the manifest."""
    if len(samples) == 0:
        raise DatasetError(f"{dataset}: no samples to write")
    features = feature_list(user, item)
    # table sizes (every user/item has at least one sample here)
    counts = finish_counts(split_counts(samples), {
        "users": len(user.raw_ids), "items": len(item.raw_ids),
        "n_users": len(user.raw_ids), "n_items": len(item.raw_ids)})
    with staging(Path(out_dir), force) as tmp:
        seqs = SequenceWriter(tmp, row_group_size, shard_rows)
        seqs.add(sequence_table(samples, user.single, user.multi, seed))
        files: dict[str, Any] = seqs.close()
        tick(len(samples))
        pq.write_table(side_table(item, ITEM, features, "item"), tmp / ITEMS)
        pq.write_table(side_table(user, USER, features, "user"), tmp / USERS)
        files[ITEMS] = {"rows": len(item.raw_ids)}
        files[USERS] = {"rows": len(user.raw_ids)}
        for rel in files:   # what `genci-prepare verify` and the reader check files against
            files[rel]["bytes"] = (tmp / rel).stat().st_size
            files[rel]["sha256"] = sha256_file(tmp / rel)
        manifest = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "protocol": protocol,
                    "counts": counts, "features": [f.to_json() for f in features],
                    "row_group_size": row_group_size, "files": files, "source": source or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
