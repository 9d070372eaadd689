"""Streaming, resumable reader of a prepared split, sharded by rank and then by worker.

An epoch defines one global sample sequence: the split's row groups in a seeded permutation,
each row group's rows in a seeded permutation (no shuffle for evaluation). Rank r of W takes
the contiguous slice [⌊rN/W⌋, ⌊(r+1)N/W⌋) of it, so it reads only the row groups overlapping
its slice and slice sizes differ by at most one. Every rank cuts its slice into the same number
of non-empty batches S = ⌈⌈N/W⌉ / batch⌉, so no sample is lost or seen twice in an epoch and
no collective can hang on an uneven split. Batch j of a rank is built by worker j mod
num_workers; torchdata's StatefulDataLoader fetches workers round-robin, so the batch sequence
is the same for any number of workers, and `state_dict()` (epoch, next batch per worker)
resumes mid-epoch exactly.

Length bucketing (`bucket_window` = W > 0, training only): the rank's batches are taken W at
a time; the samples of those W batches are sorted by history length (capped at max_history;
stable, so ties keep the shuffled order), cut again into the same W batch sizes, and the W
batches are put in a seeded random order. A batch then pads to a similar length (the collate
pads to the longest history in the batch), the epoch still holds every sample exactly once,
every rank runs the same steps, and the order stays a pure function of (seed, epoch, rank)
and the data, so resume is exact. The plan holds no per-row state: a worker computes a
window's batches when it reaches the window (`EpochPlan.bucket`, also on resuming inside
it), from the history lengths of the row groups the window covers (it decodes every one of
them, as its batches of that window almost always need them anyway), and drops them when it
moves on. So a worker's plan is O(batches of
the epoch) plus O(rows of one window), not O(rows of the split): before, the whole split's
lengths were read up front, pickled to every worker and turned into positions of every
batch: a worker's peak RSS over the first 100 batches of a 35.6M-row split was 2.74 GB, now
0.30 GB, flat in the split's size (2026-12-04; data_pipes/bench_bucket_plan.py).

Each worker reads and decodes a row group once per epoch (data_pipes.collate.decode_rows) and
keeps it until no later batch needs it, so it holds the decoded groups that one batch spans,
or with bucketing one window of W batches (W·batch rows plus a group at each end). With
read-ahead (the default) one more thread per iterator reads the next group its batches will
first use from Parquet while the iterator decodes and gathers batches, so one more Arrow table
is in memory; what a batch holds does not change.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipes.batch import Batch
from data_pipes.collate import Rows, decode_rows, gather_batch, load_item_tokens
from data_pipes.memory import keep_freed_memory as _keep_freed_memory
from data_pipes.quiet import quiet_known_warnings
from data_pipes.schema import (
    HISTORY,
    ITEM,
    LABEL,
    SPLITS,
    USER,
    DatasetError,
    feature_specs,
    load_manifest,
)
from data_pipes.verify import check_split_files


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int      # row group index inside the file
    rows: int
    offset: int     # global row index of its first row within the split


def list_row_groups(dataset_dir: Path, split: str) -> list[RowGroup]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    files = sorted((Path(dataset_dir) / split).glob("*.parquet"))
    if not files:
        raise DatasetError(f"{Path(dataset_dir) / split}: no Parquet shards")
    out, offset = [], 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{f}: not a readable Parquet file ({e})") from None
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            out.append(RowGroup(f, g, n, offset))
            offset += n
    return out


def num_steps(n: int, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Steps every rank runs: enough for the largest rank slice, ceil(N/W) samples; with
    drop_last, only full batches of the smallest slice, floor(N/W) samples."""
    if drop_last:
        return (n // world_size) // batch_size
    largest = -(n // -world_size)
    return -(largest // -batch_size)


def batch_sizes(n_rank: int, steps: int, batch_size: int) -> list[int]:
    """Cuts n_rank samples into exactly `steps` non-empty batches of at most batch_size."""
    if n_rank < steps:
        raise DatasetError(f"a rank has {n_rank} samples but every rank must run {steps} "
                           "steps; use fewer ranks or a smaller batch for this split")
    sizes = [batch_size] * (steps - 1) + [n_rank - (steps - 1) * batch_size]
    j = steps - 1
    while sizes[j] <= 0:  # move samples back from earlier batches until the tail is non-empty
        need = 1 - sizes[j]
        k = j - 1
        while need:
            take = min(need, sizes[k] - 1)
            sizes[k] -= take
            sizes[j] += take
            need -= take
            k -= 1
    return sizes


class EpochPlan:
    """The global order of one epoch and this rank's batches within it: O(groups + batches)
    numbers, whatever the split's size. A bucketing window's batches are computed when the
    window is reached (`bucket`), from the history lengths of the rows it covers."""

    def __init__(self, groups: list[RowGroup], epoch: int, seed: int, shuffle: bool, rank: int,
                 world_size: int, batch_size: int, drop_last: bool = False,
                 bucket_window: int = 0) -> None:
        self.groups = groups
        self.seed, self.epoch, self.shuffle, self.rank = seed, epoch, shuffle, rank
        n = sum(g.rows for g in groups)
        self.order = (np.random.default_rng((seed, epoch)).permutation(len(groups)) if shuffle
                      else np.arange(len(groups)))
        sizes = np.array([groups[i].rows for i in self.order], dtype=np.int64)
        self.starts = np.r_[0, np.cumsum(sizes)]          # sequence start of each ordered group
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        steps = num_steps(n, world_size, batch_size, drop_last)
        self.steps = steps
        if drop_last:  # full batches from the slice start; the slice's tail is skipped
            bs = [batch_size] * steps
        else:
            bs = batch_sizes(hi - lo, steps, batch_size) if steps else []
        self.bounds = lo + np.r_[0, np.cumsum(bs)].astype(np.int64)
        self.bucketed = bucket_window > 0 and shuffle and steps > 0
        # batches whose samples are drawn from one run of the sequence
        self.window = bucket_window if self.bucketed else 1

    def window_groups(self, w: int) -> range:
        """The ordered groups (k) whose rows the batches of bucketing window w hold."""
        j0, j1 = w * self.window, min((w + 1) * self.window, self.steps)
        lo, hi = int(self.bounds[j0]), int(self.bounds[j1])
        if hi <= lo:
            return range(0)
        return range(int(np.searchsorted(self.starts, lo, side="right")) - 1,
                     int(np.searchsorted(self.starts, hi - 1, side="right")))

    def bucket(self, w: int, group: Callable[[int], tuple[np.ndarray, np.ndarray]]
               ) -> list[np.ndarray]:
        """Sequence positions of the batches of bucketing window w (batches w·W …), from
        group(k) = (history length of each row of ordered group k in file order, the group's
        row order this epoch) for the window's groups. O(rows of the window); a pure function
        of (seed, epoch, rank, w) and the data, so any worker computes it alike at any time; the
        batch order within the window is (seed, epoch, w)'s on every rank."""
        j0, j1 = w * self.window, min((w + 1) * self.window, self.steps)
        lo, hi = int(self.bounds[j0]), int(self.bounds[j1])
        pos, lens = [], []
        for k in self.window_groups(w):
            s0 = int(self.starts[k])
            a, b = max(lo, s0) - s0, min(hi, int(self.starts[k + 1])) - s0
            hist_len, perm = group(k)
            pos.append(np.arange(a + s0, b + s0, dtype=np.int64))
            lens.append(hist_len[perm[a:b]])
        p = np.concatenate(pos)
        p = p[np.argsort(np.concatenate(lens), kind="stable")]  # ties keep the shuffled order
        cuts = self.bounds[j0:j1 + 1] - lo
        batches = [np.sort(p[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        # The same batch order on every rank (no rank in the seed): ranks have the same batch
        # sizes, so a window's short batch comes at the same step on each, and sharded
        # tables' collectives (row-wise reduce-scatter / all-gather) see equal batch sizes.
        rng = np.random.default_rng((self.seed, self.epoch, 1 << 20, w))
        return [batches[i] for i in rng.permutation(len(batches))]

    def row_perm(self, k: int) -> np.ndarray:
        """Row order inside the k-th group of the epoch order."""
        g = int(self.order[k])
        if not self.shuffle:
            return np.arange(self.groups[g].rows)
        return np.random.default_rng((self.seed, self.epoch, g)).permutation(self.groups[g].rows)

    @functools.cached_property
    def _index(self) -> np.ndarray:
        """[3, steps] int64, computed once for the epoch so a batch costs no binary searches:
        each batch's first and last group (contiguous batches) and the first group any batch
        ≥ j can still need. (numpy, not lists: 24 bytes per batch at any epoch size.)"""
        js = np.arange(self.steps)
        return np.stack([
            np.searchsorted(self.starts, self.bounds[js], side="right") - 1,
            np.searchsorted(self.starts, self.bounds[js + 1] - 1, side="right") - 1,
            np.searchsorted(self.starts, self.bounds[js - js % self.window], side="right") - 1])

    def groups_in_use_order(self, batches: range) -> list[int]:
        """The ordered groups (k) the given batches read, each once, in the order of first use
        (bucketed: every group of each window they fall in, as `bucket` reads them)."""
        if not self.bucketed:   # contiguous batches: group ranges
            k0, k1 = self._index[:2, batches.start:batches.stop:batches.step].tolist()
            return list(dict.fromkeys(k for a, b in zip(k0, k1, strict=True)
                                      for k in range(a, b + 1)))
        windows = dict.fromkeys(j // self.window for j in batches)
        return list(dict.fromkeys(k for w in windows for k in self.window_groups(w)))

    def first_group(self, j: int) -> int:
        """The first ordered group any batch ≥ j can still need: that of j's bucketing
        window (its batches come in random order), and group ranges only grow later."""
        return int(self._index[2, j])

    def segments(self, j: int, pos: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
        """Batch j as [(ordered group k, positions inside that group's row order)]; bucketed,
        `pos` = its sequence positions (from `bucket`)."""
        if pos is None:  # a contiguous run of the sequence: cut at group starts
            k0, k1, _ = self._index[:, j].tolist()
            lo, hi = int(self.bounds[j]), int(self.bounds[j + 1])
            out = []
            for k in range(k0, k1 + 1):
                s0, s1 = int(self.starts[k]), int(self.starts[k + 1])
                out.append((k, np.arange(max(lo, s0) - s0, min(hi, s1) - s0)))
            return out
        k = np.searchsorted(self.starts, pos, side="right") - 1
        cut = np.flatnonzero(np.diff(k)) + 1
        return [(int(kk[0]), p - int(self.starts[kk[0]]))
                for kk, p in zip(np.split(k, cut), np.split(pos, cut), strict=True)]


@dataclass
class _WorkerCache:
    """What one iterator (one worker) keeps between batches."""

    groups: dict[int, tuple[Rows, np.ndarray]] = field(default_factory=dict)  # by order k
    # open files and the columns read from each
    files: dict[Path, tuple[pq.ParquetFile, list[str]]] = field(default_factory=dict)
    # Read-ahead: one thread reads the groups this iterator needs next from Parquet, in order
    # of first use (`upcoming`), while this thread decodes and gathers batches; `pending`
    # holds at most one group in flight. Only that thread opens files: `files` needs no lock.
    pool: ThreadPoolExecutor | None = None
    upcoming: deque[int] = field(default_factory=deque)
    pending: dict[int, Future] = field(default_factory=dict)
    # Length bucketing: the bucketing window being served, (w, its batches' positions)
    window: tuple[int, list[np.ndarray]] | None = None


class StreamingSplit(IterableDataset):
    """Yields this rank's Batches of one split for the current epoch (see module docstring)."""

    def __init__(self, dataset_dir: str | Path, split: str, *, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, with_tokens: bool = True,
                 pad_history_to: int | None = None, max_history: int | None = None,
                 drop_last: bool = False, bucket_window: int = 0,
                 with_history_ids: bool = True, read_ahead: bool = True,
                 check_files: bool = True) -> None:
        super().__init__()
        self.read_ahead = read_ahead
        self.bucket_window = bucket_window if shuffle else 0
        self.drop_last = drop_last
        self.max_history = max_history
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.pad_history_to = seed, shuffle, pad_history_to
        self.with_history_ids = with_history_ids
        manifest = load_manifest(self.dataset_dir)
        if check_files:   # the shards are the manifest's, byte for byte (data_pipes/verify.py)
            check_split_files(self.dataset_dir, split, manifest)
        self.features = feature_specs(manifest)
        self.columns = [USER, ITEM, LABEL, HISTORY, *(f.name for f in self.features)]
        self.groups = list_row_groups(self.dataset_dir, split)
        self.item_tokens = load_item_tokens(self.dataset_dir)[0] if with_tokens else None
        self.epoch = 0
        self._next = 0       # next batch index of this worker's next yield
        self._resume: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a worker without a memory-mapped token table's contents (pickling a
        memmap copies it); the worker maps the same file again (`__setstate__`)."""
        state = self.__dict__.copy()
        state["_tokens_mapped"] = isinstance(self.item_tokens, np.memmap)
        if state["_tokens_mapped"]:
            state["item_tokens"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        mapped = state.pop("_tokens_mapped", False)
        self.__dict__.update(state)
        if mapped:
            self.item_tokens = load_item_tokens(self.dataset_dir)[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._next = 0

    def plan(self) -> EpochPlan:
        return EpochPlan(self.groups, self.epoch, self.seed, self.shuffle, self.rank,
                         self.world_size, self.batch_size, self.drop_last,
                         self.bucket_window)

    def __len__(self) -> int:
        return self.plan().steps

    def _read(self, plan: EpochPlan, k: int, cache: _WorkerCache) -> tuple[Rows, np.ndarray]:
        """(the k-th group of the epoch order, decoded and validated once; its row order this
        epoch), cached per worker while batches still need it."""
        if k not in cache.groups:
            if cache.pool is None:
                table = self._read_table(plan, k, cache)
            else:   # read ahead or, out of sequence, now; the thread's errors re-raise here
                fut = (cache.pending.pop(k, None)
                       or cache.pool.submit(self._read_table, plan, k, cache))
                table = fut.result()
            cache.groups[k] = self._decode(plan, k, table)
        return cache.groups[k]

    def _top_up(self, plan: EpochPlan, cache: _WorkerCache) -> None:
        """Keeps one group in flight on the read-ahead thread: the next one first used."""
        while cache.pool is not None and not cache.pending and cache.upcoming:
            k = cache.upcoming.popleft()
            if k not in cache.groups:
                cache.pending[k] = cache.pool.submit(self._read_table, plan, k, cache)

    def _read_table(self, plan: EpochPlan, k: int, cache: _WorkerCache) -> pa.Table:
        """The k-th group of the epoch order as read from Parquet (the read-ahead thread's
        whole job: Arrow reads without holding the GIL, so it overlaps the gathering thread;
        decoding there too was slower, 0.39 → 0.32 s wall per ML-1M epoch, the data_pipes/bench_reader.py docstring)."""
        g = plan.groups[int(plan.order[k])]
        try:
            # The file stays open (re-opening re-parses its footer for every row group);
            # only a few are kept open. Only the columns a Batch uses are decoded (a
            # missing one is left out here and named by decode_rows), and on this thread:
            # Arrow's pool costs ~25% more CPU for these small row groups and competes
            # with the trainer's threads (measured, the data_pipes/bench_reader.py docstring).
            if g.path not in cache.files:
                if len(cache.files) >= 4:
                    del cache.files[next(iter(cache.files))]
                pf = pq.ParquetFile(g.path)
                present = set(pf.schema_arrow.names)
                cache.files[g.path] = (pf, [c for c in self.columns if c in present])
            pf, columns = cache.files[g.path]
            return pf.read_row_group(g.index, use_threads=False, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{g.path}: row group {g.index} unreadable ({e})") from None

    def _decode(self, plan: EpochPlan, k: int, table: pa.Table) -> tuple[Rows, np.ndarray]:
        """Validates and decodes the k-th group's table (data_pipes.collate.decode_rows)."""
        g = plan.groups[int(plan.order[k])]

        def where(row: int | None, g: RowGroup = g) -> str:  # only called to word an error
            return (f"{g.path} (row group {g.index})" if row is None
                    else f"{g.path} (row group {g.index}, row {row})")

        rows = decode_rows(table, self.features, where, self.max_history,
                           None if self.item_tokens is None else self.item_tokens.shape[0],
                           dense_history=self.with_history_ids
                           or self.item_tokens is not None)
        return rows, plan.row_perm(k)

    def _lengths(self, plan: EpochPlan, cache: _WorkerCache,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """(history lengths of the k-th group's rows, capped at max_history; its row order):
        what `EpochPlan.bucket` sorts by, from the decoded group the window's batches read."""
        rows, perm = self._read(plan, k, cache)
        self._top_up(plan, cache)   # keep the read-ahead thread on the window's next group
        return rows.hist_len, perm

    def build(self, plan: EpochPlan, j: int, cache: _WorkerCache) -> Batch:
        first = plan.first_group(j)
        for old in [k for k in cache.groups if k < first]:
            del cache.groups[old]  # no later batch of this epoch reads it again
        self._top_up(plan, cache)
        positions = None
        if plan.bucketed:
            w = j // plan.window
            if cache.window is None or cache.window[0] != w:
                cache.window = None     # the previous window's positions go first
                cache.window = (w, plan.bucket(w, functools.partial(self._lengths, plan,
                                                                    cache)))
            positions = cache.window[1][j - w * plan.window]
        parts, row_ids = [], []
        for k, pos in plan.segments(j, positions):
            rows, perm = self._read(plan, k, cache)
            idx = perm[pos]      # this batch's rows of the group: a gather, no group shuffle
            parts.append((rows, idx))
            row_ids.append(plan.groups[int(plan.order[k])].offset + idx)
        return gather_batch(parts, np.concatenate(row_ids) if len(row_ids) > 1 else row_ids[0],
                            self.features, self.item_tokens, self.pad_history_to,
                            self.with_history_ids)

    def __iter__(self):  # noqa: ANN204
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan()
        start = self._next
        if self._resume is not None:
            if self._resume["epoch"] == self.epoch:
                start = self._resume["next"]
            self._resume = None
        if start >= plan.steps:  # a finished epoch iterated again starts over
            start = 0
        cache = _WorkerCache()
        j = start if start % nw == wid else start + (wid - start % nw) % nw
        if self.read_ahead and j < plan.steps:
            cache.upcoming.extend(plan.groups_in_use_order(range(j, plan.steps, nw)))
            cache.pool = ThreadPoolExecutor(1, thread_name_prefix="reader-read-ahead")
        try:
            while j < plan.steps:
                batch = self.build(plan, j, cache)
                self._next = j + nw
                yield batch
                j += nw
            self._next = plan.steps
        finally:    # also when the consumer drops the iterator mid-epoch
            if cache.pool is not None:
                cache.pool.shutdown(wait=False, cancel_futures=True)

    # ---- torchdata Stateful protocol (called in the worker that owns this copy) ---------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next": self._next, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["rank"], state["world_size"]) != (
                self.seed, self.rank, self.world_size):
            raise DatasetError(f"loader state for seed/rank/world {state['seed']}/"
                               f"{state['rank']}/{state['world_size']} does not match this "
                               f"reader ({self.seed}/{self.rank}/{self.world_size})")
        self._resume = {"epoch": state["epoch"], "next": state["next"]}


# Workers start from a fork server, not by forking the trainer: a worker forked from a
# process that holds a model's activations keeps a private copy of every heap page the trainer
# writes afterwards (copy-on-write), i.e. the trainer's whole peak heap — measured 6.2 GB per
# worker beside a 6.6 GB GenCI ML-100K trainer, enough for the OOM killer on a shared machine.
# The fork server is a fresh interpreter: a worker costs its own imports and its data only.
# The server imports this module (torch, torchrec, pyarrow) once, so a worker starts in
# milliseconds; without the preload each worker re-imported them (~3 s).
_WORKER_START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if _WORKER_START == "forkserver":
    mp.get_context("forkserver").set_forkserver_preload([__name__])


def build_loader(dataset_dir: str | Path, split: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, pad_history_to: int | None = None,
                 with_tokens: bool = True, max_history: int | None = None,
                 bucket_window: int = 0, with_history_ids: bool = True,
                 keep_freed_memory: bool = False, read_ahead: bool = True,
                 check_files: bool = True) -> StatefulDataLoader:
    """A StatefulDataLoader over this rank's batches (batches are built in the dataset).
    drop_last=False: every sample exactly once, ⌈⌈N/W⌉/batch⌉ steps per rank, the last batches
    may be short. drop_last=True: ⌊⌊N/W⌋/batch⌋ full batches per rank, the rest is skipped.
    with_tokens / with_history_ids: the history as semantic-ID tokens / as item ids (the
    sequence KJT and the dense `history`); a model asks only for what it reads
    (genci_dist.model.build.batch_fields). keep_freed_memory: each worker process applies
    data_pipes.memory.keep_freed_memory (the trainer's own process applies it itself).
    read_ahead: each iterator (the main process's, or each worker's) reads its next row group
    from Parquet on a second thread while it decodes and gathers batches.
    check_files: before anything is read, the split's shards must be exactly the manifest's
    (names, sizes, sha256; data_pipes.verify.check_split_files, which hashes a file only when
    its size or mtime changed since it was last found intact); False skips it (tests of the
    row checks on deliberately edited shards). Rows are always validated as they are decoded
    (data_pipes.collate.decode_rows: strict types, no nulls, ids in range, labels 0/1)."""
    ds = StreamingSplit(dataset_dir, split, batch_size=batch_size, rank=rank,
                        world_size=world_size, seed=seed, shuffle=shuffle,
                        with_tokens=with_tokens, pad_history_to=pad_history_to,
                        max_history=max_history, drop_last=drop_last,
                        bucket_window=bucket_window, with_history_ids=with_history_ids,
                        read_ahead=read_ahead, check_files=check_files)
    # Its own generator: creating an iterator draws a base seed, which must not consume the
    # global torch RNG (dropout masks) or a resumed run would diverge from an uninterrupted one.
    return StatefulDataLoader(ds, batch_size=None, num_workers=num_workers,
                              generator=torch.Generator().manual_seed(seed),
                              persistent_workers=False, pin_memory=torch.cuda.is_available(),
                              worker_init_fn=functools.partial(_init_worker, keep_freed_memory)
                              if num_workers else None,
                              multiprocessing_context=_WORKER_START if num_workers else None)


def _init_worker(keep_freed: bool, _worker_id: int) -> None:
    """A worker process's start-up: the known-harmless library warnings silenced (it builds
    TorchRec inputs too), and the trainer's malloc policy when asked."""
    quiet_known_warnings()
    if keep_freed:
        _keep_freed_memory()


def steps_per_epoch(dataset_dir: str | Path, split: str, *, batch_size: int,
                    world_size: int, drop_last: bool = False) -> int:
    """Batches every rank yields per epoch (from Parquet metadata, no scan)."""
    n = sum(g.rows for g in list_row_groups(Path(dataset_dir), split))
    return num_steps(n, world_size, batch_size, drop_last)
