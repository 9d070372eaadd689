"""The compact on-disk layout (SPEC §2, schema version 2): one row per user sequence, from which
samples and their histories are cut at read time. (Writing it: data_pipes/sequence_writer.py.)

Reading: `check_sequences` validates one row group; `cut_samples` finds the samples of one
split in it with their histories (all numpy, no loop per user or sample) and `rows_of_cut`
turns that into per-sample `Rows` (data_pipes.collate), with item-side features looked up in
items.parquet (`ItemSide`); `read_split_samples` gives a split's samples as flat arrays
(tests, verify, analysis). The streaming reader cuts the same samples with a compiled loop
and keeps features per user and per item instead (data_pipes/blocks.py).

History of the sample at position t = the items of the user's positives at positions < t, the
most recent `max_history` of them, oldest first: exactly `protocol.build_samples`' history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.collate import (
    Rows,
    _list_parts,
    _valid_mask,
    check_ids,
    check_nulls,
    check_schema,
    ranges_index,
)
from data_pipes.kernels import take_ranges
from data_pipes.protocol import SPLIT_CODES
from data_pipes.schema import (
    ITEM,
    ITEMS,
    LABELS,
    SEQ_ITEMS,
    SEQ_SPLITS,
    SEQUENCES,
    SPLITS,
    TIMESTAMPS,
    USER,
    DatasetError,
    FeatureSpec,
    feature_specs,
    load_manifest,
)
from data_pipes.sequence_writer import list_column


def user_columns(features: list[FeatureSpec]) -> list[FeatureSpec]:
    """The user-side features stored in the sequence row (user_id itself excluded)."""
    return [f for f in features if f.side == "user" and f.name != USER]


def sequence_columns(features: list[FeatureSpec], timestamps: bool = True) -> dict[str, str]:
    """{column: kind} (data_pipes.collate kinds) of a sequence shard."""
    cols = {USER: "int"}
    for f in user_columns(features):
        cols[f.name] = "ints" if f.multi else "int"
    cols |= {SEQ_ITEMS: "ints", LABELS: "ints", SEQ_SPLITS: "ints"}
    if timestamps:
        cols[TIMESTAMPS] = "ints"
    return cols


# ---- reading -------------------------------------------------------------------------------


@dataclass
class ItemSide:
    """Item-side feature values indexed by item id (row 0 = padding), from items.parquet."""

    single: dict[str, np.ndarray]                      # name → int64 [n_items + 1]
    multi: dict[str, tuple[np.ndarray, np.ndarray]]    # name → (offsets [n_items + 2], values)


def load_item_side(dataset_dir: str | Path, features: list[FeatureSpec]) -> ItemSide:
    """The item-side features of items.parquet as numpy, validated (dense ids 1..n in order,
    ids within the manifest's cardinalities, no nulls)."""
    path = Path(dataset_dir) / ITEMS
    wanted = [f for f in features if f.side == "item" and f.name != ITEM]
    try:
        table = pq.read_table(path, columns=[ITEM, *(f.name for f in wanted)])
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise DatasetError(f"{path}: cannot read the item features ({e})") from None
    where = str(path)
    check_schema(table.schema, {ITEM: "int", **{f.name: "ints" if f.multi else "int"
                                                for f in wanted}}, where)
    check_nulls(table, table.column_names, where)
    ids = table.column(ITEM).to_numpy()
    if (ids != np.arange(1, ids.size + 1)).any():
        row = int(np.flatnonzero(ids != np.arange(1, ids.size + 1))[0])
        raise DatasetError(f"{path} (row {row}): field {ITEM!r} is {int(ids[row])}, expected "
                           f"{row + 1} (dense ids 1..n in order)")
    single, multi = {}, {}
    for f in wanted:
        col = table.column(f.name).combine_chunks()
        if f.multi:
            off = col.offsets.to_numpy().astype(np.int64)
            vals = col.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]].astype(np.int64)
            check_ids(f.name, vals, f.cardinality, where, np.diff(off))
            multi[f.name] = (np.r_[0, off - off[0]], vals)
        else:
            vals = col.to_numpy().astype(np.int64)
            check_ids(f.name, vals, f.cardinality, where)
            single[f.name] = np.r_[0, vals]
    return ItemSide(single, multi)


