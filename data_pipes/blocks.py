"""The sequence reader's decoded blocks and the batches built from them, each batch in a few
compiled passes (data_pipes/kernels.py).

A `Block` keeps what a batch reads of a shuffle block's samples, at the granularity it is
stored: per sample only its sequence row, item, label and history (start, length); the
user-side features stay one row per user (`ucol`, the user-side lists), and the item-side ones
one row per item for the whole process (`FieldTables`, from items.parquet). A batch then looks
every feature up through its sample's row and item. Before, a block expanded every feature to
every sample first (a [n, features] matrix and each list feature's per-sample lists) and a
batch gathered them a second time; expanding cost ~60 % of decoding a block and nothing was
gained by it, the batch gather being a lookup either way.

`assemble_batch` writes a batch in three compiled passes per block it reads from (sizes, then
the scalar and sparse fields, then the histories' ids and tokens) into one storage (collate's
`data_pipes.batch.alloc_storage`), and gives exactly the Batch that `data_pipes.collate.gather_batch` gives from the
`Rows` of `data_pipes.sequences.rows_of_cut` (tests/test_reader_blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipes.batch import Batch, alloc_storage
from data_pipes.collate import (
    _F32,
    _I64,
    _TOK,
    TOKEN_DTYPE,
    _list_parts,
    _record_dtype,
    batch_of,
)
from data_pipes.kernels import (
    HIST_LEN,
    HIST_START,
    ITEM_ID,
    ITEM_ID_KEY,
    ITEM_LIST,
    ITEM_SCALAR,
    ROW_ID,
    SEQ_ROW,
    USER_LIST,
    USER_SCALAR,
    count_fields,
    cut_block,
    fill_fields,
    fill_histories,
)
from data_pipes.schema import ITEM, SEQ_ITEMS, USER, DatasetError, FeatureSpec
from data_pipes.sequences import check_sequences


@dataclass
class FieldTables:
    """Where each sparse key is read (per process: the features and items.parquet's tables)."""

    kinds: np.ndarray          # int64 [K] kernels.USER_SCALAR / ITEM_SCALAR / ... / ITEM_ID_KEY
    cols: np.ndarray           # int64 [K] the key's column (scalars) or list (lists) in its table
    user_scalars: list[str]    # ucol's columns after user_id
    user_lists: list[str]      # a block's user-side lists, in umoff's order
    icol: np.ndarray           # int64 [items + 1, .] the item-side scalars
    imoff: np.ndarray          # int64 [item lists, items + 2] offsets into imval (item 0: empty)
    imval: np.ndarray          # int64, padding ids dropped


def field_tables(features: list[FeatureSpec], single: dict[str, np.ndarray],
                 multi: dict[str, tuple[np.ndarray, np.ndarray]]) -> FieldTables:
    """The FieldTables of `features` from the item-side tables of items.parquet (`single`:
    name → int64 [items + 1], `multi`: name → (offsets [items + 2], values); the shape of
    data_pipes.sequences.ItemSide)."""
    card = next((f.cardinality for f in features if f.name == ITEM), None)
    if card is None:
        raise DatasetError(f"the features have no {ITEM!r}")
    kinds, cols = [], []
    user_scalars, user_lists, item_scalars, item_lists = [], [], [], []
    for f in features:
        if f.name == USER:
            kinds.append(USER_SCALAR)
            cols.append(0)
        elif f.name == ITEM:
            kinds.append(ITEM_ID_KEY)
            cols.append(0)
        elif f.side == "user":
            names, kind = (user_lists, USER_LIST) if f.multi else (user_scalars, USER_SCALAR)
            kinds.append(kind)
            cols.append(len(names) + (kind == USER_SCALAR))
            names.append(f.name)
        else:
            names, kind = (item_lists, ITEM_LIST) if f.multi else (item_scalars, ITEM_SCALAR)
            kinds.append(kind)
            cols.append(len(names))
            names.append(f.name)
    n = max([card, *(single[x].size for x in item_scalars),
             *(multi[x][0].size - 1 for x in item_lists)])
    icol = np.zeros((n, len(item_scalars)), np.int64)
    for c, name in enumerate(item_scalars):
        icol[:single[name].size, c] = single[name]
    imoff, imval = _stack_lists([_drop_padding(*multi[x]) for x in item_lists], n + 1)
    return FieldTables(np.array(kinds, np.int64), np.array(cols, np.int64), user_scalars,
                       user_lists, icol, imoff, imval)


def _drop_padding(offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column without its 0 ids (padding inside a bag)."""
    keep = values != 0
    if keep.all():
        return offsets.astype(np.int64), values.astype(np.int64)
    lens = np.bincount(np.repeat(np.arange(offsets.size - 1), np.diff(offsets))[keep],
                       minlength=offsets.size - 1)
    return np.r_[0, np.cumsum(lens)].astype(np.int64), values[keep].astype(np.int64)


def _stack_lists(lists: list[tuple[np.ndarray, np.ndarray]], width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Several list columns as one offsets table [lists, width] (rows beyond a column's own
    are empty) into one values array."""
    off = np.zeros((len(lists), width), np.int64)
    base = 0
    for k, (o, _) in enumerate(lists):
        off[k, :o.size] = o + base
        off[k, o.size:] = o[-1] + base
        base += int(o[-1])
    vals = np.concatenate([v for _, v in lists]) if lists else np.zeros(0, np.int64)
    return off, vals.astype(np.int64)


@dataclass
class Block:
    """The samples of one split in a decoded block (row groups)."""

    where: Callable[[int | None], str]    # names a sample by its file-order index
    # int64 [n, 6]: per sample (kernels.SEQ_ROW, ITEM_ID, LABEL, HIST_LEN (after max_history),
    # HIST_START = its oldest history item's index in `pos_items`, ROW_ID = its split row id),
    # rows in `order`: a batch of consecutive positions reads consecutive rows
    samples: np.ndarray
    order: np.ndarray          # int64 [n] the file-order index of each row of `samples`
    pos_items: np.ndarray      # the block's positives' items (histories are ranges of it)
    ucol: np.ndarray           # int64 [rows, .] user_id, then FieldTables.user_scalars
    umoff: np.ndarray          # int64 [user lists, rows + 1] offsets into umval
    umval: np.ndarray          # int64, padding ids dropped
    token_rows: int | None     # items were checked to index a semantic-ID table this long

    @property
    def hist_len(self) -> np.ndarray:
        return self.samples[:, HIST_LEN]

    def arranged(self, order: np.ndarray, row_ids: np.ndarray) -> Block:
        """This block (in file order) with its rows in `order` and ROW_ID = row_ids[file
        index]: one gather per block, so a batch's rows are read in sequence."""
        samples = self.samples[order]
        samples[:, ROW_ID] = row_ids[order]
        return Block(self.where, samples, order, self.pos_items, self.ucol, self.umoff,
                     self.umval, self.token_rows)


def decode_block(table: pa.Table, split: int, split_name: str, expected: int,
                 max_history: int, features: list[FeatureSpec], tables: FieldTables,
                 where: Callable[[int | None], str], item_card: int | None = None,
                 token_rows: int | None = None, order: np.ndarray | None = None,
                 row_ids: np.ndarray | None = None) -> Block:
    """Validates sequence rows (data_pipes.sequences.check_sequences: the checks and errors
    of cut_samples) and cuts the `expected` samples of split code `split` out of them in one
    compiled pass (kernels.cut_block), as a Block whose rows are in `order` (file-order
    sample indices; None = file order) with ROW_ID = row_ids[file index] (None: 0).
    `where(row)` names a sequence row."""
    sq = check_sequences(table, features, where, item_card)
    if order is None:
        dest = np.arange(expected)
        order = dest
    else:
        dest = np.empty(expected, np.int64)
        dest[order] = np.arange(expected)   # where each file-order sample goes
    n, samples, pos_items = cut_block(sq.offsets, sq.items, sq.labels, sq.codes, split,
                                      max_history, dest,
                                      np.zeros(expected, np.int64) if row_ids is None
                                      else row_ids)
    if n != expected:
        raise DatasetError(f"{where(None)}: {n} {split_name} samples, the manifest says "
                           f"{expected}")
    if token_rows is not None and max(int(samples[:, ITEM_ID].max(initial=0)),
                                      int(pos_items.max(initial=0))) >= token_rows:
        items = np.r_[samples[:, ITEM_ID], pos_items]
        bad = int(np.flatnonzero(items >= token_rows)[0])
        row = int(samples[bad, SEQ_ROW]) if bad < expected else None
        raise DatasetError(f"{where(row)}: field {SEQ_ITEMS!r} has item id {int(items[bad])} "
                           f"beyond the semantic-ID table ({token_rows - 1} items)")
    ucol = np.empty((table.num_rows, 1 + len(tables.user_scalars)), np.int64)
    ucol[:, 0] = sq.users
    for k, name in enumerate(tables.user_scalars, start=1):
        ucol[:, k] = table.column(name).to_numpy()
    umoff, umval = _stack_lists([_drop_padding(*_list_parts(table.column(name)))
                                 for name in tables.user_lists], table.num_rows + 1)
    offsets, codes = sq.offsets, sq.codes

    def sample_where(s: int | None) -> str:     # s: file-order index (errors only)
        if s is None:
            return where(None)
        q = int(np.flatnonzero(codes == split)[s])
        row = int(np.searchsorted(offsets, q, "right")) - 1
        return f"{where(row)[:-1]}, position {q - int(offsets[row])})"

    return Block(sample_where, samples, order, pos_items, ucol, umoff, umval, token_rows)


def concat_blocks(parts: list[Block]) -> Block:
    """Several decoded parts of a block (file order) as one: samples in order, row and
    history indices shifted to the joined tables."""
    if len(parts) == 1:
        return parts[0]
    rows = np.cumsum([0, *(p.ucol.shape[0] for p in parts)])
    items = np.cumsum([0, *(p.pos_items.size for p in parts)])
    counts = np.cumsum([p.samples.shape[0] for p in parts])
    vals = np.cumsum([0, *(p.umval.size for p in parts)])
    umoff = np.concatenate([p.umoff[:, :-1] + vals[k] for k, p in enumerate(parts)]
                           + [parts[-1].umoff[:, -1:] + vals[-2]], axis=1)
    samples = np.concatenate([p.samples for p in parts])
    first = np.r_[0, counts[:-1]]
    for k in range(1, len(parts)):
        samples[first[k]:counts[k], SEQ_ROW] += rows[k]
        samples[first[k]:counts[k], HIST_START] += items[k]
    wheres = [p.where for p in parts]

    def where(s: int | None) -> str:
        if s is None:
            return "; ".join(w(None) for w in wheres)
        k = int(np.searchsorted(counts, s, side="right"))
        return wheres[k](s - (int(counts[k - 1]) if k else 0))

    return Block(where, samples, np.arange(samples.shape[0]),
                 np.concatenate([p.pos_items for p in parts]),
                 np.concatenate([p.ucol for p in parts]), umoff,
                 np.concatenate([p.umval for p in parts]), parts[0].token_rows)


@dataclass
class BatchShape:
    """A batch's sizes, known before it is written (`batch_shape`)."""

    sizes: list[list[int]]     # per part: kernels.count_fields (ids per key, longest, total)
    n_sp: list[int]            # ids per sparse key
    n_seq: int                 # sequence KJT ids (0 without history ids)
    width: int                 # history cells per row
    specs: list[tuple[tuple[int, ...], np.dtype]]   # the 11 arrays, for alloc_storage


def batch_shape(parts: list[tuple[Block, np.ndarray]], tables: FieldTables,
                table: np.ndarray | None, pad_history_to: int | None,
                with_history_ids: bool) -> BatchShape:
    """The sizes of the Batch of rows idx of each block (parts = [(block, idx)]) with token
    table `table` (or None): one compiled pass per part; refuses a history longer than
    pad_history_to."""
    n_keys = tables.kinds.size
    sizes = [count_fields(idx, p.samples, tables.kinds, tables.cols, p.ucol, tables.icol,
                          p.umoff, tables.imoff).tolist() for p, idx in parts]
    b = sum(idx.size for _, idx in parts)
    longest = max(s[n_keys] for s in sizes)
    n_hist = sum(s[n_keys + 1] for s in sizes)
    width = int(pad_history_to) if pad_history_to else max(longest, 1)
    if longest > width:
        p, idx = next((p, idx) for (p, idx), s in zip(parts, sizes, strict=True)
                      if s[n_keys] == longest)
        s = int(idx[np.argmax(p.samples[idx, HIST_LEN])])
        raise DatasetError(f"{p.where(int(p.order[s]))}: history of {longest} items is longer "
                           f"than pad_history_to={width}")
    n_sp = [sum(s[k] for s in sizes) for k in range(n_keys)]
    n_seq = n_hist if with_history_ids else 0
    w_ids = width if with_history_ids else 0
    n_tok = 0 if table is None else table.shape[1]
    return BatchShape(sizes, n_sp, n_seq, width, [
        ((sum(n_sp),), _I64), ((b * n_keys,), _I64), ((n_seq,), _I64), ((b, w_ids), _I64),
        ((b,), _I64), ((b, width * n_tok), _TOK), ((b, n_tok), _TOK), ((b,), _I64), ((b,), _I64),
        ((b,), _I64), ((b,), _F32)])


def write_batch(parts: list[tuple[Block, np.ndarray]], shape: BatchShape, tables: FieldTables,
                table: np.ndarray | None, views: list[np.ndarray],
                with_history_ids: bool) -> None:
    """Writes the batch of `parts` into `views` (the arrays of shape.specs, in order): the
    compiled fills of every part, then the target tokens."""
    (sp_vals, sp_lens, seq_v, hist, h_len, hist_tok, tgt_tok, user_v, item_v, row_v,
     label_v) = views
    n_keys = tables.kinds.size
    b = user_v.size
    tok3 = None if table is None else hist_tok.reshape(b, shape.width, table.shape[1])
    key_start = np.cumsum([0, *shape.n_sp[:-1]], dtype=np.int64)
    row0 = o0 = 0
    for (p, idx), s in zip(parts, shape.sizes, strict=True):
        fill_fields(idx, row0, p.samples, tables.kinds, tables.cols, p.ucol, tables.icol,
                    p.umoff, p.umval, tables.imoff, tables.imval, key_start, sp_vals, sp_lens,
                    user_v, item_v, label_v, row_v, h_len)  # key_start: moved past the part
        if with_history_ids or table is not None:
            fill_histories(p.samples[:, HIST_START], p.samples[:, HIST_LEN], p.pos_items, row0,
                           o0, seq_v if with_history_ids else None,
                           hist if with_history_ids else None, tok3, table, idx)
        row0 += idx.size
        o0 += s[n_keys + 1]
    if table is not None:   # one fixed-size record per item: a 1-D gather (as gather_batch)
        rec = _record_dtype(table.itemsize * table.shape[1])
        np.take(table.view(rec).reshape(-1), item_v, out=tgt_tok.view(rec)[:, 0], mode="clip")


def assemble_batch(parts: list[tuple[Block, np.ndarray]], features: list[FeatureSpec],
                   tables: FieldTables, item_tokens: np.ndarray | None,
                   pad_history_to: int | None = None, with_history_ids: bool = True) -> Batch:
    """The Batch of rows idx of each block, in order (parts = [(block, idx)]); the layout and
    the arguments of data_pipes.collate.gather_batch. Its sizes first (`batch_shape`), then
    one storage (alloc_storage) written by `write_batch`."""
    if item_tokens is not None and any(p.token_rows is None or p.token_rows
                                       > item_tokens.shape[0] for p, _ in parts):
        raise ValueError("rows were not validated against this semantic-ID table")
    table = None if item_tokens is None else np.ascontiguousarray(item_tokens, dtype=TOKEN_DTYPE)
    shape = batch_shape(parts, tables, table, pad_history_to, with_history_ids)
    views, tensors = alloc_storage(shape.specs)
    write_batch(parts, shape, tables, table, views, with_history_ids)
    return batch_of(features, tensors, shape.n_sp, shape.n_seq, with_history_ids)
