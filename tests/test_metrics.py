"""Metrics against float64 references and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from genci_dist.runtime.metrics import auc, compute_all, gauc, logloss, rela_impr


def test_auc_and_logloss_match_references_with_ties() -> None:
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=2000), 1)          # rounding makes many ties
    labels = (rng.random(2000) < 1 / (1 + np.exp(-logits))).astype(np.int64)
    assert auc(logits, labels) == pytest.approx(roc_auc_score(labels, logits), abs=1e-9)
    p = 1 / (1 + np.exp(-logits))
    assert logloss(logits, labels) == pytest.approx(log_loss(labels, p), abs=1e-9)


def test_gauc_hand_case() -> None:
    # user 1: scores (0.9 pos, 0.1 neg, 0.5 pos) → AUC 1.0, 3 impressions
    # user 2: (0.2 pos, 0.8 neg) → AUC 0.0, 2 impressions
    # user 3: only positives → skipped
    # GAUC = (3 * 1.0 + 2 * 0.0) / 5 = 0.6
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.4])
    labels = np.array([1, 0, 1, 1, 0, 1, 1])
    assert gauc(scores, labels, users) == pytest.approx(0.6)


def test_gauc_ties_count_half() -> None:
    users = np.array([5, 5, 5, 5])
    scores = np.array([0.5, 0.5, 0.7, 0.1])
    labels = np.array([1, 0, 1, 0])
    # pairs (pos, neg): (0.5, 0.5) tie = 0.5, (0.5, 0.1) = 1, (0.7, 0.5) = 1, (0.7, 0.1) = 1
    assert gauc(scores, labels, users) == pytest.approx(3.5 / 4)


def test_gauc_equals_per_user_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 3000)
    scores = np.round(rng.normal(size=3000), 2)
    labels = (rng.random(3000) < 0.4).astype(int)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() != labels[m].max():
            num += m.sum() * roc_auc_score(labels[m], scores[m])
            den += m.sum()
    assert gauc(scores, labels, users) == pytest.approx(num / den, abs=1e-12)


def test_rela_impr_eq13() -> None:
    # (0.8964 - 0.5) / (0.8908 - 0.5) - 1 = 0.0056 / 0.3908 = 1.4330 %
    assert rela_impr(0.8964, 0.8908) == pytest.approx(0.0056 / 0.3908 * 100)
    assert rela_impr(0.7, 0.7) == 0.0


def test_compute_all_gauc_nan_when_no_user_has_both_classes() -> None:
    out = compute_all(np.array([0.1, 0.2]), np.array([1, 0]), np.array([1, 2]))
    assert math.isnan(out["gauc"]) and out["samples"] == 2 and out["auc"] == 0.0
    assert math.isnan(compute_all(np.array([0.1]), np.array([1]), np.array([1]))["auc"])