@dataclass
class Cut:
    """The samples of one split in one sequence row group, in (row, position) order."""

    seq_row: np.ndarray      # int64 [n] sequence row of each sample
    position: np.ndarray     # int64 [n] position inside the user's sequence
    user: np.ndarray         # int64 [n]
    item: np.ndarray         # int64 [n]
    label: np.ndarray        # int64 [n]
    hist_len: np.ndarray     # int64 [n]
    hist_start: np.ndarray   # int64 [n] index of the oldest history item in `pos_items`
    pos_items: np.ndarray    # the group's positives' items, in (row, position) order
    flat: np.ndarray         # int64 [n] index of each sample among the group's positions


@dataclass
class Sequences:
    """A validated sequence row group's list columns as numpy (offsets shared by all)."""

    offsets: np.ndarray     # int64 [rows + 1], from 0
    items: np.ndarray       # the items of every position, as stored
    labels: np.ndarray      # 0/1 per position, as stored (int8 in our shards)
    codes: np.ndarray       # split code per position, as stored
    users: np.ndarray       # int64 [rows]


def check_sequences(table: pa.Table, features: list[FeatureSpec],
                    where: Callable[[int | None], str], item_card: int | None = None
                    ) -> Sequences:
    """Validates a sequence row group (types, nulls, ids of items, users and user features,
    labels 0/1, split codes in {0, 1, 2}, equal list lengths per row)."""
    cols = sequence_columns(features, timestamps=TIMESTAMPS in table.column_names)
    check_schema(table.schema, cols, where)
    check_nulls(table, list(cols), where)
    offsets, items = _list_parts(table.column(SEQ_ITEMS))
    lens = np.diff(offsets)
    vals: dict[str, np.ndarray] = {}
    for name in (LABELS, SEQ_SPLITS, TIMESTAMPS):
        if name not in table.column_names:
            continue
        other, vals[name] = _list_parts(table.column(name))
        if not np.array_equal(other, offsets):      # same offsets = same list lengths
            other = np.diff(other)
            row = int(np.flatnonzero(other != lens)[0])
            raise DatasetError(f"{where(row)}: field {name!r} has {int(other[row])} values, "
                               f"{SEQ_ITEMS!r} has {int(lens[row])}")
    # Checked and used as stored (int8 in our shards): no int64 copy of every position.
    labels, codes = vals[LABELS], vals[SEQ_SPLITS]
    for name, v, hi in ((LABELS, labels, 1), (SEQ_SPLITS, codes, 2)):
        if v.size and (v.min() < 0 or v.max() > hi):
            bad = int(np.flatnonzero((v < 0) | (v > hi))[0])
            row = int(np.searchsorted(offsets, bad, "right")) - 1
            raise DatasetError(f"{where(row)}: field {name!r} has {int(v[bad])} at position "
                               f"{bad - int(offsets[row])}, expected "
                               f"{'0 or 1' if name == LABELS else '0, 1 or 2'}")
    if item_card is not None:
        check_ids(SEQ_ITEMS, items, item_card, where, lens)
    users = table.column(USER).to_numpy().astype(np.int64) if table.num_rows else \
        np.zeros(0, np.int64)
    for f in features:      # user_id and the user-side features stored in the row
        if f.name == USER:
            check_ids(USER, users, f.cardinality, where)
        elif f.side == "user":
            if f.multi:
                off, v = _list_parts(table.column(f.name))
                check_ids(f.name, v, f.cardinality, where, np.diff(off))
            else:
                check_ids(f.name, table.column(f.name).to_numpy(), f.cardinality, where)
    return Sequences(offsets, items, labels, codes, users)


