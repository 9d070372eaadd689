"""Rows → `Batch`: every id/padding/code-lookup step, in numpy, before the model.

Two steps, so the per-batch work is only gathers:

- `decode_rows` turns a pyarrow Table of sample rows (a whole row group in the reader) into
  validated numpy columns once: strict column types (`check_schema`: integer ids, an integer
  or bool label, lists of integers; never a cast from text or floats), no nulls
  (`check_nulls`), ids checked against the manifest, labels against {0, 1} (NaN/inf refused),
  histories truncated to `max_history` and laid out as a dense left-aligned 0-padded matrix,
  multi-valued features as offsets/values with padding ids dropped. A row group feeds many
  batches, so validating and decoding it once (not once per batch, after an Arrow `take`)
  is most of the reader's speed.
- `gather_batch` builds a Batch (layout in data_pipes/batch.py) from rows picked out of one or
  more decoded tables by numpy fancy indexing, and looks the semantic-ID tokens up in a
  per-item token table (`load_item_tokens`), so the model never maps ids to codes itself.

`build_batch` = both steps on one table (tests, parity checks). The streaming reader builds
its batches from blocks instead (data_pipes/blocks.py: features looked up per user and per
item, compiled passes), held by tests to exactly `gather_batch`'s Batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipes.batch import Batch, alloc_storage
from data_pipes.item_tokens import (  # noqa: F401 - re-exported
    TOKEN_DTYPE,
    build_item_tokens,
    item_tokens_file,
    load_item_tokens,
)
from data_pipes.kernels import fill_histories, take_ranges
from data_pipes.schema import (
    HISTORY,
    HISTORY_FEATURE,
    ITEM,
    LABEL,
    USER,
    DatasetError,
    FeatureSpec,
)

_I64, _F32, _TOK = np.dtype(np.int64), np.dtype(np.float32), np.dtype(TOKEN_DTYPE)


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1] starting at 0, values as stored) of a list<int32> column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return offsets - offsets[0], values


def ranges_index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The flat index of the ranges [starts[i], starts[i] + lens[i]) one after another (the
    values of picked rows of an offsets/values list column, in row order)."""
    ends = np.cumsum(lens)
    return np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if lens.size else 0)


def _np(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy() if col.num_chunks == 1 else col.combine_chunks().to_numpy()


Where = str | Callable[[int], str]


def _at(where: Where, row: int | None) -> str:
    """Names the source of table row `row`, or of the whole table when row is None (a
    string, or a locator from the reader taking the row or None)."""
    if callable(where):
        return where(row)
    return where if row is None else f"{where} (batch row {row})"


# What every sample column must hold (strict types: a label stored as text, or ids stored as
# floats, are refused rather than cast). Kinds: "int" = any integer type; "label" = integer or
# bool, 0/1 (a floating column is refused too, after its values are checked so a NaN is named
# by row); "ints" = list of integers.
_KINDS = {"int": "an integer type", "label": "an integer or bool type (0/1)",
          "ints": "a list of an integer type"}


def sample_columns(features: list[FeatureSpec]) -> dict[str, str]:
    """{column: kind} of the sample columns a Batch is built from, in manifest order."""
    cols = {USER: "int", ITEM: "int", LABEL: "label", HISTORY: "ints"}
    for f in features:
        cols.setdefault(f.name, "ints" if f.multi else "int")
    return cols


def _kind_ok(kind: str, t: pa.DataType) -> bool:
    if kind == "ints":
        return ((pa.types.is_list(t) or pa.types.is_large_list(t))
                and pa.types.is_integer(t.value_type))
    if kind == "label":
        return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)
    return pa.types.is_integer(t)


def check_schema(schema: pa.Schema, columns: dict[str, str], where: Where) -> None:
    """Every column of `columns` ({name: kind}) present with its kind of type, or a
    DatasetError naming the table and the column (missing columns all at once)."""
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise DatasetError(f"{_at(where, None)}: missing column(s) {missing}")
    for name, kind in columns.items():
        t = schema.field(name).type
        if not _kind_ok(kind, t):
            raise DatasetError(f"{_at(where, None)}: column {name!r} is {t}, expected "
                               f"{_KINDS[kind]}")


