"""The reader's per-batch loops, compiled with numba (`cache=True`: compiled once per
machine into __pycache__, then loaded in milliseconds by every process and worker).

Written by hand because they are faster than numpy here: numpy builds a ranges gather from
four whole-array passes (repeat, cumsum, arange, take, each allocating its result) and the
history layout from a zero fill plus two scatters, while each loop below touches every output
element once and allocates nothing (data_pipes/bench_reader.py docstring: the measured gain).
`nogil`: the read-ahead thread's Parquet read keeps running beside them.

A process's first call costs ~0.4 s (numba's runtime starting, even with the cache) on top of
its ~0.4 s import: the reader's fork server pays both once (`warm`, data_pipes/worker_preload.py)
and every worker it forks starts with them loaded.

Callers have validated every index (ids against the manifest and the token table, row
positions against their block), so the loops do no bounds checks, as numpy's
`take(mode="clip")` calls they replace did not.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _take_ranges(starts, lens, values, out):  # noqa: ANN001, ANN202
    o = 0
    for i in range(starts.size):
        s = starts[i]
        for j in range(lens[i]):
            out[o + j] = values[s + j]
        o += lens[i]


def take_ranges(starts: np.ndarray, lens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[starts[i]:starts[i] + lens[i]] for every i, one after another (the values of
    picked rows of an offsets/values list column, in row order); = values[ranges_index(...)]."""
    out = np.empty(int(lens.sum()), dtype=values.dtype)
    if out.size:
        _take_ranges(starts, lens, values, out)
    return out


@njit(cache=True, nogil=True)
def _fill_ids(idx, starts, lens, values, row0, o0, seq, hist):  # noqa: ANN001, ANN202
    o, width = o0, hist.shape[1]
    for i in range(idx.size):
        s, n = starts[idx[i]], lens[idx[i]]
        out = hist[row0 + i]
        for j in range(n):
            it = values[s + j]
            seq[o + j] = it
            out[j] = it
        for j in range(n, width):
            out[j] = 0
        o += n


@njit(cache=True, nogil=True)
def _fill_token_words(idx, starts, lens, values, row0, tok, table):  # noqa: ANN001, ANN202
    # tok [B, W] and table [items + 1]: one word per item (all its tokens)
    width, pad = tok.shape[1], table[0]
    for i in range(idx.size):
        s, n = starts[idx[i]], lens[idx[i]]
        out = tok[row0 + i]
        for j in range(n):
            out[j] = table[values[s + j]]
        for j in range(n, width):
            out[j] = pad


@njit(cache=True, nogil=True)
def _fill_tokens(idx, starts, lens, values, row0, tok, table):  # noqa: ANN001, ANN202
    # tok [B, W, T] and table [items + 1, T]: token rows of any size
    width, n_tok = tok.shape[1], tok.shape[2]
    for i in range(idx.size):
        s, n, r = starts[idx[i]], lens[idx[i]], row0 + i
        for j in range(n):
            it = values[s + j]
            for t in range(n_tok):
                tok[r, j, t] = table[it, t]
        for j in range(n, width):
            for t in range(n_tok):
                tok[r, j, t] = table[0, t]


def fill_histories(starts: np.ndarray, lens: np.ndarray, values: np.ndarray, row0: int,
                   o0: int, seq: np.ndarray | None, hist: np.ndarray | None,
                   tok: np.ndarray | None, table: np.ndarray | None,
                   idx: np.ndarray | None = None) -> None:
    """Lays out the histories of batch rows row0, row0 + 1, ...: row row0 + i's items are
    values[starts[i]:starts[i] + lens[i]] (oldest first), or with `idx` those of sample
    idx[i] (values[starts[idx[i]]:...], starts and lens per sample of a block). `seq` gets them
    one after another from position o0 (the sequence KJT's values) and `hist` [B, W]
    left-aligned and 0-padded (both or neither); `tok` [B, W, T] each item's T tokens from
    `table` [items + 1, T] (row 0 = padding), padded with row 0 (or None). Every length <= W."""
    if (seq is None) != (hist is None):
        raise ValueError("seq and hist are built together")
    if idx is None:
        idx = np.arange(lens.size)
    if hist is not None:
        _fill_ids(idx, starts, lens, values, row0, o0, seq, hist)
    if tok is None or table is None:
        return
    table = np.ascontiguousarray(table)
    word = _WORDS.get(table.shape[1] * table.itemsize)
    if word is not None and tok.flags.c_contiguous:
        # a row's tokens as one word, copied at once: 2.3x faster than a loop over four
        # int32 tokens (ML-1M GenCI batches, 2026-12-06; even a loop of one word is 2x slower)
        _fill_token_words(idx, starts, lens, values, row0, tok.view(word)[:, :, 0],
                          table.view(word)[:, 0])
    else:
        _fill_tokens(idx, starts, lens, values, row0, tok, table)