def cut_samples(table: pa.Table, split: int, max_history: int, features: list[FeatureSpec],
                where: Callable[[int | None], str], item_card: int | None = None) -> Cut:
    """Validates a sequence row group (`check_sequences`) and cuts the samples of split code
    `split` out of it (numpy; the reader's compiled cut, data_pipes.kernels.cut_block, gives
    the same samples)."""
    sq = check_sequences(table, features, where, item_card)
    offsets, items, labels, codes, users = sq.offsets, sq.items, sq.labels, sq.codes, sq.users
    row_of = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    before = np.cumsum(labels, dtype=np.int64) - labels  # positives before, in the group
    sel = np.flatnonzero(codes == split)
    rows, first = row_of[sel], offsets[row_of[sel]]      # a sample's row, its row's start
    before_sel = before[sel]
    hist_len = np.minimum(before_sel - before[first], max_history)
    return Cut(rows, sel - first, users[rows], items[sel].astype(np.int64),
               labels[sel].astype(np.int64), hist_len, before_sel - hist_len,
               items[labels == 1], sel)


def rows_of_cut(table: pa.Table, c: Cut, features: list[FeatureSpec], items: ItemSide,
                where: Callable[[int | None], str], token_rows: int | None = None,
                history: str = "dense") -> Rows:
    """The `Rows` (data_pipes.collate) of the samples `c` cut out of `table`: user-side
    features from the row, item-side ones from `items`; a sample is named by its row and
    position. `history`: "dense" = the [n, W] matrix `Rows.hist`, "flat" = `Rows.hist_flat`
    (the cut's positives as they are), "none" = neither (batches without history ids or
    tokens)."""
    if history not in ("dense", "flat", "none"):
        raise ValueError(f"history={history!r}, expected 'dense', 'flat' or 'none'")
    if token_rows is not None and c.item.size and c.item.max() >= token_rows:
        bad = int(np.flatnonzero(c.item >= token_rows)[0])
        raise DatasetError(f"{where(int(c.seq_row[bad]))}: field {SEQ_ITEMS!r} has item id "
                           f"{int(c.item[bad])} beyond the semantic-ID table "
                           f"({token_rows - 1} items)")
    n = c.item.size
    scalars = [c.user, c.item, c.label]
    columns: list[int | tuple[np.ndarray, np.ndarray]] = []
    no_missing = True
    for f in features:
        if f.multi:
            if f.side == "user":
                off, vals = _list_parts(table.column(f.name))    # ids checked by cut_samples
                ids = c.seq_row
            else:
                off, vals = items.multi[f.name]
                ids = c.item
            starts = off[ids]
            lens = off[ids + 1] - starts
            v = take_ranges(starts, lens, vals)
            keep = v != 0
            if not keep.all():
                lens = np.bincount(np.repeat(np.arange(n), lens)[keep], minlength=n)
                v = v[keep]
            columns.append((np.r_[0, np.cumsum(lens)].astype(np.int64), v))
        else:
            if f.name in (USER, ITEM):
                vals = c.user if f.name == USER else c.item
            elif f.side == "user":
                vals = table.column(f.name).to_numpy().astype(np.int64)[c.seq_row]
            else:
                vals = items.single[f.name][c.item]
            no_missing &= bool(vals.size == 0 or vals.min() > 0)
            columns.append(len(scalars))
            scalars.append(vals)
    hist = None
    if history == "dense":
        width = max(int(c.hist_len.max(initial=0)), 1)
        mask = np.take(_valid_mask(width), c.hist_len, axis=0)   # row-major = history order
        flat = ranges_index(c.hist_start, c.hist_len)
        hist = np.zeros((n, width), dtype=np.int32)
        hist[mask] = c.pos_items[flat]
    stacked = np.empty((n, len(scalars)), dtype=np.int64)
    for k, vals in enumerate(scalars):
        stacked[:, k] = vals
    seq_row, position = c.seq_row, c.position

    def sample_where(row: int | None) -> str:
        if row is None:
            return where(None)
        return f"{where(int(seq_row[row]))[:-1]}, position {int(position[row])})"

    return Rows(sample_where, stacked, columns, no_missing, hist, c.hist_len, token_rows,
                (c.hist_start, c.pos_items) if history == "flat" else None)


