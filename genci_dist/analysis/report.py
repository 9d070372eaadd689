"""Plots and tables for finished runs.

    python -m genci_dist.analysis.report compare runs/a/metrics.json runs/b/metrics.json [--base NAME]
        side-by-side AUC / LogLoss / GAUC / RelaImpr table
    python -m genci_dist.analysis.report figures --run RUN [--checkpoint CKPT] [--data DIR]
            [--predictions NAME=FILE ...] [--tsne-samples N] [--tsne-labels all|positive]
        into RUN: training_curves.png; fig4_tsne.png/.json (GenCI runs, paper Fig. 4);
        with predictions, volatility.png/.json/.md (paper Table 5)
    python -m genci_dist.analysis.report volatility --data DIR --predictions NAME=FILE ... --out DIR
            [--base NAME]
        fast- vs slow-changing users' AUC / LogLoss for several models (paper Table 5)
    python -m genci_dist.analysis.report calibration --valid NAME=FILE ... --test NAME=FILE ... --out DIR
        how much of each model's test LogLoss is calibration: a prior shift and Platt's map
        fitted on its valid predictions, applied to its test predictions

Prediction files come from `python -m genci_dist.evaluate --checkpoint RUN/checkpoints/best
--split test --predictions FILE` (`--split valid` for calibration's valid ones).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from genci_dist.runtime.curves import write_training_curves
from genci_dist.runtime.metrics import rela_impr


def compare_table(runs: Sequence[Path], split: str = "test", base: str | None = None) -> str:
    """A Markdown table of AUC / LogLoss / GAUC / RelaImpr (+ best epoch and train wall time
    from the run's metrics.json: the file itself, or the one beside an evaluate output) for
    several runs, each named after its run folder (so several GenCI ablations stay apart)."""
    rows = []
    for path in runs:
        m = json.loads(Path(path).read_text())
        parent = Path(path).resolve().parent.name
        name = parent if parent else m.get("model", str(path))
        if split in m:                 # a run's metrics.json
            rows.append((name, m[split], m))
            continue
        # an evaluate output (e.g. eval_test.json of the checkpoint resharded into one
        # process): its metrics; best epoch and training time from the run's metrics.json
        # beside it, when there is one
        run_metrics = Path(path).resolve().parent / "metrics.json"
        info = json.loads(run_metrics.read_text()) if run_metrics.is_file() else {}
        rows.append((name, m, info))
    base_auc = None
    if base is not None:
        base_auc = next((r[1]["auc"] for r in rows if r[0] == base), None)
    lines = [f"| run ({split}) | AUC | LogLoss | GAUC | RelaImpr | best epoch | train min |",
             "|---|---|---|---|---|---|---|"]
    for name, s, m in rows:
        ri = f"{rela_impr(s['auc'], base_auc):+.2f}%" if base_auc is not None else "–"
        epoch = m.get("best_epoch", "–")
        wall_s = _train_seconds(m)
        wall = "–" if wall_s is None else f"{wall_s / 60:.1f}"
        lines.append(f"| {name} | {s['auc']:.4f} | {s['logloss']:.4f} | "
                     f"{s.get('gauc', float('nan')):.4f} | {ri} | {epoch} | {wall} |")
    return "\n".join(lines)


def _train_seconds(m: dict) -> float | None:
    """Training + validation seconds of every epoch, across resumes: the per-epoch history
    (files written before train_wall_s covered resumes counted only the last process)."""
    epochs = [r["epoch_s"] for r in m.get("history", []) if "epoch_s" in r]
    if epochs:
        return float(sum(epochs))
    return m.get("train_wall_s")


def _named_files(items: Sequence[str], flag: str = "--predictions") -> dict[str, Path]:
    """NAME=FILE pairs (a bare FILE is named after its stem) in the order given."""
    from genci_dist.analysis.volatility import AnalysisError

    out: dict[str, Path] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = Path(item).stem, item
        if not name or not file:
            raise AnalysisError(f"{flag} {item!r}: expected NAME=FILE")
        if name in out:
            raise AnalysisError(f"{flag}: model name {name!r} given twice")
        out[name] = Path(file)
    return out


def figures(run_dir: Path, checkpoint: Path | None = None, data_dir: Path | None = None,
            predictions: dict[str, Path] | None = None, tsne_samples: int = 2000,
            tsne_labels: str = "all", seed: int = 0) -> list[Path]:
    """Every figure of one run, written into run_dir; returns the paths written. What cannot
    be made (no history yet, no checkpoint, a baseline run without intents) is reported and
    skipped, so one missing piece does not cost the others."""
    from genci_dist.analysis import intent_map
    from genci_dist.analysis import volatility as analysis
    from genci_dist.runtime.checkpoint import load_checkpoint_config, resolve

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise analysis.AnalysisError(f"{run_dir}: run folder not found")
    written: list[Path] = []
    mpath = run_dir / "metrics.json"
    history = json.loads(mpath.read_text()).get("history", []) if mpath.is_file() else []
    curves = write_training_curves(history, run_dir)
    if curves is None:
        print(f"[figures] training curves skipped: no epoch history in {mpath}", flush=True)
    else:
        written.append(curves)
    cfg = None
    try:
        ckpt = resolve(checkpoint if checkpoint is not None else run_dir)
        cfg = load_checkpoint_config(ckpt, [])
    except FileNotFoundError as e:
        if checkpoint is not None:
            raise analysis.AnalysisError(str(e)) from None
        print(f"[figures] Fig. 4 skipped: {e}", flush=True)
    if cfg is not None and cfg.model.name == "genci":
        written += intent_map.write_fig4(ckpt, run_dir, tsne_samples, tsne_labels, seed,
                                       data_dir=data_dir)
    elif cfg is not None:
        print(f"[figures] Fig. 4 skipped: {ckpt} is a {cfg.model.name} run (no intents)",
              flush=True)
    if predictions:
        data = data_dir or (Path(cfg.data.dir) if cfg is not None else None)
        if data is None:
            raise analysis.AnalysisError("volatility needs the dataset: pass --data DIR (no "
                                         f"checkpoint config in {run_dir} names it)")
        result = analysis.volatility_comparison(data, predictions)
        written += analysis.write_volatility(result, run_dir)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genci-report", description="Plots and tables for runs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="metric table of several metrics.json files")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("--base", default=None, help="model name to compute RelaImpr against")
    c.add_argument("--split", default="test")
    f = sub.add_parser("figures", help="all figures of one run, into the run folder")
    f.add_argument("--run", required=True, type=Path, help="the run folder (train.run_dir)")
    f.add_argument("--checkpoint", type=Path, default=None,
                   help="default: RUN/checkpoints/best (else latest)")
    f.add_argument("--data", type=Path, default=None,
                   help="prepared dataset (default: the checkpoint config's data.dir)")
    f.add_argument("--predictions", nargs="+", default=[], metavar="NAME=FILE")
    f.add_argument("--tsne-samples", type=int, default=2000)
    f.add_argument("--tsne-labels", choices=["all", "positive"], default="all")
    f.add_argument("--seed", type=int, default=0, help="t-SNE random_state")
    v = sub.add_parser("volatility", help="fast- vs slow-changing users (paper Table 5)")
    v.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    v.add_argument("--predictions", nargs="+", required=True, metavar="NAME=FILE")
    v.add_argument("--out", required=True, type=Path, help="output folder")
    v.add_argument("--base", default=None, help="model name to compute RelaImpr against")
    v.add_argument("--feature", default=None, help="item set column (default: genres, "
                   "else categories)")
    k = sub.add_parser("calibration", help="test LogLoss after recalibration maps fitted "
                       "on valid predictions")
    k.add_argument("--valid", nargs="+", required=True, metavar="NAME=FILE")
    k.add_argument("--test", nargs="+", required=True, metavar="NAME=FILE")
    k.add_argument("--out", required=True, type=Path, help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`genci-report`. A bad run folder, prediction file or dataset ends as one line on stderr
    and exit code 2 (`--debug` or GENCI_DEBUG=1: with the traceback; genci_dist/errors.py)."""
    from genci_dist.errors import run_cli

    return run_cli("genci-report", _report, argv)


def _report(argv: list[str]) -> int:
    from genci_dist.analysis.calibration import calibration_comparison, write_calibration
    from genci_dist.analysis.volatility import volatility_comparison, write_volatility

    args = _parser().parse_args(argv)
    if args.command == "compare":
        print(compare_table(args.runs, split=args.split, base=args.base))
        return 0
    if args.command == "calibration":
        written = write_calibration(calibration_comparison(
            _named_files(args.valid, "--valid"), _named_files(args.test, "--test")),
            args.out)
        print(Path(written[1]).read_text(), end="")
    elif args.command == "figures":
        written = figures(args.run, args.checkpoint, args.data,
                          _named_files(args.predictions), args.tsne_samples,
                          args.tsne_labels, args.seed)
    else:
        result = volatility_comparison(args.data, _named_files(args.predictions),
                                       args.feature, args.base)
        written = write_volatility(result, args.out)
        print(Path(written[1]).read_text(), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
