"""Evaluation-metrics benchmark (JSON lines on stdout): wall time and peak RSS per rank of
scoring N evaluation rows on W real gloo ranks, the sharded path (`MetricAccumulator.compute`,
per-rank partials, genci_dist/runtime/metrics.py) against the path it replaced (every rank's
rows gathered to every rank with `all_gather_object`, metrics recomputed on each; kept below
as `OldAccumulator`, a verbatim copy).

    python -m genci_dist.bench.eval_metrics --rows 50000000 --world-size 2
    python -m genci_dist.bench.eval_metrics --rows 1000209 --old-rows 1000209   # ML-1M-sized

Rows are synthetic, made on each rank in batches of --batch rows as the model would hand
them to `evaluate_loader`: float32 logits ~ N(0, 2²), labels ~ Bernoulli(σ(logit)), users
uniform over rows / --rows-per-user ids (so every user spans both ranks and GAUC is
defined). Rank r holds rows r·N/W … (r+1)·N/W (its own seeded generator), so both paths see
the same rows. One line per run (fresh processes for each, so each peak is its own):

- path new at --rows, path new and old at --old-rows (default min(rows, 2e6): the old path
  needs ≈ 0.5 KB per row on every rank, 25 GB at 5e7 rows, more than this machine has);
- wall_s: metrics computation (`compute`), max over ranks; fill_s: generating and `update`;
- rss_base_mb (after start-up), rss_filled_mb (rows accumulated), peak_rss_mb (ru_maxrss,
  the process's peak, reached during `compute`), each per rank; peak_bytes_per_row =
  (peak - base) / rows of all ranks, per rank;
- a final `compare` line: |new - old| per metric at --old-rows (identical rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.metrics import MetricAccumulator, auc, logloss


# ---- the replaced path, verbatim (metrics.py before issue 23) ----------------------------
def _old_gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    order = np.lexsort((scores, users))
    u, s, y = users[order], scores[order], labels[order].astype(np.float64)
    n = u.size
    if n == 0:
        return float("nan")
    new_user = np.r_[True, u[1:] != u[:-1]]
    uid = np.cumsum(new_user) - 1
    starts = np.flatnonzero(new_user)
    pos = np.arange(n) - starts[uid] + 1.0
    tie = np.cumsum(new_user | np.r_[True, s[1:] != s[:-1]]) - 1
    rank = (np.bincount(tie, pos) / np.bincount(tie))[tie]
    counts = np.bincount(uid).astype(np.float64)
    npos = np.bincount(uid, y)
    nneg = counts - npos
    sum_rank = np.bincount(uid, rank * y)
    ok = (npos > 0) & (nneg > 0)
    if not ok.any():
        return float("nan")
    per_user = (sum_rank[ok] - npos[ok] * (npos[ok] + 1) / 2) / (npos[ok] * nneg[ok])
    return float((counts[ok] * per_user).sum() / counts[ok].sum())


def _old_compute_all(logits: np.ndarray, labels: np.ndarray,
                     users: np.ndarray) -> dict[str, float]:
    return {"auc": auc(logits, labels), "logloss": logloss(logits, labels),
            "gauc": _old_gauc(logits, labels, users), "samples": int(labels.size),
            "positive_rate": (float(np.mean(labels, dtype=np.float64)) if labels.size
                              else float("nan"))}


class OldAccumulator:
    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        self._parts.append((logits.detach().double().cpu(), labels.detach().cpu(),
                            users.detach().cpu()))

    def local_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
        lo, la, us = (torch.cat(x).numpy() for x in zip(*self._parts, strict=True))
        return lo, la, us.astype(np.int64)

    def compute(self, env: DistEnv) -> dict[str, float]:
        gathered = env.all_gather_object(self.local_arrays())
        lo, la, us = (np.concatenate(x) for x in zip(*gathered, strict=True))
        return _old_compute_all(lo, la, us)


# ---- measurement --------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def _worker(rank: int, world: int, port: int, out: str, path: str, rows: int, batch: int,
            rows_per_user: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = DistEnv.init("cpu", require_pg=True)
    try:
        base = _rss_mb()
        lo, hi = rank * rows // world, (rank + 1) * rows // world
        n_users = max(1, rows // rows_per_user)
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        acc: Any = MetricAccumulator() if path == "new" else OldAccumulator()
        t0 = time.perf_counter()
        for a in range(lo, hi, batch):
            b = min(a + batch, hi)
            logits = torch.randn(b - a, generator=g) * 2
            labels = (torch.rand(b - a, generator=g) < torch.sigmoid(logits)).float()
            users = torch.randint(0, n_users, (b - a,), generator=g)
            acc.update(logits, labels, users)
        fill_s = time.perf_counter() - t0
        if path == "new":
            acc.local_arrays()   # concatenated once, as compute would
        filled = _rss_mb()
        env.barrier()
        t0 = time.perf_counter()
        metrics = acc.compute(env)
        wall = time.perf_counter() - t0
        env.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "wall_s": wall, "fill_s": fill_s, "rss_base_mb": base, "rss_filled_mb": filled,
            "peak_rss_mb": _peak_mb(), "rows_local": hi - lo, "metrics": metrics}))
    finally:
        env.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(path: str, rows: int, world: int, batch: int, rows_per_user: int,
            seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), tmp, path, rows, batch, rows_per_user,
                                seed), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "path": path, "rows": rows, "world_size": world,
        "wall_s": round(max(r["wall_s"] for r in ranks), 3),
        "fill_s": round(max(r["fill_s"] for r in ranks), 3),
        "rows_per_rank": [r["rows_local"] for r in ranks],
        **{k: [round(r[k], 1) for r in ranks]
           for k in ("rss_base_mb", "rss_filled_mb", "peak_rss_mb")},
        "peak_bytes_per_row": [round((r["peak_rss_mb"] - r["rss_base_mb"]) * 2**20 / rows, 1)
                               for r in ranks],
        "metrics": ranks[0]["metrics"],
        "ranks_agree": all(r["metrics"] == ranks[0]["metrics"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rows", type=int, default=50_000_000, help="rows of all ranks (new path)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--old-rows", type=int, default=None,
                   help="rows for the old-vs-new comparison (default min(rows, 2e6); 0: skip)")
    p.add_argument("--batch", type=int, default=65_536, help="rows per update call")
    p.add_argument("--rows-per-user", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rows < 1 or args.world_size < 1 or args.batch < 1 or args.rows_per_user < 1:
        p.error("--rows, --world-size, --batch and --rows-per-user must be >= 1")
    old_rows = min(args.rows, 2_000_000) if args.old_rows is None else args.old_rows
    common = dict(world=args.world_size, batch=args.batch, rows_per_user=args.rows_per_user,
                  seed=args.seed)
    print(json.dumps(measure("new", args.rows, **common)), flush=True)
    if old_rows > 0:
        new = measure("new", old_rows, **common)
        old = measure("old", old_rows, **common)
        print(json.dumps(new), flush=True)
        print(json.dumps(old), flush=True)
        diff = {k: abs(new["metrics"][k] - old["metrics"][k]) for k in old["metrics"]}
        print(json.dumps({"compare": "new-old", "rows": old_rows, "abs_diff": diff,
                          "old_over_new_peak_bytes_per_row": round(
                              max(old["peak_bytes_per_row"])
                              / max(max(new["peak_bytes_per_row"]), 1e-9), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
