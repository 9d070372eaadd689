"""genci_dist.analysis.volatility and `python -m genci_dist.analysis.report figures|volatility`: the Jaccard
volatility on a hand-computed table (tie order, repeated items, empty genre sets), the median
split, per-group metrics equal to scikit-learn on the subsets, bad prediction files, and the
Fig. 4 t-SNE plus the volatility report on a tiny trained GenCI run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from genci_dist.analysis.calibration import calibration_comparison, fit_calibration
from genci_dist.analysis.volatility import (
    AnalysisError,
    group_metrics,
    interest_volatility,
    item_genre_sets,
    jaccard_volatility,
    median_split,
    read_predictions,
)

ROOT = Path(__file__).resolve().parents[1]

# item -> genre set; item 3 has none (dropped from sequences), item 5 lists genre 2 twice.
GENRES = {1: [1, 2], 2: [2, 3], 3: [], 4: [1], 5: [1, 2, 3, 2]}
# (user, item, timestamp, split), deliberately not in order.
ROWS = [
    (10, 4, 3, "test"), (10, 2, 1, "train"), (10, 3, 2, "valid"), (10, 1, 1, "train"),
    (20, 3, 7, "test"), (20, 5, 5, "train"), (20, 5, 6, "train"),
    (30, 1, 4, "test"), (30, 3, 1, "train"),
    (40, 5, 3, "test"), (40, 4, 1, "train"), (40, 1, 2, "valid"),
    (50, 2, 1, "train"), (50, 4, 2, "train"),  # no test sample: not in the split
]
# user 10: by (ts, item) 1{1,2} 2{2,3} [3 dropped] 4{1}: (1 - 1/3 + 1 - 0/3) / 2 = 5/6
#          (the tie at ts 1 in the other order would give (2/3 + 1/2) / 2 = 7/12)
# user 20: 5, 5 [3 dropped]: distance 0 (sets, so the duplicate genre does not matter)
# user 30: one annotated item -> undefined
# user 40: 4{1} 1{1,2} 5{1,2,3}: (1/2 + 1/3) / 2 = 5/12
# user 50: 2{2,3} 4{1}: 1
EXPECTED = {10: 5 / 6, 20: 0.0, 30: math.nan, 40: 5 / 12, 50: 1.0}
PAIRS = {10: 2, 20: 1, 30: 0, 40: 2, 50: 1}


def _write_hand_dataset(root: Path) -> Path:
    ids = sorted(GENRES)
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int32()),
                             "genres": pa.array([GENRES[i] for i in ids],
                                                pa.list_(pa.int32()))}),
                   root / "items.parquet")
    (root / "sequences").mkdir()   # one row per user, positions in file order (any order)
    code = {"train": 0, "valid": 1, "test": 2}
    users = sorted({r[0] for r in ROWS})
    seqs = {u: [r for r in ROWS if r[0] == u] for u in users}
    pq.write_table(pa.table({
        "user_id": pa.array(users, pa.int32()),
        "items": pa.array([[r[1] for r in seqs[u]] for u in users], pa.list_(pa.int32())),
        "labels": pa.array([[1] * len(seqs[u]) for u in users], pa.list_(pa.int8())),
        "timestamps": pa.array([[r[2] for r in seqs[u]] for u in users], pa.list_(pa.int64())),
        "splits": pa.array([[code[r[3]] for r in seqs[u]] for u in users],
                           pa.list_(pa.int8()))}),
        root / "sequences" / "part-00000.parquet")
    return root


def _write_predictions(path: Path, users: np.ndarray, labels: np.ndarray,
                       prob: np.ndarray) -> Path:
    pq.write_table(pa.table({"row_id": np.arange(users.size), "user_id": users,
                             "item_id": np.ones(users.size, np.int64),
                             "label": labels.astype(np.float32),
                             "prob": prob.astype(np.float32)}), path)
    return path


def test_jaccard_volatility_hand_computed(tmp_path: Path) -> None:
    sets, feature = item_genre_sets(_write_hand_dataset(tmp_path))
    assert feature == "genres" and sets.shape == (6, 4)
    users = np.array([r[0] for r in ROWS])
    items = np.array([r[1] for r in ROWS])
    ts = np.array([r[2] for r in ROWS])
    uid, vol, pairs = jaccard_volatility(users, items, ts, sets)
    assert uid.tolist() == sorted(EXPECTED)
    np.testing.assert_allclose(vol, [EXPECTED[u] for u in uid], rtol=1e-12)
    assert pairs.tolist() == [PAIRS[u] for u in uid]
    with pytest.raises(AnalysisError, match="item id 9 outside"):
        jaccard_volatility(users, np.r_[items[:-1], 9], ts, sets)


def test_median_split() -> None:
    vol = np.array([0.1, 0.5, 0.5, 0.9, np.nan])
    med, fast, slow = median_split(vol)
    assert med == 0.5  # ties at the median are slow ("at or below")
    assert fast.tolist() == [False, False, False, True, False]
    assert slow.tolist() == [True, True, True, False, False]
    med, fast, slow = median_split(vol, among=np.array([True, True, False, False, True]))
    assert med == pytest.approx(0.3) and fast.tolist() == [False, True, False, False, False]
    with pytest.raises(AnalysisError, match="no user"):
        median_split(np.array([np.nan]))


def test_dataset_split_uses_test_users_only(tmp_path: Path) -> None:
    g = interest_volatility(_write_hand_dataset(tmp_path))
    # test users 10, 20, 30, 40 -> defined 5/6, 0, 5/12 -> median 5/12; 50 has no test sample
    assert g.n_test_users == 4 and g.median == pytest.approx(5 / 12)
    groups = g.group_of(np.array([10, 20, 30, 40, 50, 99]))
    assert groups.tolist() == ["fast", "slow", "", "slow", "", ""]
    assert g.summary()["users"] == {"test": 4, "fast": 1, "slow": 2, "test_undefined": 1}


def test_group_metrics_equal_sklearn_on_subsets(tmp_path: Path) -> None:
    g = interest_volatility(_write_hand_dataset(tmp_path))
    rng = np.random.default_rng(0)
    users = rng.choice([10, 20, 30, 40], size=400)
    labels = rng.integers(0, 2, size=400)
    prob = rng.uniform(0.01, 0.99, size=400).astype(np.float32)
    preds = read_predictions(_write_predictions(tmp_path / "p.parquet", users, labels, prob))
    res = group_metrics(preds, g)
    for name, members in (("fast", [10]), ("slow", [20, 40]), ("all", [10, 20, 30, 40])):
        m = np.isin(users, members)
        assert res[name]["samples"] == m.sum() and res[name]["users"] == len(members)
        assert res[name]["auc"] == roc_auc_score(labels[m], prob[m].astype(np.float64))
        assert res[name]["logloss"] == pytest.approx(
            log_loss(labels[m], prob[m].astype(np.float64)), rel=1e-6)


def test_bad_prediction_files_name_the_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from genci_dist.analysis.report import main

    missing = tmp_path / "nope.parquet"
    with pytest.raises(AnalysisError, match=f"{re.escape(str(missing))}: predictions file not found"):
        read_predictions(missing)
    no_user = tmp_path / "no_user.parquet"
    pq.write_table(pa.table({"label": [1.0, 0.0], "prob": [0.5, 0.4]}), no_user)
    with pytest.raises(AnalysisError, match=rf"{re.escape(str(no_user))}: .*lacks column\(s\) \['user_id'\]"):
        read_predictions(no_user)
    bad_label = _write_predictions(tmp_path / "bad.parquet", np.array([1, 2]), np.array([1, 2]),
                                   np.array([0.5, 0.5]))
    with pytest.raises(AnalysisError, match="row 1: label 2.0 not in"):
        read_predictions(bad_label)
    (tmp_path / "d").mkdir()
    data = _write_hand_dataset(tmp_path / "d")
    rc = main(["volatility", "--data", str(data), "--predictions", f"m={no_user}",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and str(no_user) in capsys.readouterr().err
    assert not (tmp_path / "out" / "volatility.json").exists()


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, dict]:
    """A GenCI run of a few steps on the shared tiny dataset (it has genres and semantic IDs)
    and its test predictions written by genci_dist.evaluate."""
    from genci_dist.evaluate import main as evaluate
    from genci_dist.train import main as train

    tmp = tmp_path_factory.mktemp("analysis")
    run = tmp / "run"
    assert train(["--config", str(ROOT / "configs/debug.toml"), "--data.dir", str(tiny_dataset),
                  "--data.source", "none", "--train.run_dir", str(run),
                  "--train.max_steps", "4", "--train.epochs", "1",
                  "--train.tensorboard", "false"]) == 0
    preds = tmp / "preds.parquet"
    assert evaluate(["--checkpoint", str(run / "checkpoints" / "best"), "--split", "test",
                     "--predictions", str(preds), "--out", str(tmp / "eval.json")]) == 0
    return run, preds, json.loads((tmp / "eval.json").read_text())


def test_report_figures_on_a_trained_run(tiny_run: tuple[Path, Path, dict],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from genci_dist.analysis.report import main

    run, preds, ev = tiny_run
    assert main(["figures", "--run", str(run), "--predictions", f"genci={preds}",
                 "--tsne-samples", "50"]) == 0
    out = capsys.readouterr().out
    for name in ("training_curves.png", "fig4_tsne.png", "fig4_tsne.json", "volatility.png",
                 "volatility.json", "volatility.md"):
        assert f"wrote {run / name}" in out
        assert (run / name).stat().st_size > 0
    for name in ("training_curves.png", "fig4_tsne.png", "volatility.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig4 = json.loads((run / "fig4_tsne.json").read_text())
    assert fig4["samples"] == 50 and fig4["kinds"] == ["lt", "st", "item"]
    assert fig4["labels"] == "all" and fig4["split"] == "test"
    for key in ("cosine_item_st_mean", "cosine_item_lt_mean", "distance_2d_item_st_mean",
                "distance_2d_item_lt_mean", "kl_divergence", "perplexity"):
        assert math.isfinite(fig4[key]), key
    assert -1.0 <= fig4["cosine_item_st_mean"] <= 1.0
    assert set(fig4["spread_2d"]) == {"lt", "st", "item"}
    assert all(math.isfinite(v) and v > 0 for v in fig4["spread_2d"].values())

    vol = json.loads((run / "volatility.json").read_text())
    groups = vol["models"]["genci"]["groups"]
    assert groups["fast"]["samples"] + groups["slow"]["samples"] <= groups["all"]["samples"]
    assert groups["all"]["samples"] == ev["samples"]
    # the "all" row re-scores evaluate's own predictions: its metrics, from stored float32 probs
    assert groups["all"]["auc"] == pytest.approx(ev["auc"], abs=1e-6)
    assert groups["all"]["logloss"] == pytest.approx(ev["logloss"], abs=1e-6)
    md = (run / "volatility.md").read_text()
    assert "| genci | fast |" in md and "| genci | slow |" in md


def test_intents_of_positive_targets_only(tiny_run: tuple[Path, Path, dict]) -> None:
    """labels="positive" embeds the first clicked targets only, every kind for each."""
    from genci_dist.analysis.intent_map import collect_intents

    vec = collect_intents(tiny_run[0], n_samples=7, labels="positive")
    assert set(vec) == {"lt", "st", "item", "label"}
    assert vec["label"].tolist() == [1.0] * 7
    assert all(vec[k].shape == (7, 16) and np.isfinite(vec[k]).all() for k in ("lt", "st",
                                                                              "item"))


def test_report_compare_still_works(tiny_run: tuple[Path, Path, dict],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from genci_dist.analysis.report import main

    run = tiny_run[0]
    assert main(["compare", str(run / "metrics.json"), "--base", run.name]) == 0
    out = capsys.readouterr().out
    assert "| run (test) | AUC |" in out and f"| {run.name} | " in out and "+0.00%" in out


def test_stored_probability_one_gives_a_finite_logloss() -> None:
    """A float32 prediction file can hold prob == 1.0 exactly (seen on ML-1M DeepFM); the
    LogLoss must stay finite and equal sklearn's on the clipped probabilities."""
    from sklearn.metrics import log_loss

    from genci_dist.analysis.volatility import prob_to_logit
    from genci_dist.runtime.metrics import logloss

    prob = np.array([1.0, 0.0, 0.3, 1.0], dtype=np.float32)
    y = np.array([1.0, 0.0, 1.0, 0.0])
    logits = prob_to_logit(prob)
    assert np.isfinite(logits).all()
    clipped = 1.0 / (1.0 + np.exp(-logits))
    assert logloss(logits, y) == pytest.approx(log_loss(y, clipped), rel=1e-9)
    assert np.isfinite(logloss(logits, y))


