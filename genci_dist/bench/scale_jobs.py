"""The tokenize, train and evaluate stages of `genci-bench scale` (genci_dist/bench/scale.py).

Each runs the real command, as a user would, and prints one JSON document for the stage line:

    tokenize  `genci-tokenize` with the catalogue-scale settings (bf16 embedding in resumable
              chunks, RQ-VAE on a seeded sample with a step budget, k-means on a sample,
              batched assignment; `--threads`): seconds, items, items/s and the quality report.
    train     `torchrun --nproc_per_node W -m genci_dist.train` for `--train-steps` steps of
              `--train-model` on the dataset (no evaluation), while a sampler reads every rank's
              RSS from /proc once a second and the number of steps done (steps.jsonl lines):
              samples/s over the steps after the first 10 % (start-up and warm-up excluded),
              each rank's peak RSS and its drift (RSS at the end minus RSS at 25 % of the
              steps; flat ≈ 0), and the reader workers' peak.
    evaluate  `torchrun ... -m genci_dist.evaluate` of the train stage's last checkpoint on a
              split (`--eval-split`, default train: the largest, and GAUC is defined there under
              leave-one-out): rows, seconds, AUC / LogLoss / GAUC, each rank's peak RSS.

The children run as `python -m genci_dist.bench.scale_jobs STAGE ...`, so the stage's own peak
RSS (the wrapper's VmHWM) is this small driver's; the ranks' figures are in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "HF_HUB_OFFLINE": "1"}


def tokenize_command(data: Path, threads: int, steps: int, sample: int) -> list[str]:
    return [sys.executable, "-m", "genci_dist.tokenizer.cli", "--data", str(data),
            "--threads", str(threads), "--no-progress",
            "--tokenizer.embed_chunk_size", "65536", "--tokenizer.embed_dtype", '"bfloat16"',
            "--tokenizer.train_sample", str(sample), "--tokenizer.train_steps", str(steps),
            "--tokenizer.kmeans_sample", "65536"]


def torchrun(world_size: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world_size}", "-m", module, *args]


class RankSampler(threading.Thread):
    """Samples, once a second, the RSS of every process under `root` (ranks = processes with
    a RANK variable whose parent has none; anything below a rank = its reader workers) and
    the lines of `steps_file`: [(t, steps, {rank: rss_kib}, workers_peak_kib)]."""

    def __init__(self, root: int, steps_file: Path | None, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root, self.steps_file, self.interval = root, steps_file, interval
        self.samples: list[tuple[float, int, dict[int, int], int]] = []
        self.stop = threading.Event()

    def _steps(self) -> int:
        if self.steps_file is None or not self.steps_file.is_file():
            return 0
        with self.steps_file.open("rb") as f:
            return sum(1 for _ in f)

    def run(self) -> None:
        import psutil

        t0 = time.perf_counter()
        ranks: dict[int, int] = {}          # pid -> rank
        while not self.stop.is_set():
            try:
                procs = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss: dict[int, int] = {}
            workers = 0
            for p in procs:
                try:
                    # Not-a-rank is decided again at every sample: a rank caught between
                    # fork and exec still shows its parent's environment (no RANK) and would
                    # be missed for good (a 4-step run then had no rank 1 figures).
                    if ranks.get(p.pid, -1) < 0:
                        env = p.environ()
                        parent_env = p.parent().environ() if p.parent() else {}
                        if "RANK" in env and "RANK" not in parent_env \
                                and "LOCAL_RANK" in env:
                            ranks[p.pid] = int(env["RANK"])
                        else:
                            ranks[p.pid] = -1
                    kib = p.memory_info().rss // 1024
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if ranks[p.pid] >= 0:
                    rss[ranks[p.pid]] = kib
                elif any(a.pid in ranks and ranks[a.pid] >= 0 for a in _ancestors(p)):
                    workers = max(workers, kib)
            self.samples.append((time.perf_counter() - t0, self._steps(), rss, workers))
            self.stop.wait(self.interval)


def _ancestors(p: Any) -> list[Any]:
    try:
        return p.parents()
    except Exception:  # noqa: BLE001 - a process gone between two reads
        return []


def run_sampled(cmd: list[str], steps_file: Path | None) -> tuple[float, RankSampler]:
    """Runs `cmd` (its output to our stderr, so stdout stays the stage's JSON) under a
    RankSampler; raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, env={**os.environ, **TORCHRUN_ENV})
    sampler = RankSampler(proc.pid, steps_file)
    sampler.start()
    code = proc.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"stage command failed (exit {code}): {' '.join(cmd)}")
    return time.perf_counter() - t0, sampler


