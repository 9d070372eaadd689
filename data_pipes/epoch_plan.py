"""An epoch's plan (the global sample order and this rank's batches within it; the
data_pipes/stream.py docstring describes it) and the split's sequence row groups it orders,
listed from the manifest."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipes.schema import SEQUENCES, SPLITS, DatasetError, load_manifest


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int      # row group index inside the file
    rows: int
    offset: int     # global row index of its first row within the split


def list_row_groups(dataset_dir: Path, split: str,
                    manifest: dict[str, Any] | None = None) -> list[RowGroup]:
    """The sequence row groups holding samples of `split`, in file order, each with that
    split's sample count (the manifest's per-group counts: no file is opened)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir) if manifest is None else manifest
    code = SPLITS.index(split)
    rels = sorted(r for r in manifest.get("files", {}) if r.startswith(f"{SEQUENCES}/"))
    if not rels:
        raise DatasetError(f"{dataset_dir / SEQUENCES}: no sequence shards in the manifest")
    out, offset = [], 0
    for rel in rels:
        try:
            groups = [int(g[code]) for g in manifest["files"][rel]["groups"]]
        except (KeyError, TypeError, ValueError, IndexError):
            raise DatasetError(f"{dataset_dir / 'manifest.json'}: files[{rel!r}] has no "
                               "per-row-group sample counts ('groups')") from None
        for g, n in enumerate(groups):
            if n:
                out.append(RowGroup(dataset_dir / rel, g, n, offset))
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
                 bucket_window: int = 0, shuffle_block: int = 1) -> None:
        self.groups = groups
        self.seed, self.epoch, self.shuffle, self.rank = seed, epoch, shuffle, rank
        n = sum(g.rows for g in groups)
        order = (np.random.default_rng((seed, epoch)).permutation(len(groups)) if shuffle
                 else np.arange(len(groups)))
        self.order = order
        m = max(1, int(shuffle_block))
        # the plan's unit: a block of m consecutive groups of the epoch order
        self.blocks = [order[i:i + m] for i in range(0, len(groups), m)]
        sizes = np.array([sum(groups[g].rows for g in b) for b in self.blocks], dtype=np.int64)
        self.starts = np.r_[0, np.cumsum(sizes)]          # sequence start of each block
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

    def block_rows(self, k: int) -> int:
        return int(self.starts[k + 1] - self.starts[k])

    def row_perm(self, k: int) -> np.ndarray:
        """Row order inside the k-th block of the epoch order (its groups' rows jointly)."""
        if not self.shuffle:
            return np.arange(self.block_rows(k))
        return np.random.default_rng((self.seed, self.epoch, int(self.blocks[k][0]))
                                     ).permutation(self.block_rows(k))

    def row_ids(self, k: int) -> np.ndarray:
        """Split row index of each row of block k, in the block's file order."""
        return np.concatenate([self.groups[g].offset + np.arange(self.groups[g].rows)
                               for g in self.blocks[k]])

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