def test_compare_table_relaimpr_and_time_across_resumes(tmp_path: Path) -> None:
    """Hand-computed: RelaImpr = (0.83 − 0.5) / (0.80 − 0.5) − 1 = +10.00 %; the time column
    sums every epoch's seconds (60 + 120 s → 3.0 min, also epochs of an earlier process) and
    falls back to train_wall_s for files without a history."""
    from genci_dist.analysis.report import compare_table

    def write(name: str, metrics: dict) -> Path:
        (tmp_path / name).mkdir()
        path = tmp_path / name / "metrics.json"
        path.write_text(json.dumps(metrics))
        return path

    base = write("deepfm", {"test": {"auc": 0.80, "logloss": 0.5, "gauc": 0.7},
                            "best_epoch": 4, "train_wall_s": 90.0})
    resumed = write("genci", {"test": {"auc": 0.83, "logloss": 0.45, "gauc": 0.72},
                              "best_epoch": 1, "train_wall_s": 30.0,
                              "history": [{"epoch": 0, "epoch_s": 60.0},
                                          {"epoch": 1, "epoch_s": 120.0}]})
    rows = compare_table([base, resumed], base="deepfm").splitlines()[2:]
    assert rows[0] == "| deepfm | 0.8000 | 0.5000 | 0.7000 | +0.00% | 4 | 1.5 |"
    assert rows[1] == "| genci | 0.8300 | 0.4500 | 0.7200 | +10.00% | 1 | 3.0 |"

    # evaluate outputs (the quickstart's resharded evaluation): their own metrics, the best
    # epoch and time from the run's metrics.json beside them; "–" without one
    evals = []
    for name, auc in (("deepfm", 0.81), ("genci", 0.84), ("lone", 0.5)):
        (tmp_path / name).mkdir(exist_ok=True)
        evals.append(tmp_path / name / "eval_test.json")
        evals[-1].write_text(json.dumps({"model": name, "split": "test", "auc": auc,
                                         "logloss": 0.4, "gauc": 0.7}))
    rows = compare_table(evals, base="deepfm").splitlines()[2:]
    assert rows[0] == "| deepfm | 0.8100 | 0.4000 | 0.7000 | +0.00% | 4 | 1.5 |"
    assert rows[1] == "| genci | 0.8400 | 0.4000 | 0.7000 | +9.68% | 1 | 3.0 |"
    assert rows[2] == "| lone | 0.5000 | 0.4000 | 0.7000 | -100.00% | – | – |"


