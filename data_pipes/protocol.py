"""The sample protocol shared by every source (SPEC §1): label rule, per-user ordering, splits
and click-sequence histories, all vectorised with numpy over dense ids.

Input is one row per interaction (dense user id, dense item id, rating, timestamp); output is
one row per sample with its split and its history as Arrow-style (offsets, values) arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data_pipes.schema import DatasetError

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
# Raw ids sorted numerically: ASCII integers that fit int64 ("²" or "--5" sort as strings).
_INT_ID = re.compile(r"-?[0-9]{1,18}")


@dataclass
class Interactions:
    """Dense-id interaction arrays, one entry per row (any order)."""

    user: np.ndarray       # int32, 1..n_users
    item: np.ndarray       # int32, 1..n_items
    rating: np.ndarray     # float64
    timestamp: np.ndarray  # int64


@dataclass
class Samples:
    """Protocol output in (user, timestamp, item) order."""

    user: np.ndarray          # int32
    item: np.ndarray          # int32
    label: np.ndarray         # int8
    timestamp: np.ndarray     # int64
    split: np.ndarray         # int8: 0 train, 1 valid, 2 test
    hist_offsets: np.ndarray  # int64 [n+1]
    hist_values: np.ndarray   # int32 item ids, oldest first per sample

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, idx: np.ndarray) -> Samples:
        """Rows `idx` (in that order) with their histories."""
        lengths = np.diff(self.hist_offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.hist_offsets[idx]
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Samples(self.user[idx], self.item[idx], self.label[idx], self.timestamp[idx],
                       self.split[idx], offsets, self.hist_values[gather])


@dataclass(frozen=True)
class LabelRule:
    """How a rating (or a label column) becomes a 0/1 label, and which rows are dropped.

    - ``drop-band:LO-HI``: rows with LO <= rating <= HI are dropped; label = rating > HI.
      MovieLens (SPEC §1.1) is ``drop-band:3-3`` (drop 3, > 3 positive), the default of the
      MovieLens sources only.
    - ``threshold:T``: nothing dropped; label = rating >= T (RecBole's ``threshold`` meaning).
    - ``implicit``: nothing dropped; every interaction is a positive.
    - ``label``: the value already is the label (a ``label`` column); it must be 0 or 1.
    """

    kind: Literal["drop-band", "threshold", "implicit", "label"]
    lo: float = 0.0
    hi: float = 0.0

    @staticmethod
    def parse(text: str) -> LabelRule:
        num = r"(-?\d+(?:\.\d*)?)"
        t = text.strip()
        if t in ("implicit", "label"):
            return LabelRule(t)  # type: ignore[arg-type]
        if m := re.fullmatch(rf"threshold:{num}", t):
            return LabelRule("threshold", float(m[1]), float(m[1]))
        if m := re.fullmatch(rf"drop-band:{num}-{num}", t):
            lo, hi = float(m[1]), float(m[2])
            if lo > hi:
                raise DatasetError(f"label rule {text!r}: LO {lo:g} is above HI {hi:g}")
            return LabelRule("drop-band", lo, hi)
        raise DatasetError(f"label rule {text!r}: expected threshold:T, drop-band:LO-HI, "
                           "implicit or label")

    @property
    def reads_rating(self) -> bool:
        return self.kind in ("drop-band", "threshold")

    def describe(self) -> str:
        """The manifest's ``protocol.label_rule`` text."""
        if self.kind == "drop-band":
            dropped = (f"rating {self.lo:g}" if self.lo == self.hi
                       else f"{self.lo:g} <= rating <= {self.hi:g}")
            return f"drop {dropped}; label = rating > {self.hi:g}"
        if self.kind == "threshold":
            return f"label = rating >= {self.lo:g}; nothing dropped"
        if self.kind == "implicit":
            return "implicit feedback: every interaction is a positive (label 1)"
        return "label column: label = the file's 0/1 label"

    def keep(self, value: np.ndarray) -> np.ndarray:
        """Rows the rule keeps."""
        if self.kind == "drop-band":
            return ~((value >= self.lo) & (value <= self.hi))
        return np.ones(value.shape[0], dtype=bool)

    def label(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "drop-band":
            return (value > self.hi).astype(np.int8)
        if self.kind == "threshold":
            return (value >= self.lo).astype(np.int8)
        if self.kind == "implicit":
            return np.ones(value.shape[0], dtype=np.int8)
        bad = np.flatnonzero((value != 0) & (value != 1))
        if bad.size:
            raise DatasetError(f"label column: row {int(bad[0]) + 1}: label "
                               f"{value[bad[0]]:g} is not 0 or 1")
        return value.astype(np.int8)


MOVIELENS = LabelRule("drop-band", 3.0, 3.0)


def apply_label_rule(x: Interactions, rule: LabelRule = MOVIELENS
                     ) -> tuple[Interactions, np.ndarray]:
    """Drops the rows the rule drops and labels the rest; `x.rating` holds the value the rule
    reads (the rating, or the label column for rule ``label``). Default: MovieLens, drop
    rating 3, label = rating > 3 (SPEC §1.1)."""
    if rule.kind != "implicit" and x.rating.size and not np.isfinite(x.rating).all():
        raise DatasetError("ratings contain NaN or inf")
    keep = rule.keep(x.rating)
    kept = Interactions(x.user[keep], x.item[keep], x.rating[keep], x.timestamp[keep])
    return kept, rule.label(kept.rating)


def five_core(user: np.ndarray, item: np.ndarray, k: int = 5) -> np.ndarray:
    """Boolean mask of rows surviving the iterative k-core filter on users and items."""
    keep = np.ones(user.shape[0], dtype=bool)
    while True:
        u, i = user[keep], item[keep]
        ucount = np.bincount(u, minlength=int(user.max(initial=0)) + 1)
        icount = np.bincount(i, minlength=int(item.max(initial=0)) + 1)
        ok = (ucount[user] >= k) & (icount[item] >= k) & keep
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def build_samples(x: Interactions, label: np.ndarray, *, split: Literal["temporal", "random",
                  "leave_one_out"], max_history: int, seed: int = 0,
                  histories: bool = True) -> Samples:
    """Orders per user by (timestamp, item id), assigns splits, builds histories.

    history(sample at position t of user u) = the items of u's positives at positions < t,
    the most recent `max_history` of them, oldest first (may be empty).

    histories=False keeps `hist_offsets` (the lengths, for the manifest's counts) but leaves
    `hist_values` empty: the writers store sequences, from which the reader cuts histories,
    and the values cost rows x mean history length x 20 bytes (int64 gather + int32 copy),
    which would make a partition's memory grow with its users' sequence lengths.
    """
    n = x.user.shape[0]
    if n == 0:
        raise DatasetError("no interactions left after the label rule / filters")
    order = np.lexsort((x.item, x.timestamp, x.user))
    user, item = x.user[order], x.item[order]
    ts, lab = x.timestamp[order], label[order]

    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)          # position within the user
    per_n = np.repeat(counts, counts)
    if split == "temporal":
        n_train = np.floor(0.8 * per_n).astype(np.int64)
        n_valid = np.floor(0.9 * per_n).astype(np.int64) - n_train
        sp = np.where(pos < n_train, 0, np.where(pos < n_train + n_valid, 1, 2))
    elif split == "leave_one_out":
        sp = np.where(pos == per_n - 1, 2, np.where(pos == per_n - 2, 1, 0))
    elif split == "random":
        perm = np.random.default_rng(seed).permutation(n)
        rank = np.empty(n, dtype=np.int64)
        rank[perm] = np.arange(n)
        n_tr, n_va = int(np.floor(0.8 * n)), int(np.floor(0.9 * n)) - int(np.floor(0.8 * n))
        sp = np.where(rank < n_tr, 0, np.where(rank < n_tr + n_va, 1, 2))
    else:
        raise DatasetError(f"unknown split {split!r}")

    # Earlier positives: p = number of the user's positives strictly before this row.
    cum = np.cumsum(lab, dtype=np.int64)
    before = cum - lab
    user_base = np.repeat(before[starts], counts)            # positives before the user's 1st row
    p = before - user_base
    lengths = np.minimum(p, max_history)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if histories:
        pos_items = item[lab == 1]                           # all positives, in sorted order
        first = user_base + p - lengths                      # index into pos_items
        gather = np.repeat(first - offsets[:-1], lengths) + np.arange(offsets[-1])
        hist = pos_items[gather].astype(np.int32)
    else:
        hist = np.zeros(0, dtype=np.int32)
    return Samples(user.astype(np.int32), item.astype(np.int32), lab.astype(np.int8),
                   ts.astype(np.int64), sp.astype(np.int8), offsets, hist)


def dense_ids(raw: np.ndarray, numeric: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps raw ids to 1..n in sorted raw order (numeric order when every id is an integer).
    Returns (dense ids int32 per row, vocabulary: raw id of dense id k at index k-1)."""
    raw = np.asarray(raw)
    if numeric is None:
        numeric = raw.dtype.kind in "iu" or (raw.dtype.kind in "UO" and raw.size > 0 and all(
            _INT_ID.fullmatch(str(v)) for v in np.unique(raw)))
    if numeric and raw.dtype.kind not in "iu":
        keys = raw.astype(np.int64)
    else:
        keys = raw
    vocab, inverse = np.unique(keys, return_inverse=True)
    return (inverse + 1).astype(np.int32), vocab