def check_nulls(table: pa.Table, columns: list[str], where: Where) -> None:
    """No null value, no null list and no null list element in `columns` (0 is padding,
    an empty list an empty history: a null is always damage), or a DatasetError naming the
    row and the column."""
    for name in columns:
        col = table.column(name)
        if col.null_count:
            row = int(np.flatnonzero(_np(col.is_null()))[0])
            raise DatasetError(f"{_at(where, row)}: field {name!r} is null")
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            continue
        base = 0
        for chunk in col.chunks:          # the child's null count is cached: cheap when 0
            if chunk.values.null_count:
                offsets = chunk.offsets.to_numpy().astype(np.int64)
                vals = chunk.values.slice(offsets[0], offsets[-1] - offsets[0])
                nulls = np.flatnonzero(vals.is_null().to_numpy(zero_copy_only=False))
                if nulls.size:
                    bad = int(nulls[0])
                    row = int(np.searchsorted(offsets - offsets[0], bad, "right")) - 1
                    raise DatasetError(
                        f"{_at(where, base + row)}: field {name!r} has a null element "
                        f"(position {bad - int(offsets[row] - offsets[0])})")
            base += len(chunk)


def check_ids(name: str, values: np.ndarray, cardinality: int, where: Where,
              lengths: np.ndarray | None = None) -> None:
    """`lengths` [n] = per-row list lengths of a list column's flat `values`; None for scalar
    columns (values[k] is table row k)."""
    if values.size and (values.min() < 0 or values.max() >= cardinality):
        bad = int(np.flatnonzero((values < 0) | (values >= cardinality))[0])
        row = bad if lengths is None else int(np.searchsorted(np.cumsum(lengths), bad, "right"))
        raise DatasetError(f"{_at(where, row)}: field {name!r} has id {int(values[bad])} "
                           f"outside [0, {cardinality}) declared in the manifest")


@dataclass
class Rows:
    """Decoded, validated sample rows (see `decode_rows`); batches gather rows out of it."""

    where: Where               # names a row of this table in errors
    # [n, 3 + scalar features] int64: user, item, label (0/1, validated), then every scalar
    # feature in manifest order, so one row gather picks them all for a batch.
    scalars: np.ndarray
    # Per feature in manifest order: its row in `scalars` (ids; 0 = missing → empty bag), or
    # a multi-valued feature's (offsets [n+1] int64, values) with padding ids dropped.
    columns: list[int | tuple[np.ndarray, np.ndarray]]
    no_missing: bool           # no scalar feature has a 0 id: every scalar bag holds one id
    hist: np.ndarray | None    # [n, W] int32 (int64 past int32 ids), left-aligned, 0-padded;
    #                            W = longest kept history; None if not decoded (dense=False)
    hist_len: np.ndarray       # [n] int64 (after max_history)
    token_rows: int | None     # item ids were checked to index a token table this long
    # The histories as (start [n] int64, items): row k's history is
    # items[start[k]:start[k] + hist_len[k]], oldest first (the "flat" layout of the sequence
    # reader, instead of `hist`: no [n, W] matrix to build per block, and a batch gathers
    # only the items of its own histories); None when `hist` (or nothing) holds them.
    hist_flat: tuple[np.ndarray, np.ndarray] | None = None


