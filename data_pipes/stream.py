"""Streaming, resumable reader of a prepared split, sharded by rank and then by worker.

The data are sequence row groups (data_pipes/sequences.py): each holds whole users, and a
split's samples in it are cut out of their sequences when the group is decoded; the manifest
says how many samples of each split every group holds, so an epoch is planned without opening
a file. An epoch defines one global sample sequence: the row groups holding the split in a
seeded permutation, cut into blocks of `shuffle_block` consecutive groups, each block's
samples in a seeded permutation (no shuffle for evaluation: file order). A group holds only a
few dozen users, so shuffling inside a group alone would fill a batch with the samples of
those few users; a block mixes M groups' users while a worker still holds one block, not the
split. Rank r of W takes the contiguous slice [⌊rN/W⌋, ⌊(r+1)N/W⌋) of the sequence, so it
reads only the blocks overlapping its slice and slice sizes differ by at most one. Every rank cuts its slice into the same number
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

Each worker reads and decodes a block once per epoch (data_pipes.blocks.decode_block: the
samples cut straight into the epoch's row order, then data_pipes.blocks.assemble_batch per
batch) and keeps it until no later batch needs it, so it holds the decoded blocks that one
batch spans, or with bucketing one window of W batches (W·batch rows plus a block at each
end). With read-ahead (the default) one more thread per iterator reads the next block its
batches will first use from Parquet and decodes it while the iterator builds batches, so one
more block is in memory; what a batch holds does not change.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections import deque
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
from data_pipes.blocks import Block, assemble_batch, concat_blocks, decode_block, field_tables
from data_pipes.collate import load_item_tokens
from data_pipes.epoch_plan import EpochPlan as EpochPlan
from data_pipes.epoch_plan import RowGroup as RowGroup
from data_pipes.epoch_plan import batch_sizes as batch_sizes
from data_pipes.epoch_plan import list_row_groups as list_row_groups
from data_pipes.epoch_plan import num_steps as num_steps
from data_pipes.memory import keep_freed_memory as _keep_freed_memory
from data_pipes.quiet import quiet_known_warnings
from data_pipes.schema import (
    ITEM,
    LABELS,
    MANIFEST,
    SEQ_ITEMS,
    SEQ_SPLITS,
    SPLITS,
    USER,
    DatasetError,
    feature_specs,
    load_manifest,
)
from data_pipes.sequences import (
    block_where,
    group_where,
    load_item_side,
    manifest_max_history,
    user_columns,
)
from data_pipes.verify import check_split_files


@dataclass
class _WorkerCache:
    """What one iterator (one worker) keeps between batches."""

    # decoded blocks by order k, their samples in this epoch's row order
    groups: dict[int, Block] = field(default_factory=dict)
    # open files and the columns read from each
    files: dict[Path, tuple[pq.ParquetFile, list[str]]] = field(default_factory=dict)
    # Read-ahead: one thread reads the groups this iterator needs next from Parquet, in order
    # of first use (`upcoming`) and decodes them, while this thread builds batches; `pending`
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
                 check_files: bool = True, shuffle_block: int = 16) -> None:
        super().__init__()
        self.shuffle_block = max(1, int(shuffle_block))
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
        stored = manifest_max_history(manifest, self.dataset_dir / MANIFEST)
        self.history_cap = stored if max_history is None else min(stored, max_history)
        self.columns = [USER, *(f.name for f in user_columns(self.features)), SEQ_ITEMS,
                        LABELS, SEQ_SPLITS]
        self.groups = list_row_groups(self.dataset_dir, split, manifest)
        item_side = load_item_side(self.dataset_dir, self.features)
        self.fields = field_tables(self.features, item_side.single, item_side.multi)
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
                         self.bucket_window, self.shuffle_block)

    def __len__(self) -> int:
        return self.plan().steps

    def _read(self, plan: EpochPlan, k: int, cache: _WorkerCache) -> Block:
        """The k-th block of the epoch order, decoded and validated once, its samples in this
        epoch's row order; cached per worker while batches still need it."""
        if k not in cache.groups:
            if cache.pool is None:
                cache.groups[k] = self._decode(plan, k, self._read_tables(plan, k, cache))
            else:   # read ahead or, out of sequence, now; the thread's errors re-raise here
                fut = (cache.pending.pop(k, None)
                       or cache.pool.submit(self._read_block, plan, k, cache))
                cache.groups[k] = fut.result()
        return cache.groups[k]

    def _top_up(self, plan: EpochPlan, cache: _WorkerCache) -> None:
        """Keeps one block in flight on the read-ahead thread: the next one first used."""
        while cache.pool is not None and not cache.pending and cache.upcoming:
            k = cache.upcoming.popleft()
            if k not in cache.groups:
                cache.pending[k] = cache.pool.submit(self._read_block, plan, k, cache)

    def _read_block(self, plan: EpochPlan, k: int, cache: _WorkerCache) -> Block:
        """The read-ahead thread's job: read the block and decode it. Arrow reads and the
        compiled cut (data_pipes/kernels.py, nogil) run without the GIL, so this overlaps the
        batches built meanwhile: 0.117 / 0.115 -> 0.109 / 0.100 s per ML-1M epoch for the
        fields layout, 0.209 / 0.195 -> 0.191 / 0.192 for GenCI's (2026-12-06, two
        interleaved rounds of data_pipes.bench_reader; a numpy decode there was slower)."""
        return self._decode(plan, k, self._read_tables(plan, k, cache))

    def _read_tables(self, plan: EpochPlan, k: int, cache: _WorkerCache) -> list[pa.Table]:
        """The row groups of the k-th block of the epoch order as read from Parquet."""
        out = []
        for gi in plan.blocks[k]:
            g = plan.groups[int(gi)]
            try:
                # The file stays open (re-opening re-parses its footer for every row group);
                # only a few are kept open. Only the columns a Batch uses are decoded (a
                # missing one is left out here and named by the decoding), and on this
                # thread: Arrow's pool costs ~25% more CPU for these small row groups and
                # competes with the trainer's threads (the data_pipes/bench_reader.py
                # docstring).
                if g.path not in cache.files:
                    if len(cache.files) >= 4:
                        del cache.files[next(iter(cache.files))]
                    pf = pq.ParquetFile(g.path)
                    present = set(pf.schema_arrow.names)
                    cache.files[g.path] = (pf, [c for c in self.columns if c in present])
                pf, columns = cache.files[g.path]
                out.append(pf.read_row_group(g.index, use_threads=False, columns=columns))
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{g.path}: row group {g.index} unreadable ({e})") from None
        return out

    def _decode(self, plan: EpochPlan, k: int, tables: list[pa.Table]) -> Block:
        """Validates the k-th block's row groups and cuts this split's samples out of them in
        this epoch's row order, as one Block (data_pipes.blocks.decode_block)."""
        code = SPLITS.index(self.split)
        groups = [plan.groups[int(gi)] for gi in plan.blocks[k]]
        if len(tables) > 1 and all(t.schema.equals(tables[0].schema) for t in tables[1:]):
            # one table for the block: one decode, no copy to join decoded groups
            table = pa.concat_tables(tables)
            parts = [(table, groups, block_where(groups, [t.num_rows for t in tables]))]
        else:   # a group's schema differs (damage): each is checked and named on its own
            parts = [(t, [g], group_where(g.path, g.index)) for t, g in zip(tables, groups,
                                                                           strict=True)]
        item_card = next((f.cardinality for f in self.features if f.name == ITEM), None)
        token_rows = None if self.item_tokens is None else self.item_tokens.shape[0]
        order, ids = plan.row_perm(k), plan.row_ids(k)
        if len(parts) == 1:     # cut straight into this epoch's row order
            table, gs, where = parts[0]
            return decode_block(table, code, self.split, sum(g.rows for g in gs),
                                self.history_cap, self.features, self.fields, where, item_card,
                                token_rows, order, ids)
        return concat_blocks([
            decode_block(table, code, self.split, sum(g.rows for g in gs), self.history_cap,
                         self.features, self.fields, where, item_card, token_rows)
            for table, gs, where in parts]).arranged(order, ids)

    def _lengths(self, plan: EpochPlan, cache: _WorkerCache,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
        """(history lengths of the k-th group's rows, capped at max_history; its row order):
        what `EpochPlan.bucket` sorts by, from the decoded group the window's batches read."""
        block = self._read(plan, k, cache)
        self._top_up(plan, cache)   # keep the read-ahead thread on the window's next group
        return block.hist_len, np.arange(block.order.size)   # rows already in this order

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
        # this batch's rows of each block: positions in the block's order = its rows
        parts = [(self._read(plan, k, cache), pos) for k, pos in plan.segments(j, positions)]
        return assemble_batch(parts, self.features, self.fields, self.item_tokens,
                              self.pad_history_to, self.with_history_ids)

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
# The server imports data_pipes.worker_preload (this module: torch, torchrec, pyarrow; and the
# numba kernels, loaded) once, so a worker starts in milliseconds; without the preload each
# worker re-imported them (~3 s).
_WORKER_START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if _WORKER_START == "forkserver":
    mp.get_context("forkserver").set_forkserver_preload(["data_pipes.worker_preload"])


def build_loader(dataset_dir: str | Path, split: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, pad_history_to: int | None = None,
                 with_tokens: bool = True, max_history: int | None = None,
                 bucket_window: int = 0, with_history_ids: bool = True,
                 keep_freed_memory: bool = False, read_ahead: bool = True,
                 check_files: bool = True, shuffle_block: int = 16) -> StatefulDataLoader:
    """A StatefulDataLoader over this rank's batches (batches are built in the dataset).
    drop_last=False: every sample exactly once, ⌈⌈N/W⌉/batch⌉ steps per rank, the last batches
    may be short. drop_last=True: ⌊⌊N/W⌋/batch⌋ full batches per rank, the rest is skipped.
    with_tokens / with_history_ids: the history as semantic-ID tokens / as item ids (the
    sequence KJT and the dense `history`); a model asks only for what it reads
    (genci_dist.model.build.batch_fields). keep_freed_memory: each worker process applies
    data_pipes.memory.keep_freed_memory (the trainer's own process applies it itself).
    read_ahead: each iterator (the main process's, or each worker's) reads its next block of
    row groups from Parquet and decodes them on a second thread while it builds batches.
    shuffle_block: row groups (each a random set of whole users) whose samples are shuffled
    jointly (training); max_history: histories cut to the most recent max_history items (at
    most the manifest's protocol.max_history).
    check_files: before anything is read, the split's shards must be exactly the manifest's
    (names, sizes, sha256; data_pipes.verify.check_split_files, which hashes a file only when
    its size or mtime changed since it was last found intact); False skips it (tests of the
    row checks on deliberately edited shards). Rows are always validated as they are decoded
    (data_pipes.sequences.cut_samples: strict types, no nulls, ids in range, labels 0/1, split
    codes 0/1/2, one label and split code per position)."""
    ds = StreamingSplit(dataset_dir, split, batch_size=batch_size, rank=rank,
                        world_size=world_size, seed=seed, shuffle=shuffle,
                        with_tokens=with_tokens, pad_history_to=pad_history_to,
                        max_history=max_history, drop_last=drop_last,
                        bucket_window=bucket_window, with_history_ids=with_history_ids,
                        read_ahead=read_ahead, check_files=check_files,
                        shuffle_block=shuffle_block)
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
    """Batches every rank yields per epoch (from the manifest's per-group counts, no scan)."""
    n = sum(g.rows for g in list_row_groups(Path(dataset_dir), split))  # the manifest's
    return num_steps(n, world_size, batch_size, drop_last)
