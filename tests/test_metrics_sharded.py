"""Sharded metrics (genci_dist.runtime.metrics.compute_sharded): each rank holds only its own
rows, and AUC / LogLoss / GAUC still equal the float64 references on the concatenation
(sklearn's roc_auc_score and log_loss, per-user roc_auc_score) to 1e-9 — on real 2- and 3-rank
gloo process groups, with heavy ties, uneven and empty ranks, users spread over ranks,
ML-1M-sized data, mixed float32/float64 logits, leave-one-out (GAUC undefined, said once) and
bad labels (every rank raises instead of one rank leaving the others waiting)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from genci_dist.runtime import metrics as M
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.metrics import MetricAccumulator, compute_all

TOL = 1e-9


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, list]]:
    """(logits, labels, users, {rank: [(a, b), ...] row chunks}) of a named scenario."""
    if name == "ml1m":   # ML-1M-sized: 1,000,209 rows, 6040 users; rank 0 holds 70 %
        n, n_users, splits = 1_000_209, 6040, {0: [(0, 400_000), (400_000, 700_146)],
                                                  1: [(700_146, 1_000_209)]}
        rng = np.random.default_rng(1)
        logits = (rng.normal(size=n) * 2).astype(np.float32)
    else:
        n, n_users = 3001, 97
        splits = {0: [(0, 1000), (1000, 1001), (1001, 2400)], 1: [(2400, 3001)]}
        rng = np.random.default_rng(2)
        logits = (np.round(rng.normal(size=n) * 8) / 8).astype(np.float32)  # ~60 values: ties
    users = rng.integers(0, n_users, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits - rng.normal(size=n)))).astype(
        np.float32)
    if name == "empty_rank":      # rank 1 holds no row at all
        splits = {0: [(0, 2000), (2000, n)], 1: []}
    elif name == "all_tied":      # one score value: every triple goes to one rank, AUC = 0.5
        logits[:] = 0.75
    elif name == "loo":           # leave-one-out: one row per user
        users = np.arange(n) * 7 + 3
    elif name == "three":         # 3 ranks, the middle one empty
        splits = {0: [(0, 500), (500, 1800)], 1: [], 2: [(1800, n)]}
    return logits, labels, users, splits


def _per_user_sklearn_gauc(s: np.ndarray, y: np.ndarray, u: np.ndarray) -> float:
    order = np.argsort(u, kind="stable")
    s, y, u = s[order], y[order], u[order]
    num = den = 0.0
    for idx in np.split(np.arange(u.size), np.flatnonzero(np.diff(u)) + 1):
        if 0 < y[idx].sum() < idx.size:
            num += idx.size * roc_auc_score(y[idx], s[idx].astype(np.float64))
            den += idx.size
    return num / den if den else float("nan")


def _reference(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    x = logits.astype(np.float64)
    return {"auc": roc_auc_score(labels, x),
            "logloss": log_loss(labels, 1 / (1 + np.exp(-x)), labels=[0, 1]),
            "gauc": _per_user_sklearn_gauc(logits, labels, users), "samples": labels.size,
            "positive_rate": float(labels.astype(np.float64).mean())}


def _assert_close(got: dict[str, float], ref: dict[str, float], what: object) -> None:
    assert set(got) == set(ref), what
    for k, v in ref.items():
        if math.isnan(v):
            assert math.isnan(got[k]), (what, k)
        else:
            assert got[k] == pytest.approx(v, abs=TOL, rel=0), (what, k, got[k], v)


# ---- one process ----------------------------------------------------------------------------
def test_histogram_auc_equals_sklearn_and_hand_case() -> None:
    """2U from the score histogram: hand case (one tie counted 1/2: 3.5 / 4) and 5000 rows
    with ~60 distinct scores against sklearn; a histogram cut into two ranges with the
    negatives of the lower range carried over gives the same 2U."""
    values, npos, nneg = M.score_histogram(np.array([0.5, 0.5, 0.2, 0.9]),
                                           np.array([1, 0, 0, 1], dtype=np.int8))
    assert values.tolist() == [0.2, 0.5, 0.9] and npos.tolist() == [0, 1, 1]
    assert M.twice_u(npos, nneg) == 7      # 2 × 3.5
    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=5000) * 8) / 8
    y = (rng.random(5000) < 1 / (1 + np.exp(-s))).astype(np.int8)
    values, npos, nneg = M.score_histogram(s, y)
    p, n = int(y.sum()), int((1 - y).sum())
    assert M.twice_u(npos, nneg) / (2 * p * n) == pytest.approx(roc_auc_score(y, s), abs=1e-15)
    cut = values.size // 3
    split = M.twice_u(npos[:cut], nneg[:cut]) + M.twice_u(npos[cut:], nneg[cut:],
                                                           int(nneg[:cut].sum()))
    assert split == M.twice_u(npos, nneg) == M.twice_u(npos, nneg, chunk=5)


def test_gauc_user_aligned_chunks_equal_one_pass() -> None:
    """GAUC summed over user-aligned blocks of ~7 rows equals one block and per-user sklearn."""
    logits, labels, users, _ = _dataset("ties")
    one = M.gauc_sums(logits, labels, users, chunk=10**9)
    small = M.gauc_sums(logits, labels, users, chunk=7)
    assert small[2] == one[2] > 10 and small[1] == one[1]
    assert small[0] / small[1] == pytest.approx(one[0] / one[1], abs=1e-15)
    assert one[0] / one[1] == pytest.approx(_per_user_sklearn_gauc(logits, labels, users),
                                            abs=1e-12)


def test_user_rank_spreads_consecutive_ids() -> None:
    dest = M._user_rank(np.arange(10_000), 2)
    assert 4700 < np.count_nonzero(dest) < 5300
    assert (M._user_rank(np.arange(10_000), 2) == dest).all()
    assert set(np.unique(M._user_rank(np.arange(10_000), 3))) == {0, 1, 2}


def test_gauc_undefined_said_once_on_rank_0(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Leave-one-out: GAUC NaN with one stderr line per process, not one per evaluation;
    nothing on another rank or for an empty split."""
    monkeypatch.setattr(M, "_gauc_noted", False)
    M._note_gauc_undefined(float("nan"), 5, rank=1)
    M._note_gauc_undefined(float("nan"), 0, rank=0)
    assert capsys.readouterr().err == ""
    for _ in range(3):
        out = compute_all(np.array([0.1, 0.2]), np.array([1, 0]), np.array([1, 2]))
        assert math.isnan(out["gauc"]) and out["auc"] == 0.0
    assert capsys.readouterr().err == f"[metrics] {M.GAUC_UNDEFINED}\n"


