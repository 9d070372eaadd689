"""The reader's two per-batch loops, compiled with numba (`cache=True`: compiled once per
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
def _fill_histories(starts, lens, values, row0, o0, seq, hist, tok, table):  # noqa: ANN001, ANN202
    width, t_width, n_tok = hist.shape[1], tok.shape[1], tok.shape[2]
    o = o0
    for i in range(lens.size):
        s, n, r = starts[i], lens[i], row0 + i
        for j in range(n):
            it = values[s + j]
            if seq.size:
                seq[o + j] = it
            if j < width:
                hist[r, j] = it
            if j < t_width:
                for t in range(n_tok):
                    tok[r, j, t] = table[it, t]
        for j in range(n, width):
            hist[r, j] = 0
        for j in range(n, t_width):
            for t in range(n_tok):
                tok[r, j, t] = table[0, t]
        o += n


def fill_histories(starts: np.ndarray, lens: np.ndarray, values: np.ndarray, row0: int,
                   o0: int, seq: np.ndarray | None, hist: np.ndarray | None,
                   tok: np.ndarray | None, table: np.ndarray | None) -> None:
    """Lays out the histories of batch rows row0, row0 + 1, ...: row row0 + i's items are
    values[starts[i]:starts[i] + lens[i]] (oldest first). `seq` gets them one after another
    from position o0 (the sequence KJT's values), `hist` [B, W] left-aligned and 0-padded,
    `tok` [B, W, T] each item's T tokens from `table` [items + 1, T] (row 0 = padding),
    padded with row 0. Any output may be None (not built). Every lens[i] <= W."""
    b = lens.size if hist is None else hist.shape[0]
    if seq is None:
        seq = np.empty(0, dtype=np.int64)
    if hist is None:
        hist = np.empty((b, 0), dtype=np.int64)
    if tok is None or table is None:
        tok = np.empty((b, 0, 1), dtype=np.int32)
        table = np.zeros((1, 1), dtype=np.int32)
    _fill_histories(starts, lens, values, row0, o0, seq, hist, tok, np.asarray(table))


def warm() -> None:
    """Loads both kernels for the reader's usual argument types (int64 offsets and rows,
    int32 history items, int64 id outputs, int32 tokens)."""
    i64, i32 = np.zeros(1, np.int64), np.zeros(1, np.int32)
    take_ranges(i64, i64, i32)
    take_ranges(i64, i64, i64)
    fill_histories(i64, i64, i32, 0, 0, np.zeros(1, np.int64), np.zeros((1, 1), np.int64),
                   np.zeros((1, 1, 1), np.int32), np.zeros((1, 1), np.int32))
