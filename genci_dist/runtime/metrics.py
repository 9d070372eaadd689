"""The one module that owns metrics: AUC, LogLoss, GAUC, RelaImpr (paper Eq. 13).

Exact, not binned: every rank's (logit, label, user) triples are gathered and the metrics
computed once over all of them. AUC comes from scikit-learn's `roc_auc_score` (exact, ties
handled, float64 — torchmetrics' `binary_auroc` is exact too but returns float32, off by ~4e-8);
LogLoss in float64 from logits; GAUC (impression-weighted mean of per-user AUCs, users with one
class skipped) is vectorised here with tie-averaged ranks, because none of these libraries
offers a grouped AUC that is exact and does not loop over users in Python.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from genci_dist.runtime.distributed import DistEnv


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


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Σ_u n_u AUC_u / Σ_u n_u over users having both classes (Mann–Whitney with tie-averaged
    ranks inside each user)."""
    order = np.lexsort((scores, users))
    u, s, y = users[order], scores[order], labels[order].astype(np.float64)
    n = u.size
    if n == 0:
        return float("nan")
    new_user = np.r_[True, u[1:] != u[:-1]]
    uid = np.cumsum(new_user) - 1
    starts = np.flatnonzero(new_user)
    pos = np.arange(n) - starts[uid] + 1.0                 # 1-based rank inside the user
    tie = np.cumsum(new_user | np.r_[True, s[1:] != s[:-1]]) - 1
    rank = (np.bincount(tie, pos) / np.bincount(tie))[tie]
    counts = np.bincount(uid).astype(np.float64)
    npos = np.bincount(uid, y)
    nneg = counts - npos
    sum_rank = np.bincount(uid, rank * y)
    ok = (npos > 0) & (nneg > 0)
    if not ok.any():
        return float("nan")
    per_user = (sum_rank[ok] - npos[ok] * (npos[ok] + 1) / 2) / (npos[ok] * nneg[ok])
    return float((counts[ok] * per_user).sum() / counts[ok].sum())


def compute_all(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {"auc": auc(logits, labels), "logloss": logloss(logits, labels),
            "gauc": gauc(logits, labels, users), "samples": int(labels.size),
            "positive_rate": (float(np.mean(labels, dtype=np.float64)) if labels.size
                              else float("nan"))}


class MetricAccumulator:
    """Collects per-step predictions on this rank; `compute` gathers all ranks' and scores."""

    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        self._parts.append((logits.detach().double().cpu(), labels.detach().cpu(),
                            users.detach().cpu()))

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
        lo, la, us = (torch.cat(x).numpy() for x in zip(*self._parts, strict=True))
        return lo, la, us.astype(np.int64)

    def compute(self, env: DistEnv) -> dict[str, float]:
        gathered = env.all_gather_object(self.local_arrays())
        lo, la, us = (np.concatenate(x) for x in zip(*gathered, strict=True))
        return compute_all(lo, la, us)
