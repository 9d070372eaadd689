"""Memory and speed of the reader's epoch plan with length bucketing (JSON lines on stdout).

    python -m data_pipes.bench_bucket_plan --data data/bench_scale/synthetic-s10 \
        --batch-size 1024 --bucket-window 32 --batches 300

Runs in this process what one DataLoader worker runs (num_workers=0): building the dataset
(what a worker receives, pickled), the epoch plan, and the first `--batches` batches. Python
heap figures are tracemalloc's (numpy registers its buffers with it; Arrow's own pool does
not, so the Parquet tables being read are not in them), RSS from /proc/self/status.

Fields: `pickled_dataset_mb` the dataset a worker unpickles; `build_mb` heap held by the
built dataset; `plan_peak_mb` / `plan_mb` peak and held heap of `dataset.plan()`;
`iter_peak_mb` the peak heap above that while the batches are built (the plan, the current
window's positions and the decoded row groups it spans, one batch); `rows_per_s` and
`cpu_s` over those batches (building the dataset excluded), `rss_gb` / `hwm_gb` at the end.

Measured (synthetic train splits, batch 1024, window 32, 300 batches, one process; 2026-12-04,
before = 9168dd5, after = c936d3d; load 2–8 on 2 cores, so compare CPU seconds):

    split  rows         pickled MB     plan MB held/peak       iter peak MB  hwm GB
    s10     3,551,846   13.56 → 0.01   28.45/56.5 → 0.03/0.09  153 → 6.5     0.685 → 0.391
    s100   35,551,486  135.8  → 0.14  276/550 → 0.33/0.90      2110 → 7.7    5.58 → 0.392

The 300 batches took 2.2 → 0.56 CPU s (s10) and 34.1 → 0.58 CPU s (s100): before, each
iterator built the whole epoch's positions, and read-ahead listed every one's group.
Before, building the dataset also read every row's history length (s100: 7.1 s wall, 4.2 CPU
s; now 0.65 s / 0.08 s, the Parquet footers only).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import time
import tracemalloc

from data_pipes.stream import build_loader


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20   # kB → GB
    return float("nan")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--bucket-window", type=int, default=32)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    mb = 2**20
    tracemalloc.start()
    t0, c0 = time.perf_counter(), _cpu()
    loader = build_loader(a.data, a.split, batch_size=a.batch_size, world_size=a.world_size,
                          seed=a.seed, shuffle=True, bucket_window=a.bucket_window,
                          with_tokens=False, check_files=False)
    ds = loader.dataset
    build_s, build_cpu = time.perf_counter() - t0, _cpu() - c0
    build = tracemalloc.get_traced_memory()[0]
    pickled = len(pickle.dumps(ds))
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    plan = ds.plan()
    plan_now, plan_peak = tracemalloc.get_traced_memory()
    steps = plan.steps
    del plan
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    n = rows = 0
    t0, c0 = time.perf_counter(), _cpu()
    for batch in loader:
        rows += batch.size
        n += 1
        if n >= a.batches:
            break
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    iter_peak = tracemalloc.get_traced_memory()[1] - base
    print(json.dumps({
        "data": a.data, "split": a.split, "rows_split": sum(g.rows for g in ds.groups),
        "groups": len(ds.groups), "steps": steps, "batch_size": a.batch_size,
        "bucket_window": a.bucket_window, "batches": n, "build_s": round(build_s, 2),
        "build_cpu_s": round(build_cpu, 2), "build_mb": round(build / mb, 2),
        "pickled_dataset_mb": round(pickled / mb, 2),
        "plan_peak_mb": round((plan_peak - before) / mb, 2),
        "plan_mb": round((plan_now - before) / mb, 2), "iter_peak_mb": round(iter_peak / mb, 2),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rows_per_s": round(rows / wall),
        "rss_gb": round(_status("VmRSS"), 3), "hwm_gb": round(_status("VmHWM"), 3),
        "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