def test_calibration_fit_hand_computed_and_equal_to_sklearn() -> None:
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    # all logits 0, 3 clicks of 4: the prior shift is logit(3/4) = ln 3 exactly
    fit = fit_calibration(np.zeros(4), np.array([1.0, 1.0, 1.0, 0.0]))
    assert fit["shift"] == pytest.approx(math.log(3), abs=1e-10)
    assert fit["intercept"] == pytest.approx(math.log(3), abs=1e-6)
    rng = np.random.default_rng(0)
    z = rng.normal(size=5000)
    y = (rng.random(5000) < expit(0.6 * z + 0.4)).astype(np.float64)
    fit = fit_calibration(z, y)
    # first-order conditions of both maximum-likelihood fits
    assert np.mean(expit(z + fit["shift"])) == pytest.approx(y.mean(), abs=1e-12)
    r = expit(fit["slope"] * z + fit["intercept"]) - y
    assert abs(np.mean(r)) < 1e-8 and abs(np.mean(r * z)) < 1e-8
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(z[:, None], y)
    assert fit["slope"] == pytest.approx(float(ref.coef_[0, 0]), abs=1e-5)
    assert fit["intercept"] == pytest.approx(float(ref.intercept_[0]), abs=1e-5)
    with pytest.raises(AnalysisError, match="needs both labels"):
        fit_calibration(z[:3], np.ones(3))