# Feature sources of `count_fields` / `fill_fields`: a scalar id in a column of the user-row
# table or of the item table, or a list in a user-row or item offsets/values table.
USER_SCALAR, ITEM_SCALAR, USER_LIST, ITEM_LIST, ITEM_ID_KEY = 0, 1, 2, 3, 4   # the last:
# the sample's item id itself


# Columns of a block's per-sample matrix (data_pipes.blocks.Block.samples): one row per sample,
# so a batch reads one cache line per sample instead of one per array.
SEQ_ROW, ITEM_ID, LABEL, HIST_LEN, HIST_START, ROW_ID = range(6)


@njit(cache=True, nogil=True)
def _count_fields(idx, smp, kinds, cols, ucol, icol, umoff, imoff, out):  # noqa: ANN001, ANN202
    # key by key (a tight loop each, the batch's sample rows stay in cache)
    n_keys = kinds.size
    for k in range(n_keys):
        kind, c, m = kinds[k], cols[k], 0
        if kind == 0:
            for i in range(idx.size):
                m += ucol[smp[idx[i], 0], c] != 0
        elif kind == 4:
            for i in range(idx.size):
                m += smp[idx[i], 1] != 0
        elif kind == 1:
            for i in range(idx.size):
                m += icol[smp[idx[i], 1], c] != 0
        elif kind == 2:
            for i in range(idx.size):
                r = smp[idx[i], 0]
                m += umoff[c, r + 1] - umoff[c, r]
        else:
            for i in range(idx.size):
                it = smp[idx[i], 1]
                m += imoff[c, it + 1] - imoff[c, it]
        out[k] = m
    longest, total = 0, 0
    for i in range(idx.size):
        n = smp[idx[i], 3]
        longest = max(longest, n)
        total += n
    out[n_keys] = longest
    out[n_keys + 1] = total


def count_fields(idx: np.ndarray, samples: np.ndarray, kinds: np.ndarray, cols: np.ndarray,
                 ucol: np.ndarray, icol: np.ndarray, umoff: np.ndarray,
                 imoff: np.ndarray) -> np.ndarray:
    """The sizes of a batch part before it is written: int64 [K + 2] = the ids of each of the
    K sparse keys over the samples `idx` (rows of `samples` [n, 6], columns SEQ_ROW ... ROW_ID
    above; a scalar key's non-zero ids, a list key's values), then the longest history and
    the histories' total length. Key k reads column cols[k] of its source kinds[k]
    (USER_SCALAR: ucol [rows, .] by the sample's sequence row; ITEM_SCALAR: icol [items + 1, .]
    by its item; USER_LIST / ITEM_LIST: list cols[k] of the offsets table umoff [lists,
    rows + 1] / imoff [lists, items + 2]; ITEM_ID_KEY: the item id)."""
    out = np.zeros(kinds.size + 2, np.int64)
    _count_fields(idx, samples, kinds, cols, ucol, icol, umoff, imoff, out)
    return out


@njit(cache=True, nogil=True)
def _fill_fields(idx, row0, smp, kinds, cols, ucol, icol, umoff, umval, imoff, imval, cursor,
                 sp_vals, sp_lens, user_o, item_o, label_o, row_o, hlen_o):  # noqa: ANN001, ANN202
    n_keys, b = kinds.size, user_o.size
    for i in range(idx.size):
        s, row = idx[i], row0 + i
        user_o[row] = ucol[smp[s, 0], 0]
        item_o[row] = smp[s, 1]
        label_o[row] = smp[s, 2]
        row_o[row] = smp[s, 5]
        hlen_o[row] = smp[s, 3]
    for k in range(n_keys):     # key by key: the write position stays in a register
        kind, c, o, lens = kinds[k], cols[k], cursor[k], sp_lens[k * b + row0:]
        if kind == 4:       # the item id
            for i in range(idx.size):
                v = smp[idx[i], 1]
                if v != 0:      # 0 = missing: an empty bag
                    sp_vals[o] = v
                    o += 1
                lens[i] = v != 0
        elif kind <= 1:     # a scalar: its table and the sample's row in it
            tab, at = (ucol, 0) if kind == 0 else (icol, 1)
            for i in range(idx.size):
                v = tab[smp[idx[i], at], c]
                if v != 0:
                    sp_vals[o] = v
                    o += 1
                lens[i] = v != 0
        else:               # a list: its offsets and values, the sample's row in them
            off, val, at = (umoff, umval, 0) if kind == 2 else (imoff, imval, 1)
            for i in range(idx.size):
                r = smp[idx[i], at]
                lo, hi = off[c, r], off[c, r + 1]
                for j in range(lo, hi):
                    sp_vals[o + j - lo] = val[j]
                o += hi - lo
                lens[i] = hi - lo
        cursor[k] = o


