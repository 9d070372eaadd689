"""Writes the compact layout (data_pipes/sequences.py reads it): `sequence_table` turns
protocol-ordered `Samples` into one row per user (users in a seeded random order, so a row
group is a random set of users) and `SequenceWriter` cuts such tables into row groups of about
`row_group_size` interactions (whole users) and shards of about `shard_rows` interactions,
recording each row group's sample count per split (the manifest's ``groups``: the reader plans
an epoch from the manifest alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.protocol import Samples
from data_pipes.schema import LABELS, SEQ_ITEMS, SEQ_SPLITS, SEQUENCES, TIMESTAMPS, USER

# Parquet settings, chosen by measured bytes per interaction (sequence shards rewritten with
# each setting; ML-100K / synthetic s=1): zstd, no dictionary, PLAIN: 3.55 / 5.17. Parquet's
# defaults (dictionary, snappy) 6.69 / 10.62; dictionary + zstd 4.75 / 6.88; DELTA_BINARY_PACKED
# timestamps 4.45 / 4.43 (it wins only on the generator's evenly spaced clock, loses on real
# ones); BYTE_STREAM_SPLIT timestamps and items 3.60 / 4.84. Dictionaries for labels and split
# codes change nothing (zstd already squeezes their runs).
COMPRESSION = "zstd"


def list_column(offsets: np.ndarray, values: np.ndarray, vtype: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values, type=vtype))


def sequence_table(s: Samples, user_single: dict[str, np.ndarray],
                   user_multi: dict[str, pa.ListArray], seed: int | list[int]) -> pa.Table:
    """One row per user of protocol-ordered samples (sorted by user, then position), users in
    a seeded random order. user_single / user_multi: user-side features indexed by dense id."""
    n = len(s)
    starts = np.flatnonzero(np.r_[True, s.user[1:] != s.user[:-1]]) if n else np.zeros(0, int)
    lens = np.diff(np.r_[starts, n]).astype(np.int64)
    perm = np.random.default_rng([*(seed if isinstance(seed, list) else [seed]), 7]
                                 ).permutation(starts.size)
    lens_p = lens[perm]
    offsets = np.r_[0, np.cumsum(lens_p)].astype(np.int64)
    flat = np.repeat(starts[perm] - offsets[:-1], lens_p) + np.arange(n)
    uid = s.user[starts[perm]].astype(np.int32)
    cols: dict[str, Any] = {USER: pa.array(uid, pa.int32())}
    for name, arr in user_single.items():
        cols[name] = pa.array(arr[uid], pa.int32())
    for name, lst in user_multi.items():
        cols[name] = lst.take(pa.array(uid))
    cols[SEQ_ITEMS] = list_column(offsets, s.item[flat].astype(np.int32), pa.int32())
    cols[LABELS] = list_column(offsets, s.label[flat].astype(np.int8), pa.int8())
    cols[TIMESTAMPS] = list_column(offsets, s.timestamp[flat].astype(np.int64), pa.int64())
    cols[SEQ_SPLITS] = list_column(offsets, s.split[flat].astype(np.int8), pa.int8())
    return pa.table(cols)


def _split_counts(table: pa.Table) -> np.ndarray:
    """[rows, 3] samples of each split per sequence row."""
    col = table.column(SEQ_SPLITS).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    codes = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int64)
    row = np.repeat(np.arange(len(col)), np.diff(offsets))
    out = np.zeros((len(col), 3), dtype=np.int64)
    np.add.at(out, (row, codes), 1)
    return out


class SequenceWriter:
    """Writes sequence tables, in order, to `root/sequences/STEM-KKKKK.parquet`: row groups of
    about `row_group_size` interactions (whole users; a group closes once it reaches the size,
    so only a user longer than the size makes a larger one), shards of about `shard_rows`
    interactions. `close()` returns the manifest entries {rel: {rows, row_groups, groups,
    interactions}} (`groups` = [[train, valid, test] samples per row group])."""

    def __init__(self, root: Path, row_group_size: int, shard_rows: int,
                 stem: str = "part") -> None:
        self.root, self.rgs, self.stem = root, max(1, row_group_size), stem
        self.shard_rows = max(self.rgs, shard_rows)
        (root / SEQUENCES).mkdir(exist_ok=True)
        self.pending: list[pa.Table] = []
        self.pending_n = 0
        self.writer: pq.ParquetWriter | None = None
        self.files: dict[str, dict[str, Any]] = {}
        self.cur: dict[str, Any] | None = None
        self.schema: pa.Schema | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            self.schema = self.schema or table.schema
            return
        self.schema = self.schema or table.schema
        self.pending.append(table)
        self.pending_n += _n_inter(table)
        if self.pending_n >= self.rgs:
            whole = pa.concat_tables(self.pending)
            cum = np.cumsum(np.diff(whole.column(SEQ_ITEMS).combine_chunks().offsets
                                    .to_numpy().astype(np.int64)))
            start = 0
            while start < whole.num_rows and cum[-1] - (cum[start - 1] if start else 0) \
                    >= self.rgs:
                base = cum[start - 1] if start else 0
                end = int(np.searchsorted(cum, base + self.rgs, side="left")) + 1
                self._write_group(whole.slice(start, end - start))
                start = end
            rest = whole.slice(start)
            self.pending = [rest] if rest.num_rows else []
            self.pending_n = int(cum[-1] - (cum[start - 1] if start else 0))

    def _write_group(self, group: pa.Table) -> None:
        n = _n_inter(group)
        if self.writer is None or self.cur is None or self.cur["interactions"] >= self.shard_rows:
            self._close_file()
            rel = f"{SEQUENCES}/{self.stem}-{len(self.files):05d}.parquet"
            self.writer = pq.ParquetWriter(self.root / rel, group.schema,
                                           compression=COMPRESSION, use_dictionary=False)
            self.cur = {"rows": 0, "row_groups": 0, "interactions": 0, "groups": []}
            self.files[rel] = self.cur
        assert self.writer is not None
        self.writer.write_table(group, row_group_size=max(group.num_rows, 1))
        self.cur["rows"] += group.num_rows
        self.cur["row_groups"] += 1
        self.cur["interactions"] += n
        self.cur["groups"].append(_split_counts(group).sum(axis=0).tolist())

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> dict[str, dict[str, Any]]:
        if self.pending:
            self._write_group(pa.concat_tables(self.pending))
            self.pending, self.pending_n = [], 0
        self._close_file()
        return self.files


def _n_inter(table: pa.Table) -> int:
    return int(sum(int(c.offsets[-1].as_py()) - int(c.offsets[0].as_py())
                   for c in table.column(SEQ_ITEMS).chunks if len(c)))
