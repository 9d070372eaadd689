"""The reader's flat histories (`Rows.hist_flat`: the block's positives, start and length per
sample) give the same batches as the dense [n, W] matrix they replace, and as a reference
built by hand from the matrix: histories, their tokens (padding = item 0's record), sequence
values, for empty and max-length histories, batches drawn from several blocks, widths below
the blocks' (length bucketing) and above them (pad_history_to), with and without ids/tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipes.collate import TOKEN_DTYPE, gather_batch
from data_pipes.schema import ITEM, LABELS, SEQ_ITEMS, SEQ_SPLITS, USER, FeatureSpec
from data_pipes.sequences import ItemSide, cut_samples, group_where, rows_of_cut

MAX_HISTORY = 5
N_ITEMS = 20
FEATURES = [FeatureSpec(USER, "user", False, 13), FeatureSpec(ITEM, "item", False, N_ITEMS + 1)]


def _table(rng: np.random.Generator) -> pa.Table:
    """12 users, sequences of 0-14 positions; user 1 holds only positives (histories reach
    MAX_HISTORY), user 2 an empty sequence; a few positions of other splits."""
    lens = rng.integers(0, 15, 12)
    lens[1], lens[2] = 14, 0
    off = np.r_[0, np.cumsum(lens)].astype(np.int32)
    items = rng.integers(1, N_ITEMS + 1, off[-1]).astype(np.int32)
    labels = (rng.random(off[-1]) < 0.6).astype(np.int8)
    labels[off[1]:off[2]] = 1
    splits = np.where(rng.random(off[-1]) < 0.8, 0, rng.integers(1, 3, off[-1])).astype(np.int8)

    def lists(v: np.ndarray, t: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(off), pa.array(v, t))

    return pa.table({USER: pa.array(np.arange(1, 13), pa.int32()),
                     SEQ_ITEMS: lists(items, pa.int32()), LABELS: lists(labels, pa.int8()),
                     SEQ_SPLITS: lists(splits, pa.int8())})


def _rows(table: pa.Table, g: int, history: str):  # noqa: ANN202
    where = group_where(Path("seq.parquet"), g)
    cut = cut_samples(table, 0, MAX_HISTORY, FEATURES, where, N_ITEMS + 1)
    return rows_of_cut(table, cut, FEATURES, ItemSide({}, {}), where, N_ITEMS + 1, history)


def _reference(dense: list, picks: list[np.ndarray], tokens: np.ndarray,
               width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [B, width], tokens [B, width * T], sequence values) from the dense matrices."""
    rows = []
    for r, idx in zip(dense, picks, strict=True):
        for i in idx:
            h = r.hist[i, :r.hist_len[i]].tolist()
            rows.append(h + [0] * (width - len(h)))
    ids = np.array(rows, dtype=np.int64).reshape(-1, width)
    seq = np.array([v for row, n in zip(rows, np.concatenate(
        [r.hist_len[i] for r, i in zip(dense, picks, strict=True)]), strict=True)
        for v in row[:n]], dtype=np.int64)
    return ids, tokens[ids].reshape(ids.shape[0], -1), seq


@pytest.mark.parametrize("pad", [None, 8])
@pytest.mark.parametrize("bucketed", [False, True])
def test_flat_histories_gather_as_the_dense_matrix(pad: int | None, bucketed: bool) -> None:
    rng = np.random.default_rng(7)
    table = _table(rng)
    halves = [table.slice(0, 6), table.slice(6)]
    flat = [_rows(t, g, "flat") for g, t in enumerate(halves)]
    dense = [_rows(t, g, "dense") for g, t in enumerate(halves)]
    assert all(r.hist is None and r.hist_flat is not None for r in flat)
    lens = np.concatenate([r.hist_len for r in dense])
    assert lens.min() == 0 and lens.max() == MAX_HISTORY      # empty and capped histories
    tokens = rng.integers(1, 50, (N_ITEMS + 1, 3)).astype(TOKEN_DTYPE)  # item 0 not zeros
    picks = [rng.permutation(r.hist_len.size) for r in dense]
    if bucketed:    # the shortest histories: narrower than both blocks' matrices
        picks = [p[np.argsort(r.hist_len[p], kind="stable")][:4]
                 for r, p in zip(dense, picks, strict=True)]
    longest = int(max(r.hist_len[p].max() for r, p in zip(dense, picks, strict=True)))
    width = pad or max(longest, 1)
    assert (width < max(r.hist.shape[1] for r in dense)) == (bucketed and pad is None)
    row_ids = np.arange(sum(p.size for p in picks))
    ids, tok, seq = _reference(dense, picks, tokens, width)
    for with_ids in (True, False):
        for table_ in (tokens, None):
            got = [gather_batch(list(zip(rows, picks, strict=True)), row_ids, FEATURES, table_,
                                pad, with_ids) for rows in (flat, dense)]
            for b in got:
                assert b.history_lengths.tolist() == [
                    int(n) for r, p in zip(dense, picks, strict=True) for n in r.hist_len[p]]
                if with_ids:
                    np.testing.assert_array_equal(b.history.numpy(), ids)
                    np.testing.assert_array_equal(b.sequence_features.values().numpy(), seq)
                else:
                    assert tuple(b.history.shape) == (ids.shape[0], 0)
                if table_ is not None:
                    np.testing.assert_array_equal(b.history_tokens.numpy(), tok)
                    np.testing.assert_array_equal(
                        b.target_tokens.numpy(),
                        tokens[np.concatenate([r.scalars[p, 1] for r, p in zip(
                            dense, picks, strict=True)])])
            for name in ("history", "history_tokens", "target_tokens", "labels", "user_ids",
                         "item_ids", "row_ids"):
                np.testing.assert_array_equal(getattr(got[0], name).numpy(),
                                              getattr(got[1], name).numpy())
            for kjt in ("sparse_features", "sequence_features"):
                a, b_ = getattr(got[0], kjt), getattr(got[1], kjt)
                assert a.keys() == b_.keys()
                np.testing.assert_array_equal(a.values().numpy(), b_.values().numpy())
                np.testing.assert_array_equal(a.lengths().numpy(), b_.lengths().numpy())


def test_rows_of_cut_names_an_unknown_history_layout() -> None:
    with pytest.raises(ValueError, match="history='sparse'"):
        _rows(_table(np.random.default_rng(0)), 0, "sparse")