def fill_fields(idx: np.ndarray, row0: int, samples: np.ndarray, kinds: np.ndarray,
                cols: np.ndarray, ucol: np.ndarray, icol: np.ndarray, umoff: np.ndarray,
                umval: np.ndarray, imoff: np.ndarray, imval: np.ndarray, cursor: np.ndarray,
                sp_vals: np.ndarray, sp_lens: np.ndarray, user_o: np.ndarray,
                item_o: np.ndarray, label_o: np.ndarray, row_o: np.ndarray,
                hlen_o: np.ndarray) -> None:
    """Writes batch rows row0, row0 + 1, ... from samples idx[0], idx[1], ... (sources as in
    `count_fields`): the user, item, label, split row id and history length of each row, and
    the sparse KJT's lengths (key-major [K, B] flat) and values: key k's ids go to sp_vals
    from position cursor[k] on (advanced in place); a scalar id 0 (missing) is an empty bag."""
    _fill_fields(idx, row0, samples, kinds, cols, ucol, icol, umoff, umval, imoff, imval,
                 cursor, sp_vals, sp_lens, user_o, item_o, label_o, row_o, hlen_o)


@njit(cache=True, nogil=True)
def _cut_block(offsets, items, labels, codes, split, max_history, dest, row_ids, smp,
               pos_items):  # noqa: ANN001, ANN202
    n, gp = 0, 0
    for r in range(offsets.size - 1):
        before = 0
        for q in range(offsets[r], offsets[r + 1]):
            if codes[q] == split:
                if n < dest.size:
                    h = min(before, max_history)
                    o = dest[n]
                    smp[o, 0] = r
                    smp[o, 1] = items[q]
                    smp[o, 2] = labels[q]
                    smp[o, 3] = h
                    smp[o, 4] = gp - h
                    smp[o, 5] = row_ids[n]
                n += 1
            if labels[q] == 1:
                pos_items[gp] = items[q]
                gp += 1
                before += 1
    return n


def cut_block(offsets: np.ndarray, items: np.ndarray, labels: np.ndarray, codes: np.ndarray,
              split: int, max_history: int, dest: np.ndarray, row_ids: np.ndarray
              ) -> tuple[int, np.ndarray, np.ndarray]:
    """The samples of split code `split` in validated sequence lists (offsets [rows + 1];
    items, labels 0/1 and split codes per position), in one pass: (samples found, the
    per-sample matrix [len(dest), 6] (columns SEQ_ROW ... ROW_ID), the positives' items in
    (row, position) order). The k-th sample found (row, position order) is written to row
    dest[k] with ROW_ID row_ids[k]; samples beyond len(dest) are counted, not written (the
    caller refuses a count that is not the expected one). History of a sample = the most
    recent max_history positives before it in its row (data_pipes.sequences.cut_samples)."""
    smp = np.empty((dest.size, 6), np.int64)
    pos_items = np.empty(int(np.count_nonzero(labels)), items.dtype)
    n = _cut_block(offsets, items, labels, codes, split, max_history, dest, row_ids, smp,
                   pos_items)
    return int(n), smp, pos_items


# a token row's byte size → one numpy type of that size (only copied, never computed with)
_WORDS = {4: np.dtype(np.int32), 8: np.dtype(np.int64), 16: np.dtype(np.complex128)}


def warm() -> None:
    """Loads the kernels for the argument types the reader passes (data_pipes.blocks: int64
    samples, offsets and outputs; items int32 or int64, read-only as Arrow hands them over;
    labels and split codes int8; history starts and lengths as strided columns of the samples
    matrix; int32 tokens in rows of 4, 8 and 16 bytes as one word, other sizes token by token,
    from a read-only memory map or not)."""
    def ro(a: np.ndarray) -> np.ndarray:
        a.flags.writeable = False
        return a

    i64, i32, f32 = np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(1, np.float32)
    i8 = ro(np.zeros(1, np.int8))
    smp, m2 = np.zeros((2, 6), np.int64), np.zeros((1, 1), np.int64)
    take_ranges(i64, i64, i32)
    take_ranges(i64, i64, i64)
    for items in (i32, i64):
        cut_block(np.zeros(2, np.int64), ro(items.copy()), i8, i8, 0, 1, i64, i64)
        for n_tok in (1, 2, 3, 4):  # token rows of 4, 8 and 16 bytes, and the generic loop
            for table in (np.zeros((1, n_tok), np.int32), ro(np.zeros((1, n_tok), np.int32))):
                fill_histories(smp[:, 4], smp[:, 3], items, 0, 0, i64, m2,
                               np.zeros((1, 1, n_tok), np.int32), table, i64)
    count_fields(i64, smp, i64, i64, m2, m2, m2, m2)
    fill_fields(i64, 0, smp, i64, i64, m2, m2, m2, i64, m2, i64, i64, i64, i64, i64, i64, f32,
                i64, i64)
