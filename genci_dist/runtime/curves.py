"""training_curves.png: what a run writes at its end (and `genci-report figures` again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        ax.plot(epochs, [h.get("valid", {}).get(key, float("nan")) for h in history],
                marker="o")   # no valid entry: a run with train.eval_every_epoch = false
        ax.set_title(f"valid {key}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "training_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