def test_calibration_recovers_a_known_overconfidence(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Labels drawn from true probabilities q; the model reports logit 2·logit(q) + 0.5
    (over-confident, shifted). Platt's map fitted on valid must undo it (a = 0.5, b = -0.25)
    and bring test LogLoss down to that of q itself; AUC is untouched."""
    from scipy.special import expit, logit

    from genci_dist.analysis.report import main

    rng = np.random.default_rng(1)
    files = {}
    for split, n in (("valid", 200_000), ("test", 100_000)):
        q = expit(rng.normal(1.0, 1.5, n))
        y = (rng.random(n) < q).astype(np.float64)
        files[split] = _write_predictions(tmp_path / f"{split}.parquet", np.arange(n) % 97, y,
                                          expit(2 * logit(q) + 0.5))
        if split == "test":
            best = log_loss(y, q)
            raw = log_loss(y, expit(2 * logit(q) + 0.5))
    m = calibration_comparison({"m": files["valid"]}, {"m": files["test"]})["models"]["m"]
    assert m["slope"] == pytest.approx(0.5, abs=0.01)
    assert m["intercept"] == pytest.approx(-0.25, abs=0.02)
    assert m["test_logloss"] == pytest.approx(raw, abs=1e-5)   # float32 probabilities stored
    assert m["test_logloss_platt"] == pytest.approx(best, abs=1e-3) and best < raw - 0.05
    assert m["test_logloss_shifted"] < m["test_logloss"]
    out = tmp_path / "out"
    assert main(["calibration", "--valid", f"m={files['valid']}", "--test",
                 f"m={files['test']}", "--out", str(out)]) == 0
    assert "| m | " in (out / "calibration.md").read_text()
    assert json.loads((out / "calibration.json").read_text())["models"]["m"]["slope"] == \
        pytest.approx(m["slope"], abs=1e-12)
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["calibration", "--valid", f"m={files['valid']}", "--test",
                 f"other={files['test']}", "--out", str(bad)]) == 2
    assert "valid has ['m'], test has ['other']" in capsys.readouterr().err
    assert not bad.exists()