def decode_rows(table: pa.Table, features: list[FeatureSpec], where: Where,
                max_history: int | None = None, token_rows: int | None = None,
                dense_history: bool = True) -> Rows:
    """Validate and decode sample rows once. `where` names a row in errors; `max_history`
    keeps only the most recent items of longer stored histories (shorter sequences at read
    time); `token_rows` = rows of the semantic-ID table (item ids must index it).
    dense_history=False skips the dense history matrix (`hist` is None) for batches that
    read neither the history's ids nor its tokens (DeepFM, DCNv2): its lengths and its ids'
    validation stay."""
    n = table.num_rows
    columns = sample_columns(features)
    check_schema(table.schema, columns, where)
    check_nulls(table, list(columns), where)
    labels = _np(table.column(LABEL)).astype(np.float32)
    ok = (labels == 0.0) | (labels == 1.0)      # NaN fails both
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise DatasetError(f"{_at(where, bad)}: label {float(labels[bad])} is not 0 or 1")
    if pa.types.is_floating(table.schema.field(LABEL).type):   # 0.0/1.0 only, still refused
        raise DatasetError(f"{_at(where, None)}: column {LABEL!r} is "
                           f"{table.schema.field(LABEL).type}, expected {_KINDS['label']}")

    items = _np(table.column(ITEM))
    scalars = [_np(table.column(USER)), items, labels]
    columns: list[int | tuple[np.ndarray, np.ndarray]] = []
    no_missing = True
    for f in features:
        if f.multi:
            offsets, vals = _list_parts(table.column(f.name))
            lens = np.diff(offsets)
            check_ids(f.name, vals, f.cardinality, where, lens)
            keep = vals != 0
            if not keep.all():  # drop padding ids inside bags
                vals = vals[keep]
                lens = np.bincount(np.repeat(np.arange(n), lens)[keep], minlength=n)
                offsets = np.r_[0, np.cumsum(lens)]
            columns.append((offsets, vals))
        else:
            vals = _np(table.column(f.name))
            check_ids(f.name, vals, f.cardinality, where)
            no_missing &= bool(vals.size == 0 or vals.min() > 0)
            columns.append(len(scalars))
            scalars.append(vals)

    offsets, h_vals = _list_parts(table.column(HISTORY))
    h_len = np.diff(offsets)
    if max_history is not None and h_len.size and h_len.max() > max_history:
        keep_len = np.minimum(h_len, max_history)
        pos = np.arange(h_vals.size) - np.repeat(offsets[:-1], h_len)   # index inside history
        h_vals = h_vals[pos >= np.repeat(h_len - keep_len, h_len)]      # the most recent ones
        h_len = keep_len
    item_card = next((f.cardinality for f in features if f.name == ITEM), None)
    if item_card is not None:
        check_ids(HISTORY, h_vals, item_card, where, h_len)
    if token_rows is not None:
        for name, vals, lens in ((ITEM, items, None), (HISTORY, h_vals, h_len)):
            if vals.size and vals.max() >= token_rows:
                bad = int(np.flatnonzero(vals >= token_rows)[0])
                row = bad if lens is None else int(np.searchsorted(np.cumsum(lens), bad,
                                                                   "right"))
                raise DatasetError(f"{_at(where, row)}: field {name!r} has item id "
                                   f"{int(vals[bad])} beyond the semantic-ID table "
                                   f"({token_rows - 1} items)")
    # Dense left-aligned histories, built once per table (a row-major boolean scatter; faster
    # than a window gather + zeroing): a batch then copies whole rows. int32 when the ids fit
    # (half the bytes to write here and to gather per batch), else int64.
    hist = None
    if dense_history:
        small = item_card is not None and item_card <= np.iinfo(np.int32).max + 1
        hist = np.zeros((n, max(int(h_len.max(initial=0)), 1)),
                        dtype=np.int32 if small else np.int64)
        hist[np.take(_valid_mask(hist.shape[1]), h_len, axis=0)] = h_vals
    stacked = np.empty((n, len(scalars)), dtype=np.int64)
    for c, vals in enumerate(scalars):
        stacked[:, c] = vals
    return Rows(where, stacked, columns, no_missing, hist, h_len.astype(np.int64), token_rows)


