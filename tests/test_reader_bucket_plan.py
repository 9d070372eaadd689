"""Length bucketing's plan holds no per-row state: a window's batches are computed when the
window is reached, from the lengths of the rows it covers, the same whenever and by whichever
worker they are computed; nothing O(rows) is read up front or pickled to the workers."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipes.stream import EpochPlan, RowGroup, build_loader, list_row_groups


def _groups(sizes: list[int]) -> list[RowGroup]:
    offsets = np.r_[0, np.cumsum(sizes)]
    return [RowGroup(Path(f"g{i}.parquet"), 0, n, int(offsets[i])) for i, n in enumerate(sizes)]


def test_a_window_on_a_hand_computed_case() -> None:
    """3 groups of 4 rows, one rank, batches of 3 → 4 steps, window 2. Window 0 = sequence
    positions 0-5; with every group's row order and length known, the window's samples sorted
    by length (stable) are cut into two batches of 3, each sorted by position."""
    plan = EpochPlan(_groups([4, 4, 4]), epoch=0, seed=7, shuffle=True, rank=0, world_size=1,
                     batch_size=3, bucket_window=2)
    assert plan.steps == 4 and plan.window == 2 and plan.bounds.tolist() == [0, 3, 6, 9, 12]
    lengths = {0: np.array([5, 1, 9, 3]), 1: np.array([2, 8, 4, 6]), 2: np.array([7, 0, 0, 7])}
    seen: list[int] = []

    def group(k: int) -> tuple[np.ndarray, np.ndarray]:
        seen.append(k)
        return lengths[int(plan.order[k])], plan.row_perm(k)

    w0 = plan.bucket(0, group)
    assert seen == [0, 1]          # positions 0-5: the first ordered group and 2 rows of the next
    seq = [int(lengths[int(plan.order[k])][plan.row_perm(k)[i]])
           for k in (0, 1) for i in range(4)][:6]      # length at each sequence position
    by_len = sorted(range(6), key=lambda p: seq[p])    # Python's sort is stable too
    want = [sorted(by_len[:3]), sorted(by_len[3:])]
    assert sorted(b.tolist() for b in w0) == sorted(want)
    assert max(seq[p] for p in want[0]) <= min(seq[p] for p in want[1])
    # segments turn a bucketed batch into (group, position inside its row order)
    for b in w0:
        segs = plan.segments(0, b)
        assert [k * 4 + int(p) for k, ps in segs for p in ps] == b.tolist()
    # the last window holds the rest of the sequence, exactly once
    w1 = plan.bucket(1, group)
    assert sorted(np.concatenate(w0 + w1).tolist()) == list(range(12))
    assert [len(b) for b in w1] == [3, 3]


def test_windows_are_the_same_in_any_order_and_differ_by_epoch_and_rank() -> None:
    """A worker resuming inside window 5 computes it first, another worker skips windows: each
    window must come out the same as in a pass over all windows in order."""
    groups = _groups([50] * 12)
    rng = np.random.default_rng(0)
    lengths = {g: rng.integers(0, 30, size=50) for g in range(12)}

    def windows(epoch: int, rank: int, order: list[int]) -> dict[int, list[list[int]]]:
        plan = EpochPlan(groups, epoch=epoch, seed=3, shuffle=True, rank=rank, world_size=2,
                         batch_size=8, bucket_window=4)
        def group(k: int) -> tuple[np.ndarray, np.ndarray]:
            return lengths[int(plan.order[k])], plan.row_perm(k)
        return {w: [b.tolist() for b in plan.bucket(w, group)] for w in order}

    n_windows = -(-38 // 4)        # 300 rows per rank, 38 steps
    ordered = windows(1, 0, list(range(n_windows)))
    shuffled = windows(1, 0, [5, 2, 9, 0, 7, 1, 8, 3, 4, 6])
    assert ordered == shuffled
    rows = np.concatenate([np.concatenate(ordered[w]) for w in ordered])
    assert sorted(rows.tolist()) == list(range(300))        # rank 0's half, once each
    other = windows(1, 1, list(range(n_windows)))
    assert sorted(np.concatenate([np.concatenate(other[w]) for w in other]).tolist()) == \
        list(range(300, 600))
    assert windows(2, 0, [0]) != {0: ordered[0]}


def test_the_plan_of_a_billion_rows_is_o_batches() -> None:
    """Building the plan of a 10^9-row split (10^4 groups, 10^5 batches of 10^4) and the group
    order a worker will read needs memory for its batches, not its rows (8 GB per int64 array
    of row positions), and a window costs its own rows only."""
    groups = _groups([100_000] * 10_000)
    tracemalloc.start()
    try:
        plan = EpochPlan(groups, epoch=0, seed=1, shuffle=True, rank=1, world_size=2,
                         batch_size=10_000, bucket_window=32)
        use = plan.groups_in_use_order(range(0, plan.steps, 2))
        plan.first_group(plan.steps - 1)
        held, peak = tracemalloc.get_traced_memory()
        assert plan.steps == 50_000 and sorted(use) == list(range(5_000, 10_000))  # half
        assert peak < 40 * 2**20, peak      # ~24 B per batch + per-group numbers

        def group(k: int) -> tuple[np.ndarray, np.ndarray]:
            n = groups[int(plan.order[k])].rows
            return np.zeros(n, dtype=np.int64), np.arange(n)

        tracemalloc.reset_peak()
        w = plan.bucket(700, group)
        window_peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert sum(len(b) for b in w) == 32 * 10_000
    # the window's 320,000 positions and their lengths, sorted: a few int64 arrays of its
    # rows (plus the 100,000-row groups it spans, handed in by the test), never 10^9
    assert window_peak < 64 * 2**20, window_peak


def test_nothing_is_read_up_front_and_workers_receive_no_rows(
        tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a bucketing loader reads no row group, and the dataset pickled to each worker
    is as small as without bucketing."""
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    bucketed = build_loader(tiny_dataset, "train", batch_size=5, seed=2, bucket_window=8)
    plain = build_loader(tiny_dataset, "train", batch_size=5, seed=2)
    assert reads == []
    assert len(pickle.dumps(bucketed.dataset)) == len(pickle.dumps(plain.dataset))
    assert len(bucketed) == len(plain)
    list(bucketed)
    assert len(reads) == len(list_row_groups(tiny_dataset, "train"))   # each once, when used


