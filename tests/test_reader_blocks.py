"""The reader's blocks (data_pipes/blocks.py): the compiled cut gives exactly cut_samples'
samples, and a batch assembled from Blocks is exactly data_pipes.collate.gather_batch's Batch
from the Rows of rows_of_cut (the per-sample expansion it replaces): every feature kind (user
and item side, scalar and list, missing ids and padding inside bags), batches across blocks,
padded and bucketed widths, with and without ids and tokens; plus hand-computed cases and the
errors naming file, row and position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipes.blocks import (
    assemble_batch,
    concat_blocks,
    decode_block,
    field_tables,
)
from data_pipes.collate import TOKEN_DTYPE, gather_batch
from data_pipes.kernels import (
    HIST_LEN,
    HIST_START,
    ITEM_ID,
    LABEL,
    ROW_ID,
    SEQ_ROW,
    cut_block,
    fill_fields,
)
from data_pipes.schema import (
    ITEM,
    LABELS,
    SEQ_ITEMS,
    SEQ_SPLITS,
    USER,
    DatasetError,
    FeatureSpec,
)
from data_pipes.sequences import ItemSide, cut_samples, group_where, rows_of_cut

N_ITEMS, N_USERS, MAX_HISTORY = 30, 40, 4
FEATURES = [
    FeatureSpec(USER, "user", False, N_USERS + 1),
    FeatureSpec("age", "user", False, 5),            # 0 = missing for some users
    FeatureSpec("tags", "user", True, 6),            # lists with padding ids inside
    FeatureSpec(ITEM, "item", False, N_ITEMS + 1),
    FeatureSpec("year", "item", False, 7),           # 0 = missing for some items
    FeatureSpec("genres", "item", True, 9),
]


def _lists(off: np.ndarray, v: np.ndarray, t: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(v, t))


def _table(rng: np.random.Generator, users: np.ndarray, item_type: pa.DataType | None = None
           ) -> pa.Table:
    """Sequence rows of `users`: 0-12 positions each (one empty, one all positives so
    histories reach MAX_HISTORY), a few positions of the other splits."""
    n = users.size
    lens = rng.integers(0, 13, n)
    lens[0], lens[-1] = 0, 12
    off = np.r_[0, np.cumsum(lens)]
    items = rng.integers(1, N_ITEMS + 1, off[-1])
    labels = (rng.random(off[-1]) < 0.6).astype(np.int8)
    labels[off[-2]:] = 1
    splits = np.where(rng.random(off[-1]) < 0.75, 0, rng.integers(1, 3, off[-1])).astype(np.int8)
    tag_lens = rng.integers(0, 4, n)
    tag_off = np.r_[0, np.cumsum(tag_lens)]
    return pa.table({
        USER: pa.array(users, pa.int32()),
        "age": pa.array(rng.integers(0, 5, n), pa.int32()),
        "tags": _lists(tag_off, rng.integers(0, 6, tag_off[-1]), pa.int32()),
        SEQ_ITEMS: _lists(off, items, item_type or pa.int32()),
        LABELS: _lists(off, labels, pa.int8()),
        SEQ_SPLITS: _lists(off, splits, pa.int8())})


def _item_side(rng: np.random.Generator) -> ItemSide:
    year = np.r_[0, rng.integers(0, 7, N_ITEMS)]
    g_lens = rng.integers(0, 4, N_ITEMS)
    g_off = np.r_[0, np.cumsum(g_lens)]
    genres = rng.integers(0, 9, g_off[-1])        # some 0: padding inside a bag
    return ItemSide({"year": year}, {"genres": (np.r_[0, g_off], genres)})


def _where(g: int):  # noqa: ANN202
    return group_where(Path("seq.parquet"), g)


def _assert_same_batch(a, b) -> None:  # noqa: ANN001
    for name in ("history", "history_lengths", "history_tokens", "target_tokens", "labels",
                 "user_ids", "item_ids", "row_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), name
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=name)
    for kjt in ("sparse_features", "sequence_features"):
        x, y = getattr(a, kjt), getattr(b, kjt)
        assert x.keys() == y.keys() and x.stride() == y.stride()
        assert x.length_per_key() == y.length_per_key()
        np.testing.assert_array_equal(x.values().numpy(), y.values().numpy())
        np.testing.assert_array_equal(x.lengths().numpy(), y.lengths().numpy())


# ---- the compiled cut ----------------------------------------------------------------------


def test_cut_block_hand_computed() -> None:
    # row 0: items 5+ 6- 7+(valid) 8+ ; row 1: empty ; row 2: 9- 4+(test)
    offsets = np.array([0, 4, 4, 6])
    items = np.array([5, 6, 7, 8, 9, 4], np.int32)
    labels = np.array([1, 0, 1, 1, 0, 1], np.int8)
    codes = np.array([0, 0, 1, 0, 0, 2], np.int8)
    dest = np.array([3, 0, 1, 2])               # the 4 train samples, written out of order
    n, smp, pos = cut_block(offsets, items, labels, codes, 0, 2, dest,
                            np.array([10, 11, 12, 13]))
    assert n == 4
    assert pos.tolist() == [5, 7, 8, 4]
    # (row, item, label, history length, its start in pos, row id) by found order, at dest
    found = [[0, 5, 1, 0, 0, 10], [0, 6, 0, 1, 0, 11], [0, 8, 1, 2, 0, 12], [2, 9, 0, 0, 3, 13]]
    assert smp[dest].tolist() == found
    # max_history 1: the sample at item 8 keeps only item 7 (pos[1])
    _, smp1, _ = cut_block(offsets, items, labels, codes, 0, 1, np.arange(4), np.zeros(4, int))
    assert smp1[2, [HIST_LEN, HIST_START]].tolist() == [1, 1]
    # more samples than rows to write: counted, not written
    n, smp2, _ = cut_block(offsets, items, labels, codes, 0, 2, np.arange(2), np.zeros(2, int))
    assert n == 4 and smp2.shape == (2, 6)


@pytest.mark.parametrize("split", [0, 1, 2])
@pytest.mark.parametrize("max_history", [1, MAX_HISTORY, 50])
@pytest.mark.parametrize("item_type", [pa.int32(), pa.int64()])
def test_cut_block_matches_cut_samples(split: int, max_history: int,
                                       item_type: pa.DataType) -> None:
    rng = np.random.default_rng(split * 100 + max_history)
    table = _table(rng, np.arange(1, 25), item_type)
    c = cut_samples(table, split, max_history, FEATURES, _where(0), N_ITEMS + 1)
    n = c.item.size
    order = rng.permutation(n)
    row_ids = rng.integers(0, 1 << 40, n)
    block = decode_block(table, split, "x", n, max_history, FEATURES,
                         field_tables(FEATURES, {"year": np.zeros(N_ITEMS + 1, np.int64)},
                                      {"genres": (np.zeros(N_ITEMS + 2, np.int64),
                                                  np.zeros(0, np.int64))}),
                         _where(0), N_ITEMS + 1, None, order, row_ids)
    np.testing.assert_array_equal(block.order, order)
    smp = block.samples
    for col, ref in ((SEQ_ROW, c.seq_row), (ITEM_ID, c.item), (LABEL, c.label),
                     (HIST_LEN, c.hist_len), (HIST_START, c.hist_start), (ROW_ID, row_ids)):
        np.testing.assert_array_equal(smp[:, col], ref[order])
    np.testing.assert_array_equal(block.pos_items, c.pos_items)
    assert block.pos_items.dtype == c.pos_items.dtype


# ---- batches: the same as gather_batch over the per-sample rows -----------------------------


@pytest.mark.parametrize("pad", [None, 9])
@pytest.mark.parametrize("bucketed", [False, True])
def test_assembled_batches_equal_gather_batch(pad: int | None, bucketed: bool) -> None:
    rng = np.random.default_rng(11)
    items = _item_side(rng)
    tables = field_tables(FEATURES, items.single, items.multi)
    tokens = rng.integers(1, 50, (N_ITEMS + 1, 3)).astype(TOKEN_DTYPE)   # item 0 not zeros
    groups = [_table(rng, np.arange(1, 21)), _table(rng, np.arange(21, 41))]
    blocks, rows, orders = [], [], []
    for g, t in enumerate(groups):
        c = cut_samples(t, 0, MAX_HISTORY, FEATURES, _where(g), N_ITEMS + 1)
        order = rng.permutation(c.item.size)
        ids = np.arange(c.item.size) + 1000 * g
        blocks.append(decode_block(t, 0, "train", c.item.size, MAX_HISTORY, FEATURES, tables,
                                   _where(g), N_ITEMS + 1, N_ITEMS + 1, order, ids))
        rows.append((rows_of_cut(t, c, FEATURES, items, _where(g), N_ITEMS + 1, "flat"), ids))
        orders.append(order)
    lens = np.concatenate([b.hist_len for b in blocks])
    assert lens.min() == 0 and lens.max() == MAX_HISTORY
    # some bags empty: a missing scalar id and a list of padding only
    assert (blocks[0].ucol[:, 1] == 0).any() and (tables.icol[1:, 0] == 0).any()
    for trial in range(6):
        picks = [rng.choice(b.samples.shape[0], rng.integers(1, 9), replace=False)
                 for b in blocks]
        if trial == 0:
            picks = picks[:1]                          # one block
        if bucketed:    # the shortest histories: narrower than the blocks' longest
            picks = [p[np.argsort(b.hist_len[p], kind="stable")][:3]
                     for b, p in zip(blocks, picks, strict=False)]
        parts = list(zip(blocks, picks, strict=False))
        ref_parts = [(r, o[p]) for (r, _), o, p in zip(rows, orders, picks, strict=False)]
        row_ids = np.concatenate([ids[o[p]] for (_, ids), o, p in zip(rows, orders, picks,
                                                                     strict=False)])
        for with_ids in (True, False):
            for tok in (tokens, None):
                got = assemble_batch(parts, FEATURES, tables, tok, pad, with_ids)
                ref = gather_batch(ref_parts, row_ids, FEATURES, tok, pad, with_ids)
                _assert_same_batch(got, ref)
                assert got.labels.untyped_storage().data_ptr() == \
                    got.sparse_features.values().untyped_storage().data_ptr()   # one storage


def test_a_block_joined_from_parts_equals_the_block_of_one_table() -> None:
    """A block whose row groups' schemas differ is decoded group by group and joined
    (concat_blocks, then arranged into the epoch's order): the same samples and batches."""
    rng = np.random.default_rng(5)
    items = _item_side(rng)
    tables = field_tables(FEATURES, items.single, items.multi)
    parts = [_table(rng, np.arange(1, 15)), _table(rng, np.arange(15, 30))]
    whole = pa.concat_tables(parts)
    n = [cut_samples(t, 0, MAX_HISTORY, FEATURES, _where(0)).item.size for t in parts]
    order = rng.permutation(sum(n))
    ids = rng.integers(0, 1 << 20, sum(n))
    one = decode_block(whole, 0, "train", sum(n), MAX_HISTORY, FEATURES, tables, _where(0),
                       N_ITEMS + 1, None, order, ids)
    joined = concat_blocks([decode_block(t, 0, "train", k, MAX_HISTORY, FEATURES, tables,
                                         _where(g)) for g, (t, k) in enumerate(zip(
                                             parts, n, strict=True))]).arranged(order, ids)
    np.testing.assert_array_equal(joined.samples, one.samples)
    np.testing.assert_array_equal(joined.pos_items, one.pos_items)
    np.testing.assert_array_equal(joined.ucol, one.ucol)
    idx = rng.permutation(sum(n))[:20]
    _assert_same_batch(assemble_batch([(joined, idx)], FEATURES, tables, None),
                       assemble_batch([(one, idx)], FEATURES, tables, None))
    # errors name the sample's own group, row and position
    s = int(np.flatnonzero(order >= n[0])[0])
    assert "row group 1" in joined.where(int(joined.order[s]))


def test_fill_fields_hand_computed() -> None:
    # keys: user scalar (col 1 of ucol), item list 0; two samples written at batch rows 1, 2
    smp = np.array([[0, 2, 1, 0, 0, 70], [1, 1, 0, 3, 0, 71]], np.int64)
    ucol = np.array([[5, 0], [6, 4]], np.int64)         # user 5's feature is missing
    imoff = np.array([[0, 0, 1, 3]], np.int64)          # item 1: [7], item 2: [8, 9]
    imval = np.array([7, 8, 9], np.int64)
    kinds, cols = np.array([0, 3]), np.array([1, 0])
    b = 3
    sp_vals, sp_lens = np.full(4, -1, np.int64), np.full(2 * b, -1, np.int64)
    outs = [np.full(b, -1, np.int64) for _ in range(4)]
    label = np.full(b, -1, np.float32)
    cursor = np.array([0, 1])
    fill_fields(np.array([0, 1]), 1, smp, kinds, cols, ucol, np.zeros((3, 1), np.int64),
                np.zeros((0, 3), np.int64), np.zeros(0, np.int64), imoff, imval, cursor,
                sp_vals, sp_lens, outs[0], outs[1], label, outs[2], outs[3])
    assert sp_vals.tolist() == [4, 8, 9, 7]
    assert sp_lens.tolist() == [-1, 0, 1, -1, 2, 1]
    assert cursor.tolist() == [1, 4]
    assert outs[0].tolist() == [-1, 5, 6] and outs[1].tolist() == [-1, 2, 1]
    assert label.tolist() == [-1, 1, 0]
    assert outs[2].tolist() == [-1, 70, 71] and outs[3].tolist() == [-1, 0, 3]


# ---- errors --------------------------------------------------------------------------------


def test_errors_name_the_file_row_and_position() -> None:
    rng = np.random.default_rng(3)
    items = _item_side(rng)
    tables = field_tables(FEATURES, items.single, items.multi)
    t = _table(rng, np.arange(1, 11))
    c = cut_samples(t, 0, MAX_HISTORY, FEATURES, _where(2), N_ITEMS + 1)
    n = c.item.size
    with pytest.raises(DatasetError, match=rf"seq.parquet \(row group 2\): {n} train "
                                           rf"samples, the manifest says {n + 1}"):
        decode_block(t, 0, "train", n + 1, MAX_HISTORY, FEATURES, tables, _where(2))
    top = int(max(c.item.max(), c.pos_items.max()))
    with pytest.raises(DatasetError, match=rf"field '{SEQ_ITEMS}' has item id {top} beyond "
                                           rf"the semantic-ID table \({top - 1} items\)"):
        decode_block(t, 0, "train", n, MAX_HISTORY, FEATURES, tables, _where(2), None, top)
    order = rng.permutation(n)
    block = decode_block(t, 0, "train", n, MAX_HISTORY, FEATURES, tables, _where(2),
                         order=order, row_ids=np.arange(n))
    rows = rows_of_cut(t, c, FEATURES, items, _where(2), None, "flat")
    idx = np.flatnonzero(block.hist_len == MAX_HISTORY)[:1]
    with pytest.raises(DatasetError) as got:
        assemble_batch([(block, idx)], FEATURES, tables, None, pad_history_to=2)
    with pytest.raises(DatasetError) as ref:
        gather_batch([(rows, order[idx])], np.zeros(1, int), FEATURES, None, pad_history_to=2)
    assert str(got.value) == str(ref.value)
    assert "row group 2, row" in str(got.value) and ", position " in str(got.value)


def test_the_item_id_key_drops_a_zero_id() -> None:
    """An item id 0 (padding, which the manifest's range admits) is an empty item_id bag, as
    gather_batch makes it."""
    from data_pipes.kernels import ITEM_ID_KEY, count_fields

    smp = np.zeros((3, 6), np.int64)
    smp[:, ITEM_ID] = [3, 0, 5]
    smp[:, HIST_LEN] = [2, 0, 1]
    kinds, cols = np.array([ITEM_ID_KEY]), np.array([0])
    empty2, empty1 = np.zeros((1, 1), np.int64), np.zeros(0, np.int64)
    idx = np.arange(3)
    assert count_fields(idx, smp, kinds, cols, empty2, empty2, empty2,
                        empty2).tolist() == [2, 2, 3]
    sp_vals, sp_lens = np.full(2, -1, np.int64), np.full(3, -1, np.int64)
    outs = [np.zeros(3, np.int64) for _ in range(4)]
    fill_fields(idx, 0, smp, kinds, cols, empty2, empty2, empty2, empty1, empty2, empty1,
                np.zeros(1, np.int64), sp_vals, sp_lens, outs[0], outs[1],
                np.zeros(3, np.float32), outs[2], outs[3])
    assert sp_vals.tolist() == [3, 5] and sp_lens.tolist() == [1, 0, 1]