def rank_figures(samples: list[tuple[float, int, dict[int, int], int]],
                 total_steps: int | None = None) -> dict[str, Any]:
    """Per rank: peak RSS, and its drift = RSS at the last sample while it still worked minus
    RSS at 25 % of the work (of the steps when `total_steps` is given: samples after the last
    step, in checkpointing and exit, are left out; else of the samples), in GB; None when
    the run was too short to have both points. Also the reader workers' peak."""
    out: dict[str, Any] = {}
    gb = 1 / 2**20
    for r in sorted({r for _, _, rss, _ in samples for r in rss}):
        pts = [(s, rss[r]) for _, s, rss, _ in samples if rss.get(r, 0) > 0]
        if not pts:
            continue
        out[f"rank{r}_peak_rss_gb"] = round(max(k for _, k in pts) * gb, 3)
        if total_steps:
            work = [p for p in pts if total_steps // 4 <= p[0] < total_steps]
        else:
            work = pts[len(pts) // 4:]
        out[f"rank{r}_rss_drift_gb"] = (round((work[-1][1] - work[0][1]) * gb, 3)
                                        if len(work) >= 2 else None)
    out["workers_peak_rss_gb"] = round(max((w for *_, w in samples), default=0) * gb, 3)
    return out


def train_stage(a: argparse.Namespace) -> dict[str, Any]:
    run = Path(a.run_dir)
    shutil.rmtree(run, ignore_errors=True)   # a fresh run: no resume, no old steps
    steps_file = run / "steps.jsonl"
    args = ["--config", a.config, "--data.dir", a.data, "--data.source", "none",
            "--model.name", a.model, "--train.max_steps", str(a.steps), "--train.run_dir",
            str(run), "--train.eval_every_epoch", "false", "--eval.splits", "[]",
            "--train.progress_bar", "false", "--train.tensorboard", "false",
            "--data.batch_size", str(a.batch_size), "--checkpoint.resume", '"never"',
            *a.extra]
    wall, sampler = run_sampled(torchrun(a.world_size, "genci_dist.train", args), steps_file)
    pts = [(t, s) for t, s, *_ in sampler.samples if s > 0]
    lo = next((p for p in pts if p[1] >= max(1, a.steps // 10)), None)
    hi = pts[-1] if pts else None
    rate = None
    if lo and hi and hi[1] > lo[1]:
        rate = (hi[1] - lo[1]) * a.batch_size / (hi[0] - lo[0])
    return {"stage_s": round(wall, 2), "samples": a.steps * a.batch_size,
            "samples_per_s": None if rate is None else round(rate, 1),
            "line": {"model": a.model, "world_size": a.world_size,
                     **rank_figures(sampler.samples, a.steps)}}


def evaluate_stage(a: argparse.Namespace) -> dict[str, Any]:
    out = Path(a.run_dir) / f"scale_eval_{a.split}.json"
    args = ["--checkpoint", str(Path(a.run_dir) / "checkpoints"), "--split", a.split,
            "--out", str(out)]
    wall, sampler = run_sampled(torchrun(a.world_size, "genci_dist.evaluate", args), None)
    metrics = json.loads(out.read_text())
    keep = {k: v for k, v in metrics.items() if k in ("auc", "logloss", "gauc", "gauc_note",
                                                       "positive_rate")}
    return {"stage_s": round(wall, 2), "samples": metrics.get("rows", metrics.get("samples")),
            "line": {"split": a.split, "world_size": a.world_size, **keep,
                     **rank_figures(sampler.samples)}}


def tokenize_stage(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(tokenize_command(Path(a.data), a.threads, a.tokenizer_steps,
                                           a.sample),
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"genci-tokenize failed (exit {proc.returncode})")
    wall = time.perf_counter() - t0
    report = json.loads(proc.stdout)
    n = report.get("n_items") or report.get("items")
    line = {k: v for k, v in report.items() if not isinstance(v, dict | list)}
    return {"stage_s": round(wall, 2), "samples": n,
            "line": {"items_per_s": round(n / wall, 1) if n else None, **line}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genci_dist.bench.scale_jobs")
    p.add_argument("stage", choices=["tokenize", "train", "evaluate"])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="configs/instrument.toml")
    p.add_argument("--model", default="deepfm")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--run-dir", default="runs/bench_scale")
    p.add_argument("--split", default="train")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sample", type=int, default=262144, help="RQ-VAE training sample")
    p.add_argument("--tokenizer-steps", type=int, default=10000, help="RQ-VAE step budget")
    p.add_argument("extra", nargs="*", help="more --section.key value overrides for training")
    a = p.parse_args(argv)
    fn = {"tokenize": tokenize_stage, "train": train_stage, "evaluate": evaluate_stage}[a.stage]
    print(json.dumps(fn(a)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
