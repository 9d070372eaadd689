"""Figure 4: t-SNE of long- vs short-term intents with the target items (paper §3.3.3).

The paper projects "the embeddings of long-term and short-term intents, together with
target item representations" and names no label filter, so all samples are used by default
(`labels="positive"` restricts to clicked targets). The picture is summarised by numbers taken
in the ORIGINAL d_model space (mean cosine of each sample's target item to its H_STI and to its
H_LTI) and in the 2-D embedding (paired distances and per-kind spread), so a claim about the
figure can be checked without looking at it. Interest volatility lives in
`genci_dist.analysis.volatility`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from genci_dist.analysis.volatility import (
    INTENT_COLOURS,
    INTENT_KINDS,
    INTENT_LABELS,
    AnalysisError,
    _pyplot,
)

# ---------------------------------------------------------------------------------------------
# Fig. 4: t-SNE of long- and short-term intents with the target items
# ---------------------------------------------------------------------------------------------


def collect_intents(checkpoint: str | Path, n_samples: int = 2000, split: str = "test",
                    labels: str = "all", data_dir: str | Path | None = None,
                    batch_size: int = 0) -> dict[str, np.ndarray]:
    """`GenCITask.intents` of the first `n_samples` samples of `split` (loader order, no
    shuffle; `labels="positive"` keeps clicked targets only), from a checkpoint loaded into
    the plain single-process model exactly as `genci_dist.evaluate` does at world size 1.

    Returns {kind: float64 [n, d_model]} for the kinds the config builds, plus "label"."""
    import torch

    from data_pipes.schema import feature_specs, load_manifest
    from data_pipes.stream import build_loader
    from genci_dist.config import ConfigError
    from genci_dist.model.build import batch_fields, build_task, load_generation_assets
    from genci_dist.runtime.checkpoint import load_checkpoint_config, load_model_only, resolve

    if labels not in ("all", "positive"):
        raise AnalysisError(f"labels must be 'all' or 'positive', not {labels!r}")
    try:
        ckpt = resolve(checkpoint)
        cfg = load_checkpoint_config(ckpt, ["--data.dir", str(data_dir)] if data_dir else [])
    except (FileNotFoundError, ConfigError) as e:
        raise AnalysisError(f"{checkpoint}: {e}") from None
    if cfg.model.name != "genci":
        raise AnalysisError(f"{ckpt}: a {cfg.model.name} checkpoint has no intents (Fig. 4 "
                            "needs a GenCI run)")
    dataset_dir = Path(cfg.data.dir)
    manifest = load_manifest(dataset_dir)
    assets = load_generation_assets(dataset_dir, manifest, cfg.model)
    model = build_task(cfg.model, feature_specs(manifest), assets, device=torch.device("cpu"))
    load_model_only(model, ckpt)
    model.eval()
    loader = build_loader(dataset_dir, split, batch_size=batch_size or cfg.data.eval_batch_size,
                          rank=0, world_size=1, num_workers=0, read_ahead=cfg.data.read_ahead,
                          seed=cfg.data.seed,
                          shuffle=False, max_history=cfg.data.max_history,
                          **batch_fields(cfg.model))
    parts: dict[str, list[np.ndarray]] = {}
    have = 0
    with torch.no_grad():
        for batch in loader:
            keep = (batch.labels > 0.5) if labels == "positive" else torch.ones(
                batch.size, dtype=torch.bool)
            keep &= torch.cumsum(keep.long(), 0) <= n_samples - have
            if keep.any():
                for k, v in model.intents(batch).items():
                    parts.setdefault(k, []).append(v[keep].double().numpy())
                parts.setdefault("label", []).append(batch.labels[keep].double().numpy())
                have += int(keep.sum())
            if have >= n_samples:
                break
    if have == 0:
        which = "positive samples" if labels == "positive" else "samples"
        raise AnalysisError(f"{dataset_dir / split}: no {which} to embed")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays (rows of zeros give 0)."""
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), den, out=np.zeros(len(a)), where=den > 0)


def intent_tsne(vectors: Mapping[str, np.ndarray], random_state: int = 0
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """t-SNE (scikit-learn, init="pca", fixed seed) of the stacked [lt; st; item] vectors.

    Returns the 2-D points per kind and a summary: per-sample cosine of the target item to
    H_STI and to H_LTI in the original space; in the 2-D map the mean paired distance of the
    item to its st / lt point and each kind's spread (RMS distance to its centroid), both
    divided by the RMS spread of all points so they do not depend on t-SNE's arbitrary scale."""
    from sklearn.manifold import TSNE

    kinds = [k for k in INTENT_KINDS if k in vectors]
    if not kinds:
        raise AnalysisError(f"no intent vectors among {list(vectors)} (expected {INTENT_KINDS})")
    n = len(vectors[kinds[0]])
    stacked = np.concatenate([np.asarray(vectors[k], dtype=np.float64) for k in kinds])
    m = len(stacked)
    if m < 4:
        raise AnalysisError(f"t-SNE needs at least 4 points, got {m}")
    perplexity = float(min(30.0, max(1.0, (m - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state)
    xy = tsne.fit_transform(stacked)
    points = {k: xy[i * n:(i + 1) * n] for i, k in enumerate(kinds)}
    scale = float(np.sqrt(((xy - xy.mean(0)) ** 2).sum(1).mean())) or 1.0
    summary: dict[str, Any] = {
        "samples": n, "kinds": kinds, "dim": int(stacked.shape[1]), "perplexity": perplexity,
        "random_state": random_state, "kl_divergence": float(tsne.kl_divergence_),
        "spread_2d": {k: float(np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean())) / scale
                      for k, p in points.items()}}
    for k in ("st", "lt"):
        if "item" in vectors and k in vectors:
            summary[f"cosine_item_{k}_mean"] = float(_cosine(vectors["item"], vectors[k]).mean())
            summary[f"distance_2d_item_{k}_mean"] = float(
                np.linalg.norm(points["item"] - points[k], axis=1).mean()) / scale
    if "label" in vectors:
        summary["positive_rate"] = float(np.mean(vectors["label"]))
    return points, summary


def plot_intents(points: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Scatter of the 2-D map, one colour per kind, with a legend (paper Fig. 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    size = 6.0 if len(next(iter(points.values()))) > 500 else 14.0
    for k, p in points.items():
        ax.scatter(p[:, 0], p[:, 1], s=size, alpha=0.55, c=INTENT_COLOURS[k],
                   label=INTENT_LABELS[k], linewidths=0)
    ax.legend(markerscale=2.0, fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of intents and target items", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_fig4(checkpoint: str | Path, out_dir: str | Path, n_samples: int = 2000,
               labels: str = "all", random_state: int = 0, data_dir: str | Path | None = None,
               split: str = "test") -> list[Path]:
    """fig4_tsne.png + fig4_tsne.json for a GenCI checkpoint."""
    from genci_dist.runtime.checkpoint import resolve

    try:
        checkpoint = resolve(checkpoint)
    except FileNotFoundError as e:
        raise AnalysisError(str(e)) from None
    vectors = collect_intents(checkpoint, n_samples, split=split, labels=labels,
                              data_dir=data_dir)
    points, summary = intent_tsne(vectors, random_state)
    summary = {"checkpoint": str(checkpoint), "split": split, "labels": labels, **summary}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "fig4_tsne.json"
    js.write_text(json.dumps(summary, indent=2))
    title = (f"t-SNE of intents ({summary['samples']} {split} samples, labels: {labels})")
    return [plot_intents(points, out / "fig4_tsne.png", title), js]


