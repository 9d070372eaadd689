"""The sample protocol on hand-checked cases: label rule, tie-broken order, splits, histories."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipes.protocol import (
    Interactions,
    apply_label_rule,
    build_samples,
    dense_ids,
    five_core,
)
from data_pipes.schema import DatasetError


def _hist(s, i):  # noqa: ANN001, ANN202
    return s.hist_values[s.hist_offsets[i]:s.hist_offsets[i + 1]].tolist()


def _case() -> Interactions:
    # user 1: a tie at ts 10 (item 1 before item 3), a rating-3 row that must vanish
    u1 = [(3, 5, 10), (1, 2, 10), (2, 3, 5), (4, 4, 20), (5, 1, 30), (6, 5, 40)]
    # user 2: ten positives in time order
    u2 = [(k, 5, k) for k in range(1, 11)]
    rows = [(1, *r) for r in u1] + [(2, *r) for r in u2]
    u, i, r, t = (np.array(c) for c in zip(*rows, strict=True))
    return Interactions(u.astype(np.int32), i.astype(np.int32), r.astype(float),
                        t.astype(np.int64))


def test_label_rule_drops_three_and_thresholds() -> None:
    kept, label = apply_label_rule(_case())
    assert 3 not in kept.rating
    assert label.tolist() == (kept.rating > 3).astype(int).tolist()
    assert len(label) == 15


def test_temporal_order_splits_and_histories() -> None:
    kept, label = apply_label_rule(_case())
    s = build_samples(kept, label, split="temporal", max_history=2)
    u1 = np.flatnonzero(s.user == 1)
    assert s.item[u1].tolist() == [1, 3, 4, 5, 6]          # (ts, item) order, tie broken by id
    assert s.label[u1].tolist() == [0, 1, 1, 0, 1]
    assert s.split[u1].tolist() == [0, 0, 0, 0, 2]          # n=5: 4 train, 0 valid, 1 test
    assert [_hist(s, i) for i in u1] == [[], [], [3], [3, 4], [3, 4]]
    u2 = np.flatnonzero(s.user == 2)
    assert s.split[u2].tolist() == [0] * 8 + [1, 2]         # n=10: 8 / 1 / 1
    assert [_hist(s, i) for i in u2][:4] == [[], [1], [1, 2], [2, 3]]  # truncated to the last 2
    assert _hist(s, u2[-1]) == [8, 9]


def test_history_holds_only_earlier_positives_everywhere() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    trip = np.unique(np.stack([rng.integers(1, 40, n), rng.integers(1, 90, n),
                               rng.integers(0, 200, n)], 1), axis=0)  # no duplicate rows
    trip = trip[rng.permutation(len(trip))]
    x = Interactions(trip[:, 0].astype(np.int32), trip[:, 1].astype(np.int32),
                     rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], len(trip)),
                     trip[:, 2].astype(np.int64))
    kept, label = apply_label_rule(x)
    s = build_samples(kept, label, split="temporal", max_history=7)
    for i in range(len(s)):  # brute force: earlier rows of the same user in (ts, item) order
        same = (s.user == s.user[i]) & ((s.timestamp < s.timestamp[i]) | (
            (s.timestamp == s.timestamp[i]) & (s.item < s.item[i])))
        earlier_pos = np.flatnonzero(same & (s.label == 1))
        earlier_pos = earlier_pos[np.lexsort((s.item[earlier_pos], s.timestamp[earlier_pos]))]
        assert _hist(s, i) == s.item[earlier_pos][-7:].tolist()


@pytest.mark.parametrize("split", ["temporal", "leave_one_out", "random"])
def test_without_history_values_everything_else_is_identical(split: str) -> None:
    """The writers' histories=False: same rows, splits and history lengths (the manifest's
    counts), no values. Lengths by hand: user 1 [0, 0, 1, 2, 2], user 2 [0, 1, 2 x 8]."""
    kept, label = apply_label_rule(_case())
    full = build_samples(kept, label, split=split, max_history=2, seed=5)
    lean = build_samples(kept, label, split=split, max_history=2, seed=5, histories=False)
    for f in ("user", "item", "label", "timestamp", "split", "hist_offsets"):
        assert getattr(lean, f).tolist() == getattr(full, f).tolist(), f
    assert full.hist_values.size == 5 + 17 and lean.hist_values.size == 0


def test_leave_one_out_and_random_split() -> None:
    kept, label = apply_label_rule(_case())
    s = build_samples(kept, label, split="leave_one_out", max_history=5)
    assert s.split[s.user == 2].tolist() == [0] * 8 + [1, 2]
    assert s.split[s.user == 1].tolist() == [0, 0, 0, 1, 2]
    r = build_samples(kept, label, split="random", max_history=5, seed=3)
    assert np.bincount(r.split, minlength=3).tolist() == [12, 1, 2]   # floor(.8*15), ...
    assert [_hist(r, i) for i in np.flatnonzero(r.user == 1)] == [[], [], [3], [3, 4], [3, 4]]
    r2 = build_samples(kept, label, split="random", max_history=5, seed=3)
    assert (r.split == r2.split).all()


def test_five_core_matches_brute_force_iteration() -> None:
    rng = np.random.default_rng(1)
    u = rng.integers(1, 60, 400)
    i = rng.integers(1, 50, 400)
    keep = five_core(u, i)
    alive = set(range(400))
    while True:  # brute force: drop rows of users/items with < 5 rows until nothing changes
        uc: dict[int, int] = {}
        ic: dict[int, int] = {}
        for r in alive:
            uc[u[r]] = uc.get(u[r], 0) + 1
            ic[i[r]] = ic.get(i[r], 0) + 1
        nxt = {r for r in alive if uc[u[r]] >= 5 and ic[i[r]] >= 5}
        if nxt == alive:
            break
        alive = nxt
    assert set(np.flatnonzero(keep).tolist()) == alive
    assert 0 < len(alive) < 400  # the case really filters something


def test_dense_ids_sorted_numeric_order() -> None:
    ids, vocab = dense_ids(np.array(["10", "9", "100", "9"], dtype=object))
    assert ids.tolist() == [2, 1, 3, 1]
    assert vocab.tolist() == [9, 10, 100]


def test_empty_after_label_rule_is_an_error() -> None:
    x = Interactions(np.array([1], np.int32), np.array([1], np.int32), np.array([3.0]),
                     np.array([0], np.int64))
    kept, label = apply_label_rule(x)
    with pytest.raises(DatasetError, match="no interactions"):
        build_samples(kept, label, split="temporal", max_history=5)
