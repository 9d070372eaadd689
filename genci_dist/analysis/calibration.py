"""Calibration of a model's predictions: how much of its test LogLoss a prior shift or
Platt's map, fitted on its valid predictions, removes (`python -m genci_dist.analysis.report
calibration`). AUC is unchanged by a monotone map; nothing is fitted on test."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from genci_dist.analysis.volatility import AnalysisError, prob_to_logit, read_predictions
from genci_dist.runtime import metrics


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood recalibration maps of a model's logits z (float64):
    `shift` = b of sigmoid(z + b) — the prior correction alone, whose optimum is the b at which
    the mean probability equals the positive rate (a 1-D root, scipy's brentq) — and `slope`,
    `intercept` = a, b of Platt's sigmoid(a·z + b) (scipy's BFGS on the float64 LogLoss with
    its exact gradient). a < 1 means over-confident logits."""
    from scipy.optimize import brentq, minimize
    from scipy.special import expit

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    rate = float(y.mean()) if y.size else float("nan")
    if not 0.0 < rate < 1.0:
        raise AnalysisError(f"calibration needs both labels; positive rate is {rate}")
    shift = brentq(lambda b: float(np.mean(expit(z + b))) - rate, -50.0, 50.0, xtol=1e-12)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        t = w[0] * z + w[1]
        r = expit(t) - y
        return (float(np.mean(np.logaddexp(0.0, t) - y * t)),
                np.array([np.mean(r * z), np.mean(r)]))

    res = minimize(loss, np.array([1.0, shift]), jac=True, method="BFGS",
                   options={"gtol": 1e-10, "maxiter": 200})
    return {"shift": float(shift), "slope": float(res.x[0]), "intercept": float(res.x[1])}


def calibration_comparison(valid: Mapping[str, str | Path], test: Mapping[str, str | Path]
                           ) -> dict[str, Any]:
    """Per model: the recalibration maps fitted on its VALID predictions (fit_calibration) and
    its TEST LogLoss raw, after the prior shift and after Platt's map — how much of a model's
    LogLoss is calibration rather than ranking (AUC is unchanged by a monotone map). Nothing is
    fitted on test."""
    if set(valid) != set(test):
        raise AnalysisError(f"calibration needs valid and test predictions of the same models: "
                            f"valid has {sorted(valid)}, test has {sorted(test)}")
    models = {}
    for name in test:
        v, t = read_predictions(valid[name]), read_predictions(test[name])
        zv, zt = prob_to_logit(v["prob"]), prob_to_logit(t["prob"])
        fit = fit_calibration(zv, v["label"])
        models[name] = {
            "valid": str(valid[name]), "test": str(test[name]), **fit,
            "valid_logloss": metrics.logloss(zv, v["label"]),
            "test_logloss": metrics.logloss(zt, t["label"]),
            "test_logloss_shifted": metrics.logloss(zt + fit["shift"], t["label"]),
            "test_logloss_platt": metrics.logloss(fit["slope"] * zt + fit["intercept"],
                                                  t["label"]),
            "test_auc": metrics.auc(t["prob"], t["label"]),
            "valid_positive_rate": float(v["label"].mean()),
            "test_positive_rate": float(t["label"].mean()),
            "test_mean_prob": float(t["prob"].mean())}
    return {"models": models}


def calibration_markdown(result: Mapping[str, Any]) -> str:
    lines = ["| model | test AUC | test LogLoss | + prior shift | + Platt map | slope a | "
             "intercept b | shift | test mean prob | test positive rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['test_auc']:.4f} | {m['test_logloss']:.4f} | "
                     f"{m['test_logloss_shifted']:.4f} | {m['test_logloss_platt']:.4f} | "
                     f"{m['slope']:.3f} | {m['intercept']:+.3f} | {m['shift']:+.3f} | "
                     f"{m['test_mean_prob']:.4f} | {m['test_positive_rate']:.4f} |")
    lines += ["", "Maps fitted on each model's valid predictions, applied to its test "
              "predictions: sigmoid(logit + shift) and sigmoid(a·logit + b). A diagnostic of "
              "how much LogLoss is calibration; the models' reported figures are the raw ones."]
    return "\n".join(lines)


def write_calibration(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """calibration.json / .md into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "calibration.json", out / "calibration.md"
    js.write_text(json.dumps(result, indent=2))
    md.write_text(calibration_markdown(result) + "\n")
    return [js, md]