def concat_rows(parts: list[Rows]) -> Rows:
    """Several decoded groups as one (a shuffle block): rows in order, histories padded."""
    if len(parts) == 1:
        return parts[0]
    counts = np.cumsum([r.scalars.shape[0] for r in parts])
    columns: list[int | tuple[np.ndarray, np.ndarray]] = []
    for k, col in enumerate(parts[0].columns):
        if isinstance(col, int):
            columns.append(col)
            continue
        offs, vals, base = [np.zeros(1, np.int64)], [], 0
        for r in parts:
            o, v = r.columns[k]  # type: ignore[misc]
            offs.append(o[1:] + base)
            vals.append(v)
            base += int(o[-1])
        columns.append((np.concatenate(offs), np.concatenate(vals)))
    hist = None
    if all(r.hist is not None for r in parts):
        width = max(r.hist.shape[1] for r in parts)  # type: ignore[union-attr]
        hist = np.zeros((int(counts[-1]), width), dtype=np.int32)
        lo = 0
        for r in parts:
            h = r.hist
            hist[lo:lo + h.shape[0], :h.shape[1]] = h  # type: ignore[union-attr]
            lo += h.shape[0]  # type: ignore[union-attr]
    flat = None
    if all(r.hist_flat is not None for r in parts):
        starts, items, base = [], [], 0
        for r in parts:
            s, v = r.hist_flat  # type: ignore[misc]
            starts.append(s + base)
            items.append(v)
            base += v.size
        flat = (np.concatenate(starts), np.concatenate(items))
    wheres = [r.where for r in parts]

    def where(row: int | None) -> str:
        if row is None:
            return "; ".join(w(None) for w in wheres)  # type: ignore[operator]
        k = int(np.searchsorted(counts, row, side="right"))
        return wheres[k](row - (int(counts[k - 1]) if k else 0))  # type: ignore[operator]

    return Rows(where, np.concatenate([r.scalars for r in parts]), columns,
                all(r.no_missing for r in parts), hist,
                np.concatenate([r.hist_len for r in parts]), parts[0].token_rows, flat)


