"""The one module that owns metrics: AUC, LogLoss, GAUC, RelaImpr (paper Eq. 13).

Exact, not binned, and each rank holds only its own rows (memory O(rows per rank)):

- `MetricAccumulator` keeps what the model produced, compactly: scores as float32 (the logits
  are float32, or bfloat16 under autocast — both exact in float32; float64 logits are kept as
  float64), labels as int8, users as int64: 13 bytes a row, where gathering every rank's rows
  as float64 Python objects onto every rank cost ≈ 0.5 KB a row on every rank.
- `compute(env)` with one process (or no process group) scores the rows with `compute_all`:
  AUC by scikit-learn's `roc_auc_score` (exact, ties handled, float64), LogLoss in float64
  from logits, GAUC vectorised here.
- With several ranks nothing is gathered; every metric is summed from per-rank partials:
  * LogLoss: Σ softplus(±logit) in float64 and the row count, all-reduced.
  * AUC (Mann–Whitney with tie-averaged ranks, = sklearn's): by an exact distributed sort of
    the score histograms. Each rank condenses its rows into sorted (distinct score, #pos,
    #neg) triples; splitters sampled from every rank's triples (weighted quantiles) cut the
    score axis into one range per rank; `all_to_all_single` sends each triple to the rank of
    its range, which merges equal scores (a score value lives on exactly one rank, so ties are
    whole). With the global count of negatives below its range (an exclusive prefix over the
    ranks) each rank computes its integer share of 2U = Σ_v pos_v (2·neg_below_v + neg_v);
    one all-reduce adds them, AUC = 2U / (2·P·N). Integer arithmetic: exact up to
    P·N < 4.6e18 (≈ 4e9 rows). A rank receives about (Σ distinct scores per rank) / world
    triples ≤ the average rows per rank; a plain all-reduce of histograms cannot do this (its
    buffer is the global number of distinct scores on every rank), and torchmetrics /
    torchrec.metrics gather every prediction to every rank.
  * GAUC (impression-weighted mean of per-user AUCs, users with one class skipped): rows are
    routed to rank hash(user) % world by `all_to_all_single`, so each user's rows meet on one
    rank; each rank sums n_u·AUC_u and n_u over its users, one all-reduce adds them. A rank
    holds about rows / world (all rows of a user land together).
  Per-rank peak ≈ 70 bytes per row of that rank over the start-up RSS (13 stored, the rest
  sorting and exchange buffers); measured by `python -m genci_dist.bench.eval_metrics`:
  5e7 rows on 2 gloo ranks, peak RSS 2.0 GB per rank, 86 s (the replaced path: ≈ 130 bytes
  per row of all ranks on every rank, 6.6 GB per rank at 5e7 rows).
  The results equal `compute_all` on the concatenated rows to ~1e-15 (float summation order
  only; tests/test_metrics_sharded.py checks 1e-9 against sklearn on real gloo ranks).
- GAUC is NaN when no user has both a click and a non-click (leave-one-out valid/test splits
  give each user one row); rank 0 says so once per process on stderr instead of staying
  silent or warning at every evaluation.
- Labels outside {0, 1} and non-finite logits raise ValueError on every rank at `compute`
  (counted during `update`, agreed in the first all-reduce, so no rank is left waiting).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from genci_dist.runtime.distributed import DistEnv

GAUC_UNDEFINED = ("GAUC undefined: no user has both a click and a non-click in this split "
                  "(leave-one-out gives each user one row)")
SPLITTER_SAMPLES = 4096     # per rank: range partition within ~world/4096 of even
GAUC_CHUNK = 1 << 18        # rows per vectorised GAUC pass (bounds the float64 temporaries)
LOGLOSS_CHUNK = 1 << 22
_gauc_noted = False


def rela_impr(auc: float, base_auc: float) -> float:
    """Paper Eq. 13: (AUC(model) - 0.5) / (AUC(base) - 0.5) - 1, in percent."""
    return ((auc - 0.5) / (base_auc - 0.5) - 1.0) * 100.0


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")  # undefined with one class
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(F.binary_cross_entropy_with_logits(
        torch.from_numpy(np.asarray(logits, dtype=np.float64)),
        torch.from_numpy(np.asarray(labels, dtype=np.float64))))


def _gauc_block(s: np.ndarray, y: np.ndarray, u: np.ndarray) -> tuple[float, float, int]:
    """(Σ n_u AUC_u, Σ n_u, #users) over the users having both classes, for rows already
    sorted by (user, score); Mann–Whitney with tie-averaged ranks inside each user."""
    n = u.size
    new_user = np.r_[True, u[1:] != u[:-1]]
    uid = np.cumsum(new_user) - 1
    starts = np.flatnonzero(new_user)
    pos = np.arange(n) - starts[uid] + 1.0                 # 1-based rank inside the user
    tie = np.cumsum(new_user | np.r_[True, s[1:] != s[:-1]]) - 1
    rank = (np.bincount(tie, pos) / np.bincount(tie))[tie]
    del pos, tie
    yf = y.astype(np.float64)
    counts = np.bincount(uid).astype(np.float64)
    npos = np.bincount(uid, yf)
    nneg = counts - npos
    sum_rank = np.bincount(uid, rank * yf)
    ok = (npos > 0) & (nneg > 0)
    if not ok.any():
        return 0.0, 0.0, 0
    per_user = (sum_rank[ok] - npos[ok] * (npos[ok] + 1) / 2) / (npos[ok] * nneg[ok])
    return float((counts[ok] * per_user).sum()), float(counts[ok].sum()), int(ok.sum())


def gauc_sums(scores: np.ndarray, labels: np.ndarray, users: np.ndarray,
              chunk: int = GAUC_CHUNK) -> tuple[float, float, int]:
    """GAUC's numerator Σ_u n_u AUC_u, denominator Σ_u n_u and user count over the users having
    both classes, in user-aligned blocks of about `chunk` rows (a user is never split)."""
    scores, labels, users = np.asarray(scores), np.asarray(labels), np.asarray(users)
    n = users.size
    if n == 0:
        return 0.0, 0.0, 0
    order = np.lexsort((scores, users))
    u_sorted = users[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    cuts = starts[np.searchsorted(starts, np.arange(chunk, n, chunk), side="right") - 1]
    bounds = np.unique(np.r_[0, cuts, n])
    num = den = 0.0
    users_ok = 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        idx = order[a:b]
        bn, bd, bk = _gauc_block(scores[idx], labels[idx], u_sorted[a:b])
        num, den, users_ok = num + bn, den + bd, users_ok + bk
    return num, den, users_ok


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Σ_u n_u AUC_u / Σ_u n_u over users having both classes (Mann–Whitney with tie-averaged
    ranks inside each user); NaN when no user has both."""
    num, den, _ = gauc_sums(scores, labels, users)
    return num / den if den > 0 else float("nan")


def _note_gauc_undefined(value: float, samples: int, rank: int) -> None:
    """One stderr line, once per process, on rank 0, when GAUC is NaN on a non-empty split."""
    global _gauc_noted
    if np.isnan(value) and samples > 0 and rank == 0 and not _gauc_noted:
        _gauc_noted = True
        print(f"[metrics] {GAUC_UNDEFINED}", file=sys.stderr, flush=True)


def compute_all(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """Every metric over rows held by one process (the reference the sharded path equals)."""
    out = {"auc": auc(logits, labels), "logloss": logloss(logits, labels),
           "gauc": gauc(logits, labels, users), "samples": int(labels.size),
           "positive_rate": (float(np.mean(labels, dtype=np.float64)) if labels.size
                             else float("nan"))}
    _note_gauc_undefined(out["gauc"], out["samples"], 0)
    return out


# ---- exact AUC from score histograms ------------------------------------------------------
def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs."""
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, dtype=np.int32)
    start = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return sorted_values[start], np.diff(np.r_[start, sorted_values.size]).astype(np.int32)


def score_histogram(scores: np.ndarray,
                    labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted distinct scores, #positives, #negatives at each) of one rank's rows; int32
    counts (a rank holds < 2^31 rows; sums over ranks are taken in int64)."""
    pos_v, pos_c = _runs(np.sort(scores[labels == 1]))
    neg_v, neg_c = _runs(np.sort(scores[labels == 0]))
    values = np.union1d(pos_v, neg_v)
    npos = np.zeros(values.size, dtype=np.int32)
    nneg = np.zeros(values.size, dtype=np.int32)
    npos[np.searchsorted(values, pos_v)] = pos_c
    nneg[np.searchsorted(values, neg_v)] = neg_c
    return values, npos, nneg


def twice_u(npos: np.ndarray, nneg: np.ndarray, neg_below: int = 0,
            chunk: int = 1 << 20) -> int:
    """2 × the Mann–Whitney U of a sorted histogram: Σ_v pos_v (2·#neg < v + #neg = v), where
    `neg_below` negatives lie below the histogram's first value. AUC = 2U / (2·P·N). int64
    in blocks of `chunk` values (exact while 2·P·N < 2^63)."""
    total = 0
    for a in range(0, npos.size, chunk):
        p = npos[a:a + chunk].astype(np.int64)
        n = nneg[a:a + chunk].astype(np.int64)
        below = np.cumsum(n) - n + neg_below
        total += int(np.sum(p * (2 * below + n)))
        neg_below += int(n.sum())
    return total


def _merge_histograms(values: np.ndarray, npos: np.ndarray,
                      nneg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if values.size == 0:
        return values, npos, nneg
    order = np.argsort(values, kind="stable")
    v = values[order]
    start = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    del v
    return (values[order[start]], np.add.reduceat(npos[order], start, dtype=np.int64),
            np.add.reduceat(nneg[order], start, dtype=np.int64))


# ---- collectives --------------------------------------------------------------------------
def _a2a(env: DistEnv, send: np.ndarray, send_counts: np.ndarray,
         recv_counts: np.ndarray) -> np.ndarray:
    """all_to_all_single of the rows of `send` (grouped by destination, send_counts each);
    gloo implements it for CPU tensors with uneven and empty splits."""
    dev = env.device if env.backend == "nccl" else torch.device("cpu")
    src = torch.from_numpy(np.ascontiguousarray(send)).to(dev)
    out = torch.empty((int(recv_counts.sum()), *send.shape[1:]), dtype=src.dtype, device=dev)
    dist.all_to_all_single(out, src, [int(c) for c in recv_counts],
                           [int(c) for c in send_counts])
    return out.cpu().numpy()


def _exchange_counts(env: DistEnv, send_counts: np.ndarray) -> np.ndarray:
    return _a2a(env, send_counts.astype(np.int64), np.ones(env.world_size, dtype=np.int64),
                np.ones(env.world_size, dtype=np.int64))


def _all_reduce(env: DistEnv, values: list[float] | list[int], dtype: torch.dtype) -> list:
    dev = env.device if env.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=dtype, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _splitters(env: DistEnv, values: np.ndarray) -> np.ndarray:
    """world-1 score splitters: weighted quantiles of regular samples of every rank's sorted
    distinct scores, so each range receives about an equal share of all ranks' triples."""
    k = min(values.size, SPLITTER_SAMPLES)
    sample = values[(np.arange(k) * values.size) // k] if k else values[:0]
    gathered = env.all_gather_object((sample, values.size / k if k else 0.0))
    allv = np.concatenate([g[0] for g in gathered])
    if allv.size == 0:
        return allv
    allw = np.concatenate([np.full(g[0].size, g[1]) for g in gathered])
    order = np.argsort(allv, kind="stable")
    allv, cw = allv[order], np.cumsum(allw[order])
    targets = cw[-1] * np.arange(1, env.world_size) / env.world_size
    return allv[np.minimum(np.searchsorted(cw, targets, side="left"), allv.size - 1)]


def _sharded_auc(env: DistEnv, scores: np.ndarray, labels: np.ndarray, n_pos: int,
                 n_neg: int) -> float:
    values, npos, nneg = score_histogram(scores, labels)
    splitters = _splitters(env, values)
    dest = np.searchsorted(splitters, values, side="left")   # range r: (s[r-1], s[r]]
    send_counts = np.bincount(dest, minlength=env.world_size)
    del dest
    recv_counts = _exchange_counts(env, send_counts)
    values = _a2a(env, values, send_counts, recv_counts)
    pn = np.stack([npos, nneg], axis=1)
    del npos, nneg
    pn = _a2a(env, pn, send_counts, recv_counts)
    values, npos, nneg = _merge_histograms(values, pn[:, 0], pn[:, 1])
    del pn
    negs = env.all_gather_object(int(nneg.sum()))
    u2 = twice_u(npos, nneg, sum(negs[:env.rank]))
    (u2_total,) = _all_reduce(env, [u2], torch.int64)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return u2_total / (2.0 * n_pos * n_neg)


def _user_rank(users: np.ndarray, world: int) -> np.ndarray:
    """hash(user) % world (Fibonacci hashing: consecutive ids spread evenly)."""
    h = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h >>= np.uint64(32)
    h %= np.uint64(world)
    return h.astype(np.int16 if world < 2**15 else np.int32)   # small: radix-sorted


def _sharded_gauc(env: DistEnv, scores: np.ndarray, labels: np.ndarray,
                  users: np.ndarray) -> float:
    dest = _user_rank(users, env.world_size)
    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=env.world_size)
    del dest
    recv_counts = _exchange_counts(env, send_counts)
    got = [_a2a(env, a[order], send_counts, recv_counts) for a in (scores, labels, users)]
    del order
    num, den, users_ok = gauc_sums(*got)
    del got
    num, den, users_ok = _all_reduce(env, [num, den, float(users_ok)], torch.float64)
    return num / den if den > 0 else float("nan")


def _logloss_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Σ BCE-with-logits in float64: softplus(-x) for a click, softplus(x) for a non-click."""
    total = 0.0
    for a in range(0, logits.size, LOGLOSS_CHUNK):
        x = logits[a:a + LOGLOSS_CHUNK].astype(np.float64)
        total += float(np.logaddexp(0.0, np.where(labels[a:a + LOGLOSS_CHUNK] == 1, -x, x)).sum())
    return total


def compute_sharded(env: DistEnv, scores: np.ndarray, labels: np.ndarray, users: np.ndarray,
                    bad_labels: int = 0, bad_logits: int = 0) -> dict[str, float]:
    """Every metric over all ranks' rows, each rank passing only its own (labels 0/1 int8).
    One process: `compute_all`. Several: per-rank partials (module docstring)."""
    if env.pg is None or env.world_size == 1:
        _check(bad_labels, bad_logits, labels.size)
        return compute_all(scores, labels, users)
    n, n_pos, bad_labels, bad_logits, wide = _all_reduce(
        env, [labels.size, int(np.count_nonzero(labels)), bad_labels, bad_logits,
              int(scores.dtype == np.float64)], torch.int64)
    _check(bad_labels, bad_logits, n)
    if wide:
        scores = scores.astype(np.float64, copy=False)
    (loss_sum,) = _all_reduce(env, [_logloss_sum(scores, labels)], torch.float64)
    out = {"auc": _sharded_auc(env, scores, labels, n_pos, n - n_pos),
           "logloss": loss_sum / n if n else float("nan"),
           "gauc": _sharded_gauc(env, scores, labels, users), "samples": int(n),
           "positive_rate": n_pos / n if n else float("nan")}
    _note_gauc_undefined(out["gauc"], n, env.rank)
    return out


def _check(bad_labels: int, bad_logits: int, n: int) -> None:
    if bad_labels:
        raise ValueError(f"evaluation: {bad_labels} of {n} labels are not 0 or 1 (AUC, LogLoss "
                         "and GAUC need binary click labels)")
    if bad_logits:
        raise ValueError(f"evaluation: the model produced {bad_logits} NaN or infinite logits "
                         f"out of {n}; metrics are undefined")


class MetricAccumulator:
    """Collects this rank's predictions compactly (float32 scores — float64 if the logits are
    float64 —, int8 labels, int64 users); `compute` scores all ranks' rows without gathering
    them (module docstring)."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.bad_labels = 0
        self.bad_logits = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        lo = logits.detach().reshape(-1).cpu()
        lo = lo.double() if lo.dtype == torch.float64 else lo.float()
        la = labels.detach().reshape(-1).cpu()
        binary = (la == 0) | (la == 1)
        self.bad_labels += int((~binary).sum())
        self.bad_logits += int((~torch.isfinite(lo)).sum())
        # copies: a batch's tensors may be views of larger buffers that must not stay alive
        self._parts.append((lo.numpy().copy(), (la == 1).to(torch.int8).numpy(),
                            users.detach().reshape(-1).cpu().to(torch.int64).numpy().copy()))

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, labels int8, users int64) of this rank, concatenated in update order."""
        if not self._parts:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int8), np.zeros(
                0, dtype=np.int64)
        if len(self._parts) > 1:   # keep one copy, not the parts and their concatenation
            self._parts = [tuple(np.concatenate(x) for x in zip(*self._parts, strict=True))]
        return self._parts[0]

    def compute(self, env: DistEnv) -> dict[str, Any]:
        return compute_sharded(env, *self.local_arrays(), bad_labels=self.bad_labels,
                               bad_logits=self.bad_logits)