def gather_batch(parts: list[tuple[Rows, np.ndarray]], row_ids: np.ndarray,
                 features: list[FeatureSpec], item_tokens: np.ndarray | None,
                 pad_history_to: int | None = None, with_history_ids: bool = True) -> Batch:
    """The Batch of rows `idx` of each decoded table, in order (parts = [(rows, idx)]).
    `row_ids` [B] are the samples' global split row indices. with_history_ids=False leaves the
    history's item ids out (`history` is (B, 0), `sequence_features` has no key): a model that
    reads the history only as semantic-ID tokens (GenCI) does not pay for them (see Batch).

    Sizes are known first, so everything is written into one storage. The large copies are
    `np.take(..., out=view, mode="clip")`: with `out` and the default mode="raise", numpy
    buffers the whole result and copies it again; "clip" never clips here because
    decode_rows validated every id (and the token table size is checked below)."""
    b = sum(idx.size for _, idx in parts)
    if item_tokens is not None and any(r.token_rows is None or r.token_rows
                                       > item_tokens.shape[0] for r, _ in parts):
        raise ValueError("rows were not validated against this semantic-ID table")
    h_len = (parts[0][0].hist_len[parts[0][1]] if len(parts) == 1
             else np.concatenate([r.hist_len[idx] for r, idx in parts]))
    longest = int(h_len.max(initial=0))
    width = int(pad_history_to) if pad_history_to else max(longest, 1)
    if longest > width:
        r, idx = next((r, idx) for r, idx in parts if r.hist_len[idx].max() == longest)
        row = int(idx[np.argmax(r.hist_len[idx])])
        raise DatasetError(f"{_at(r.where, row)}: history of {longest} items is longer "
                           f"than pad_history_to={width}")

    # All scalar columns of the picked rows in one row gather: [B, n_scalars]. (Its default
    # mode="raise" also checks every idx, so the clipping takes below cannot hide a bad one.)
    scalars = (np.take(parts[0][0].scalars, parts[0][1], axis=0) if len(parts) == 1
               else np.concatenate([np.take(r.scalars, idx, axis=0) for r, idx in parts]))

    # Sparse features, key after key, as blocks (lengths or None = one id per row, values
    # [keys, B] or flat, number of keys). Sizes first: the storage is allocated once. A scalar
    # feature holds one id per row unless some id is 0 (missing → empty bag), and a run of
    # such features is one block (a single copy); a multi-valued feature's ids are gathered
    # through its offsets.
    no_missing = all(r.no_missing for r, _ in parts)
    blocks: list[tuple[np.ndarray | None, np.ndarray, int]] = []
    n_sp: list[int] = []                  # ids per key
    for fi, col in enumerate(parts[0][0].columns):
        if isinstance(col, int) and no_missing:
            if blocks and blocks[-1][0] is None:   # extend the run: columns are consecutive
                k = blocks[-1][2]
                blocks[-1] = (None, scalars[:, col - k:col + 1].T, k + 1)
            else:
                blocks.append((None, scalars[:, col:col + 1].T, 1))
            n_sp.append(b)
            continue
        if isinstance(col, int):
            vals = scalars[:, col]
            lens = vals != 0
            vals = vals[lens]
        else:
            lens_p, vals_p = [], []
            for r, idx in parts:
                offsets, values = r.columns[fi]
                starts = offsets[idx]
                lens = offsets[idx + 1] - starts
                lens_p.append(lens)
                vals_p.append(take_ranges(starts, lens, values))
            lens, vals = np.concatenate(lens_p), np.concatenate(vals_p)
        blocks.append((lens, vals, 1))
        n_sp.append(int(vals.size))
    n_seq = int(h_len.sum()) if with_history_ids else 0
    w_ids = width if with_history_ids else 0     # columns of the returned `history`

    n_tok = 0 if item_tokens is None else item_tokens.shape[1]
    views, tensors = alloc_storage([
        ((sum(n_sp),), _I64), ((b * len(features),), _I64), ((n_seq,), _I64), ((b, w_ids), _I64),
        ((b,), _I64), ((b, width * n_tok), _TOK), ((b, n_tok), _TOK), ((b,), _I64), ((b,), _I64),
        ((b,), _I64), ((b,), _F32)])
    (sp_vals_v, sp_lens_v, seq_v, hist, h_len_v, hist_tok, tgt_tok, user_v, item_v, row_v,
     label_v) = views
    v0 = k0 = 0
    for lens, vals, k in blocks:
        sp_lens_v[k0 * b:(k0 + k) * b] = 1 if lens is None else lens
        sp_vals_v[v0:v0 + vals.size].reshape(vals.shape)[...] = vals
        v0 += vals.size
        k0 += k
    h_len_v[...] = h_len
    user_v[...] = scalars[:, 0]
    item_v[...] = scalars[:, 1]
    label_v[...] = scalars[:, 2]
    row_v[...] = row_ids

    table = None if item_tokens is None else np.ascontiguousarray(item_tokens, dtype=TOKEN_DTYPE)
    # History items in history order (= the sequence KJT values) and their cells in the
    # row-major [B, width] output (row i's first h_len[i]): O(items of the batch's histories).
    if with_history_ids or item_tokens is not None:
        if any(r.hist is None and r.hist_flat is None for r, _ in parts):
            raise ValueError("these rows were decoded without their dense history "
                             "(decode_rows(dense_history=False), or rows_of_cut(history="
                             "'none'))")
        # ids and tokens at their cells, padding elsewhere, in one pass (data_pipes/kernels.py)
        tok3 = None if table is None else hist_tok.reshape(b, width, n_tok)
        row0 = o0 = 0
        for r, idx in parts:
            lens = h_len[row0:row0 + idx.size]
            if r.hist_flat is not None:
                starts, values = r.hist_flat[0][idx], r.hist_flat[1]
            else:   # left-aligned rows: row k's items start at cell k * W
                starts, values = idx * r.hist.shape[1], r.hist.reshape(-1)
            fill_histories(starts, lens, values, row0, o0, seq_v if with_history_ids else None,
                           hist if with_history_ids else None, tok3, table)
            row0 += idx.size
            o0 += int(lens.sum())

    if table is not None:
        # One fixed-size record per item (its T tokens), so the lookup is a 1-D gather of
        # records (several times faster than gathering rows of a 2-D table).
        rec = _record_dtype(table.itemsize * n_tok)
        np.take(table.view(rec).reshape(-1), item_v, out=tgt_tok.view(rec)[:, 0], mode="clip")

    return batch_of(features, tensors, n_sp, n_seq, with_history_ids)