def manifest_max_history(manifest: dict[str, Any], path: Path) -> int:
    try:
        return int(manifest["protocol"]["max_history"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{path}: the manifest's protocol has no max_history") from None


def group_where(path: Path, g: int) -> Callable[[int | None], str]:
    def where(row: int | None) -> str:
        return (f"{path} (row group {g})" if row is None
                else f"{path} (row group {g}, row {row})")
    return where


def block_where(groups: list[Any], rows: list[int]) -> Callable[[int | None], str]:
    """Names row `row` of the concatenation of several row groups (objects with `path` and
    `index`; `rows` sequence rows each) by its own group; None names them all."""
    ends = np.cumsum(rows)
    wheres = [group_where(g.path, g.index) for g in groups]

    def where(row: int | None) -> str:
        if row is None:
            return "; ".join(w(None) for w in wheres)
        k = int(np.searchsorted(ends, row, side="right"))
        return wheres[k](row - (int(ends[k - 1]) if k else 0))
    return where


@dataclass
class SplitSamples:
    """A split's samples as flat arrays, in (user, position) order; `row_id` = the sample's
    row index within the split as the reader numbers it (Batch.row_ids)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray
    hist_offsets: np.ndarray
    hist_values: np.ndarray
    row_id: np.ndarray
    features: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return int(self.user.size)

    def history(self, k: int) -> list[int]:
        return self.hist_values[self.hist_offsets[k]:self.hist_offsets[k + 1]].tolist()

    def to_table(self) -> pa.Table:
        """One row per sample with the columns data_pipes.collate.decode_rows reads (user_id,
        item_id, label, timestamp, history, every feature): a batch of in-memory samples for
        data_pipes.collate.build_batch."""
        cols: dict[str, Any] = {
            USER: pa.array(self.user, pa.int32()), ITEM: pa.array(self.item, pa.int32()),
            "label": pa.array(self.label, pa.int8()),
            "timestamp": pa.array(self.timestamp, pa.int64()),
            "history": list_column(self.hist_offsets, self.hist_values, pa.int32())}
        for name, v in self.features.items():
            if name not in cols:
                cols[name] = (pa.array(v, pa.int32()) if isinstance(v, np.ndarray)
                              else list_column(v[0], v[1], pa.int32()))
        return pa.table(cols)

    def to_pylist(self) -> list[dict[str, Any]]:
        """One dict per sample: user_id, item_id, label, timestamp, history (item ids, oldest
        first) and every feature (a list for a multi-valued one), in (user, position) order."""
        cols: dict[str, list[Any]] = {
            USER: self.user.tolist(), ITEM: self.item.tolist(), "label": self.label.tolist(),
            "timestamp": self.timestamp.tolist(),
            "history": _split_lists(self.hist_offsets, self.hist_values)}
        for name, v in self.features.items():
            cols[name] = v.tolist() if isinstance(v, np.ndarray) else _split_lists(*v)
        return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]


def _split_lists(offsets: np.ndarray, values: np.ndarray) -> list[list[int]]:
    return [x.tolist() for x in np.split(values, offsets[1:-1])] if offsets.size > 1 else []


def read_split_samples(dataset_dir: str | Path, split: str,
                       max_history: int | None = None) -> SplitSamples:
    """Every sample of `split` with its history and features (validated as the reader does)."""
    dataset_dir = Path(dataset_dir)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    manifest = load_manifest(dataset_dir)
    features = feature_specs(manifest)
    mh = manifest_max_history(manifest, dataset_dir / "manifest.json")
    mh = mh if max_history is None else min(mh, max_history)
    items = load_item_side(dataset_dir, features)
    code = SPLIT_CODES[split]
    item_card = next((f.cardinality for f in features if f.name == ITEM), None)
    parts: list[tuple[Rows, np.ndarray, np.ndarray]] = []
    for rel in sorted(r for r in manifest["files"] if r.startswith(f"{SEQUENCES}/")):
        path = dataset_dir / rel
        pf = pq.ParquetFile(path)
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g)
            where = group_where(path, g)
            c = cut_samples(table, code, mh, features, where, item_card)
            rows = rows_of_cut(table, c, features, items, where, history="flat")
            ts = _list_parts(table.column(TIMESTAMPS))[1][c.flat].astype(np.int64)
            parts.append((rows, ts, c.position))
    if not parts:
        raise DatasetError(f"{dataset_dir / SEQUENCES}: no sequence shards")
    rows = concat_rows([p[0] for p in parts])
    ts = np.concatenate([p[1] for p in parts])
    n = ts.size
    user = rows.scalars[:, 0]
    order = np.lexsort((np.concatenate([p[2] for p in parts]), user))
    h_len = rows.hist_len[order]
    offsets = np.r_[0, np.cumsum(h_len)].astype(np.int64)
    assert rows.hist_flat is not None
    start, pos_items = rows.hist_flat
    hist = pos_items[ranges_index(start[order], h_len)]
    feats: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]] = {}
    for f, col in zip(features, rows.columns, strict=True):
        if isinstance(col, int):
            feats[f.name] = rows.scalars[order, col]
        else:
            o, v = col
            lens = np.diff(o)[order]
            feats[f.name] = (np.r_[0, np.cumsum(lens)].astype(np.int64),
                             v[ranges_index(o[order], lens)])
    return SplitSamples(user[order], rows.scalars[order, 1], rows.scalars[order, 2], ts[order],
                        offsets, hist.astype(np.int32), np.arange(n, dtype=np.int64)[order],
                        feats)

