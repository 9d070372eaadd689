"""Metrics (genci_dist.runtime.metrics) against float64 references and hand-computed cases, and the
MetricAccumulator over two real gloo ranks holding uneven shares of the predictions."""

from __future__ import annotations

import itertools
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score

from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.metrics import MetricAccumulator, auc, compute_all, gauc, logloss, rela_impr


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: P(score_pos > score_neg) + 0.5 P(tie) over all (pos, neg) pairs."""
    pos = scores[labels == 1].astype(np.float64)
    neg = scores[labels == 0].astype(np.float64)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_auc_hand_cases_and_ties() -> None:
    """AUC on hand cases (one tie counted 1/2), float64 resolution, and one class → NaN."""
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # pairs (pos, neg): (.5,.5) tie → 0.5, (.5,.2), (.9,.5), (.9,.2) → 1 each: 3.5 / 4
    assert auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == 0.875
    # differences of 1e-12 vanish in float32 (AUC would be 0.5) but not in float64
    s = 0.5 + np.array([0.0, 1e-12, 2e-12, 3e-12])
    assert auc(s, np.array([0, 0, 1, 1])) == 1.0
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))


def test_auc_equals_sklearn_and_brute_force_with_ties() -> None:
    """On 1500 samples rounded to 1 decimal (many ties) AUC = sklearn = pair counting."""
    rng = np.random.default_rng(11)
    scores = np.round(rng.normal(size=1500), 1)
    labels = (rng.random(1500) < 1 / (1 + np.exp(-scores))).astype(np.int64)
    ref = roc_auc_score(labels, scores.astype(np.float64))
    assert auc(scores, labels) == pytest.approx(ref, abs=1e-12)
    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_logloss_matches_hand_formula_in_float64() -> None:
    """LogLoss from logits = -mean(y log σ(x) + (1-y) log(1-σ(x))), stable for |x| = 40."""
    assert logloss(np.array([0.0]), np.array([1.0])) == pytest.approx(math.log(2), abs=1e-15)
    # log(1 + e^-x) for a positive, log(1 + e^x) for a negative
    x = np.array([2.0, -1.0, 40.0, -40.0, 0.25])  # exact in float32
    y = np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    hand = np.mean(np.where(y == 1, np.logaddexp(0.0, -x), np.logaddexp(0.0, x)))
    assert logloss(x.astype(np.float32), y) == pytest.approx(hand, rel=1e-13)
    # the confidently wrong sample (x=40, y=0) alone contributes 40 / 5 = 8 (no log(0) = inf)
    assert 8.0 < hand < 9.0


def test_gauc_two_users_one_skipped() -> None:
    """User 7 has both classes (AUC 0.75); user 3 has only positives and is skipped, so its
    impressions do not enter the weights: GAUC = 0.75, not (4·0.75 + 2·x) / 6."""
    users = np.array([7, 3, 7, 7, 3, 7])
    scores = np.array([0.9, 0.99, 0.2, 0.6, 0.01, 0.7])
    labels = np.array([1, 1, 0, 1, 1, 0])
    # user 7: pos {0.9, 0.6}, neg {0.2, 0.7}: (.9,.2) (.9,.7) (.6,.2) win, (.6,.7) loses
    assert gauc(scores, labels, users) == pytest.approx(0.75, abs=1e-15)
    assert math.isnan(gauc(scores[[1, 4]], labels[[1, 4]], users[[1, 4]]))


def test_gauc_impression_weighted_brute_force() -> None:
    """GAUC = Σ n_u AUC_u / Σ n_u (users with one class skipped), AUC_u by pair counting."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 80, 400)
    scores = np.round(rng.normal(size=400), 1).astype(np.float32)
    labels = (rng.random(400) < 0.3).astype(np.int64)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            num += m.sum() * _pairwise_auc(scores[m], labels[m])
            den += m.sum()
    assert den < 400  # some users were skipped
    assert gauc(scores, labels, users) == pytest.approx(num / den, abs=1e-12)


def test_rela_impr_hand_cases() -> None:
    """Paper Eq. 13: (0.75-0.5)/(0.70-0.5) - 1 = +25 %, (0.65-0.5)/(0.70-0.5) - 1 = -25 %."""
    assert rela_impr(0.75, 0.70) == pytest.approx(25.0, abs=1e-9)
    assert rela_impr(0.65, 0.70) == pytest.approx(-25.0, abs=1e-9)
    assert rela_impr(0.8, 0.8) == 0.0


# ---- MetricAccumulator over 2 gloo ranks ------------------------------------------------

N_SAMPLES = 101
# rank 0 holds 3 uneven chunks, rank 1 one chunk; in a second round rank 1 holds nothing
SPLITS = {0: [(0, 37), (37, 38), (38, 90)], 1: [(90, 101)]}


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = torch.round(torch.randn(N_SAMPLES, generator=g) * 4) / 4  # ties
    labels = (torch.rand(N_SAMPLES, generator=g) < torch.sigmoid(logits)).float()
    users = torch.randint(0, 9, (N_SAMPLES,), generator=g)
    return logits, labels, users


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accumulator_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = DistEnv.init("cpu", require_pg=True)
    try:
        logits, labels, users = _data()
        acc = MetricAccumulator()
        for a, b in SPLITS[rank]:
            acc.update(logits[a:b], labels[a:b], users[a:b])
        uneven = acc.compute(env)
        acc0 = MetricAccumulator()  # rank 1 contributes no sample at all
        if rank == 0:
            acc0.update(logits, labels, users)
        empty_rank = acc0.compute(env)
        torch.save({"uneven": uneven, "empty_rank": empty_rank, "world": env.world_size},
                   Path(out) / f"rank{rank}.pt")
    finally:
        env.destroy()


def test_accumulator_over_two_ranks_equals_single_process(tmp_path: Path) -> None:
    """2 gloo ranks with 90 / 11 samples (and 101 / 0) give, on both ranks, exactly the
    metrics of one process holding all 101 samples, which equal the float64 references."""
    mp.spawn(_accumulator_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels, users = _data()
    single = MetricAccumulator()
    single.update(logits, labels, users)
    ref = single.compute(DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None))
    assert ref["samples"] == N_SAMPLES
    lo, la, us = logits.double().numpy(), labels.numpy(), users.numpy()
    assert ref["auc"] == pytest.approx(_pairwise_auc(lo, la), abs=1e-12)
    assert ref["logloss"] == pytest.approx(
        np.mean(np.where(la == 1, np.logaddexp(0, -lo), np.logaddexp(0, lo))), rel=1e-12)
    assert ref["positive_rate"] == pytest.approx(la.mean(), abs=1e-12)
    assert ref == compute_all(lo, la, us)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["world"] == 2
        for key in ("uneven", "empty_rank"):
            assert set(got[key]) == set(ref)
            for k, v in ref.items():
                assert got[key][k] == pytest.approx(v, abs=1e-12, rel=0), (rank, key, k)


def test_pairwise_reference_is_itself_right() -> None:
    """The brute-force helper on every labelling of 4 scores equals sklearn (guards the
    reference the other tests rely on)."""
    s = np.array([0.3, 0.3, 0.1, 0.8])
    for bits in itertools.product([0, 1], repeat=4):
        y = np.array(bits)
        if 0 < y.sum() < 4:
            assert _pairwise_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-15)