def batch_of(features: list[FeatureSpec], tensors: list[torch.Tensor], n_sp: list[int],
             n_seq: int, with_history_ids: bool) -> Batch:
    """The Batch over the 11 tensors `alloc_storage` carved for it (sparse values, sparse lengths,
    sequence values, history, history lengths, history tokens, target tokens, user, item and
    row ids, labels), `n_sp` ids per sparse key and `n_seq` sequence ids. The KJT constructor
    given the per-key sizes numpy already knows = from_lengths_sync without its tensor
    reductions."""
    b = int(tensors[4].shape[0])
    offsets = [0]
    for m in n_sp:
        offsets.append(offsets[-1] + m)
    sparse = KeyedJaggedTensor(
        keys=[f.name for f in features], values=tensors[0], lengths=tensors[1], stride=b,
        length_per_key=n_sp, offset_per_key=offsets)
    sequence = (KeyedJaggedTensor(
        keys=[HISTORY_FEATURE], values=tensors[2], lengths=tensors[4], stride=b,
        length_per_key=[n_seq], offset_per_key=[0, n_seq]) if with_history_ids else
        KeyedJaggedTensor(keys=[], values=tensors[2], lengths=tensors[2], stride=b,
                          length_per_key=[], offset_per_key=[0]))
    return Batch(sparse_features=sparse, sequence_features=sequence, history=tensors[3],
                 history_lengths=tensors[4], history_tokens=tensors[5],
                 target_tokens=tensors[6], labels=tensors[10], user_ids=tensors[7],
                 item_ids=tensors[8], row_ids=tensors[9])


def build_batch(table: pa.Table, features: list[FeatureSpec], row_ids: np.ndarray,
                item_tokens: np.ndarray | None, where: Where,
                pad_history_to: int | None = None, max_history: int | None = None,
                with_history_ids: bool = True) -> Batch:
    """Sample rows → Batch (all rows, in order). `where` names the source in errors;
    `max_history` keeps only the most recent items of longer stored histories."""
    rows = decode_rows(table, features, where, max_history,
                       None if item_tokens is None else item_tokens.shape[0])
    return gather_batch([(rows, np.arange(table.num_rows))], np.asarray(row_ids), features,
                        item_tokens, pad_history_to, with_history_ids)


@functools.lru_cache(maxsize=8)
def _record_dtype(nbytes: int) -> np.dtype:
    """An opaque record of `nbytes` bytes (building a dtype costs more than a small gather)."""
    return np.dtype((np.void, nbytes))


@functools.lru_cache(maxsize=64)
def _valid_mask(width: int) -> np.ndarray:
    """[width+1, width] bool, row n marks the first n positions: a batch's mask of real
    history positions is one row gather by history length, not a broadcast compare."""
    return np.arange(width) < np.arange(width + 1)[:, None]