def test_accumulator_is_compact_and_rejects_bad_labels() -> None:
    """float32 scores (bfloat16 logits exact), int8 labels, int64 users; labels outside {0,1}
    and NaN logits raise at compute, naming how many."""
    acc = MetricAccumulator()
    acc.update(torch.tensor([0.5, -1.25], dtype=torch.bfloat16), torch.tensor([1.0, 0.0]),
               torch.tensor([3, 4], dtype=torch.int32))
    acc.update(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3]))
    s, y, u = acc.local_arrays()
    assert (s.dtype, y.dtype, u.dtype) == (np.float32, np.int8, np.int64)
    assert s.tolist() == [0.5, -1.25, 2.0] and y.tolist() == [1, 0, 0]
    one = DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None)
    assert acc.compute(one)["auc"] == 0.5
    acc.update(torch.tensor([0.1, 0.2]), torch.tensor([0.5, float("nan")]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="2 of 5 labels are not 0 or 1"):
        acc.compute(one)
    acc = MetricAccumulator()
    acc.update(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="1 NaN or infinite logits out of 2"):
        acc.compute(one)


class _Batch:
    def __init__(self, rows: np.ndarray, users: np.ndarray, labels: np.ndarray) -> None:
        self.row_ids = torch.from_numpy(rows)
        self.user_ids = torch.from_numpy(users)
        self.item_ids = torch.from_numpy(rows % 5)
        self.labels = torch.from_numpy(labels)

    def to(self, device: torch.device) -> _Batch:
        return self


class _ScoreByRow(torch.nn.Module):
    """A 'model' whose logit is a known function of the row id (ties every 4 rows)."""

    def forward(self, batch: _Batch) -> tuple:
        logits = (batch.row_ids // 4).float() * 0.25 - 3.0
        return torch.zeros(()), {}, logits, batch.labels


def test_evaluate_loader_metrics_and_predictions(tmp_path: Path) -> None:
    """evaluate_loader: metrics = compute_all on the rows it saw, predictions (row, user,
    item, label, σ(logit)) written as Parquet in loader order."""
    import pyarrow.parquet as pq

    from genci_dist.runtime.evaluation import evaluate_loader, write_predictions

    rng = np.random.default_rng(6)
    rows = np.arange(50)
    users = rng.integers(0, 6, 50)
    labels = (rng.random(50) < 0.5).astype(np.float32)
    loader = [_Batch(rows[a:a + 16], users[a:a + 16], labels[a:a + 16]) for a in (0, 16, 32, 48)]
    preds: list = []
    one = DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None)
    got = evaluate_loader(_ScoreByRow(), loader, one, preds)
    logits = (rows // 4) * 0.25 - 3.0
    _assert_close(got, _reference(logits, labels, users), "evaluate_loader")
    write_predictions(preds, tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert table["row_id"] == rows.tolist() and table["user_id"] == users.tolist()
    assert table["item_id"] == (rows % 5).tolist() and table["label"] == labels.tolist()
    assert np.allclose(table["prob"], 1 / (1 + np.exp(-logits)), atol=1e-7)


# ---- real gloo ranks ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = DistEnv.init("cpu", require_pg=True)
    results: dict[str, object] = {}
    try:
        for name in names:
            logits, labels, users, splits = _dataset(name)
            acc = MetricAccumulator()
            for a, b in splits[rank]:
                lo = torch.from_numpy(logits[a:b])
                if name == "mixed" and rank == 0:   # float64 logits on rank 0 only
                    lo = lo.double() + 1e-12 * torch.arange(b - a, dtype=torch.float64)
                la = torch.from_numpy(labels[a:b].copy())
                if name == "bad_label" and rank == 1:
                    la[0] = 2.0
                acc.update(lo, la, torch.from_numpy(users[a:b]))
            try:
                results[name] = acc.compute(env)
            except ValueError as e:
                results[name] = f"ValueError: {e}"
        results["noted"] = M._gauc_noted
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        env.destroy()


def _run(tmp_path: Path, world: int, names: list[str]) -> list[dict[str, object]]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), names), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_gloo_ranks_equal_float64_references(tmp_path: Path) -> None:
    names = ["ml1m", "ties", "empty_rank", "all_tied", "loo", "mixed", "bad_label"]
    got = _run(tmp_path, 2, names)
    for name in ("ml1m", "ties", "empty_rank", "all_tied", "loo"):
        logits, labels, users, _ = _dataset(name)
        ref = (_reference(logits, labels, users) if name != "ml1m" else
               {**compute_all(logits, labels, users),   # today's (itself tested per user)
                "auc": roc_auc_score(labels, logits.astype(np.float64))})
        if name == "ml1m":
            ref["logloss"] = log_loss(labels, 1 / (1 + np.exp(-logits.astype(np.float64))))
        for rank in range(2):
            _assert_close(got[rank][name], ref, (name, rank))
    assert got[0]["all_tied"]["auc"] == 0.5
    assert math.isnan(got[0]["loo"]["gauc"]) and not math.isnan(got[0]["loo"]["auc"])
    assert got[0]["noted"] is True and got[1]["noted"] is False   # said once, on rank 0
    # rank 0's float64 logits differ by 1e-12 steps: float32 would tie them, the metric not
    logits, labels, users, splits = _dataset("mixed")
    mixed = logits.astype(np.float64)
    for a, b in splits[0]:
        mixed[a:b] += 1e-12 * np.arange(b - a)
    for rank in range(2):
        _assert_close(got[rank]["mixed"], _reference(mixed, labels, users), ("mixed", rank))
        assert got[rank]["bad_label"] == ("ValueError: evaluation: 1 of 3001 labels are not "
                                          "0 or 1 (AUC, LogLoss and GAUC need binary click "
                                          "labels)")


def test_three_gloo_ranks_one_empty(tmp_path: Path) -> None:
    """Three score ranges (two splitters, a prefix of negatives over two lower ranks) and
    users hashed to three ranks, while rank 1 holds no row."""
    got = _run(tmp_path, 3, ["three"])
    logits, labels, users, _ = _dataset("three")
    ref = _reference(logits, labels, users)
    for rank in range(3):
        _assert_close(got[rank]["three"], ref, ("three", rank))
