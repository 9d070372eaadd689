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
def _fill_ids(starts, lens, values, row0, o0, seq, hist):  # noqa: ANN001, ANN202
    o, width = o0, hist.shape[1]
    for i in range(lens.size):
        s, n = starts[i], lens[i]
        out = hist[row0 + i]
        for j in range(n):
            it = values[s + j]
            seq[o + j] = it
            out[j] = it
        for j in range(n, width):
            out[j] = 0
        o += n


@njit(cache=True, nogil=True)
def _fill_token_words(starts, lens, values, row0, tok, table):  # noqa: ANN001, ANN202
    # tok [B, W] and table [items + 1]: one word per item (all its tokens)
    width, pad = tok.shape[1], table[0]
    for i in range(lens.size):
        s, n = starts[i], lens[i]
        out = tok[row0 + i]
        for j in range(n):
            out[j] = table[values[s + j]]
        for j in range(n, width):
            out[j] = pad


@njit(cache=True, nogil=True)
def _fill_tokens(starts, lens, values, row0, tok, table):  # noqa: ANN001, ANN202
    # tok [B, W, T] and table [items + 1, T]: token rows of any size
    width, n_tok = tok.shape[1], tok.shape[2]
    for i in range(lens.size):
        s, n, r = starts[i], lens[i], row0 + i
        for j in range(n):
            it = values[s + j]
            for t in range(n_tok):
                tok[r, j, t] = table[it, t]
        for j in range(n, width):
            for t in range(n_tok):
                tok[r, j, t] = table[0, t]


def fill_histories(starts: np.ndarray, lens: np.ndarray, values: np.ndarray, row0: int,
                   o0: int, seq: np.ndarray | None, hist: np.ndarray | None,
                   tok: np.ndarray | None, table: np.ndarray | None) -> None:
    """Lays out the histories of batch rows row0, row0 + 1, ...: row row0 + i's items are
    values[starts[i]:starts[i] + lens[i]] (oldest first). `seq` gets them one after another
    from position o0 (the sequence KJT's values) and `hist` [B, W] left-aligned and 0-padded
    (both or neither); `tok` [B, W, T] each item's T tokens from `table` [items + 1, T]
    (row 0 = padding), padded with row 0 (or None). Every lens[i] <= W."""
    if (seq is None) != (hist is None):
        raise ValueError("seq and hist are built together")
    if hist is not None:
        _fill_ids(starts, lens, values, row0, o0, seq, hist)
    if tok is None or table is None:
        return
    table = np.ascontiguousarray(table)
    word = _WORDS.get(table.shape[1] * table.itemsize)
    if word is not None and tok.flags.c_contiguous:
        # a row's tokens as one word, copied at once: 2.3x faster than a loop over four
        # int32 tokens (ML-1M GenCI batches, 2026-12-06; even a loop of one word is 2x slower)
        _fill_token_words(starts, lens, values, row0, tok.view(word)[:, :, 0],
                          table.view(word)[:, 0])
    else:
        _fill_tokens(starts, lens, values, row0, tok, table)


# a token row's byte size → one numpy type of that size (only copied, never computed with)
_WORDS = {4: np.dtype(np.int32), 8: np.dtype(np.int64), 16: np.dtype(np.complex128)}


def warm() -> None:
    """Loads the kernels for the reader's usual argument types (int64 offsets and rows,
    int32 history items, int64 id outputs, int32 tokens in rows of 4, 8 and 16 bytes)."""
    i64, i32 = np.zeros(1, np.int64), np.zeros(1, np.int32)
    take_ranges(i64, i64, i32)
    take_ranges(i64, i64, i64)
    for n_tok in (1, 2, 4):     # token rows of 4, 8 and 16 bytes
        fill_histories(i64, i64, i32, 0, 0, np.zeros(1, np.int64),
                       np.zeros((1, 1), np.int64), np.zeros((1, 1, n_tok), np.int32),
                       np.zeros((1, n_tok), np.int32))
