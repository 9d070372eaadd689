"""Plots and tables for a finished run: training curves (PNG) and a side-by-side metric table.

    python -m genci_dist.report compare runs/a/metrics.json runs/b/metrics.json [--base NAME]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genci_dist.metrics import rela_impr


def write_training_curves(history: list[dict[str, Any]], run_dir: Path) -> Path | None:
    """Train loss and valid AUC / LogLoss per epoch → run_dir/training_curves.png."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    train_keys = sorted({k for h in history for k in h.get("train", {})})
    for k in train_keys:
        axes[0].plot(epochs, [h["train"].get(k, float("nan")) for h in history], marker="o",
                     label=k)
    axes[0].set_title("train loss (epoch mean)")
    axes[0].legend(fontsize=7)
    for ax, key in zip(axes[1:], ("auc", "logloss"), strict=True):
        ax.plot(epochs, [h["valid"][key] for h in history], marker="o")
        ax.set_title(f"valid {key}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "training_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare_table(runs: Sequence[Path], split: str = "test", base: str | None = None) -> str:
    """A Markdown table of AUC / LogLoss / GAUC / RelaImpr for several metrics.json files."""
    rows = []
    for path in runs:
        m = json.loads(Path(path).read_text())
        name = m.get("model", Path(path).parent.name)
        rows.append((name, m[split] if split in m else m))  # run metrics or evaluate output
    base_auc = None
    if base is not None:
        base_auc = next((r[1]["auc"] for r in rows if r[0] == base), None)
    lines = [f"| model ({split}) | AUC | LogLoss | GAUC | RelaImpr |", "|---|---|---|---|---|"]
    for name, s in rows:
        ri = f"{rela_impr(s['auc'], base_auc):+.2f}%" if base_auc is not None else "–"
        lines.append(f"| {name} | {s['auc']:.4f} | {s['logloss']:.4f} | "
                     f"{s.get('gauc', float('nan')):.4f} | {ri} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "compare":
        print(__doc__)
        return 2
    args = args[1:]
    base = None
    split = "test"
    if "--base" in args:
        i = args.index("--base")
        base = args[i + 1]
        del args[i:i + 2]
    if "--split" in args:
        i = args.index("--split")
        split = args[i + 1]
        del args[i:i + 2]
    print(compare_table([Path(a) for a in args], split=split, base=base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
