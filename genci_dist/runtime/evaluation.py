"""The evaluation loop shared by the trainer (validation) and `genci-evaluate`: metrics over
every rank's samples and, optionally, per-sample predictions written as Parquet.

Memory is O(rows per rank): each rank keeps its own rows compactly (13 bytes a row: float32
score, int8 label, int64 user) and the metrics are exact sums of per-rank partials — no rank
ever holds another rank's rows except the users routed to it for GAUC (runtime/metrics.py).
Predictions, when asked for, stay on their rank too (one Parquet part per rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.metrics import MetricAccumulator


def bf16_autocast(device: torch.device, enabled: bool) -> Any:
    """train.autocast_bf16: forward passes under torch.autocast(bfloat16) (training,
    validation and standalone evaluation alike)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: Any, env: DistEnv,
                    predictions: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Runs `model` (a task module returning (loss, parts, logits, labels)) over every batch
    of `loader` and returns metrics over all ranks' samples (auc, logloss, gauc, samples,
    positive_rate; the same on every rank). `predictions`, if given, receives this rank's
    per-sample rows batch by batch (for `write_predictions`)."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    for batch in loader:
        batch = batch.to(env.device)
        _loss, _parts, logits, labels = model(batch)
        acc.update(logits, labels, batch.user_ids)
        if predictions is not None:
            predictions.append({"row_id": batch.row_ids.cpu(), "user_id": batch.user_ids.cpu(),
                                "item_id": batch.item_ids.cpu(), "label": labels.cpu(),
                                "prob": torch.sigmoid(logits.float()).cpu()})
    model.train(was_training)
    return acc.compute(env)


def write_predictions(parts: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]} if parts else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)