@pytest.mark.parametrize("nw", [0, 2])
def test_bucketing_sorts_by_the_capped_length(tiny_dataset: Path, nw: int) -> None:
    """With max_history (lengths capped at 3, so most rows tie) and with worker processes
    (each computes the windows of its own batches): within a window the batches' length
    ranges do not interleave."""
    loader = build_loader(tiny_dataset, "train", batch_size=4, seed=9, bucket_window=5,
                          max_history=3, with_tokens=False, num_workers=nw)
    lens = [b.history_lengths.numpy() for b in loader]
    assert max(int(x.max()) for x in lens) == 3
    for w in range(0, len(lens), 5):
        spans = sorted((int(x.min()), int(x.max())) for x in lens[w:w + 5])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_bucketed_ranks_have_equal_batch_sizes_at_every_step(tiny_dataset: Path) -> None:
    """Row-wise sharded tables reduce-scatter pooled embeddings over the ranks' batches, so at
    every step all ranks' batches must have the same size: a window's short batch comes at
    the same step on every rank."""
    short = 0
    for batch, window in ((4, 16), (2, 32), (7, 3)):
        sizes = []
        for rank in (0, 1):
            loader = build_loader(tiny_dataset, "train", batch_size=batch, rank=rank,
                                  world_size=2, seed=3, bucket_window=window,
                                  with_tokens=False, check_files=False)
            sizes.append([b.size for b in loader])
        assert sizes[0] == sizes[1], (batch, window)
        short += min(sizes[0]) < batch
    assert short  # some case has a short batch, so the check can fail
