"""OpenMP wait policies on a quiet and on a shared machine, as JSON lines.

    python -m genci_dist.bench.omp_wait --data data/ml-100k --config configs/ml100k.toml \
        --variants project,libgomp,passive,spin1000,spin10000 --background 0,2 [--repeats 2]

For every number of background processes (each a busy 1-core loop, the stand-in for another
job on the machine) and every variant (in turn, so drift hits them all alike) it runs two
real workloads in fresh processes:

    tokenize  `genci-tokenize` on a copy of --data with --threads (RQ-VAE training and
              assignment; the text embedding comes from --cache-dir when it is there):
              wall and CPU seconds;
    train     `genci-bench --models genci --only train --inprocess` (6 timed steps of
              batch 256, --threads): samples/s.

Variants set the environment the child starts with (any OMP_WAIT_POLICY / GOMP_SPINCOUNT of
this shell removed first): ``project`` = nothing, so data_pipes/omp.py's default applies;
``libgomp`` = GOMP_SPINCOUNT=300000, libgomp's own default; ``passive`` =
OMP_WAIT_POLICY=PASSIVE; ``spinN`` = GOMP_SPINCOUNT=N. A run longer than --timeout is
killed and reported with "timeout": true (its wall is then a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipes.omp import USER_VARS


def variant_env(name: str) -> dict[str, str]:
    if name == "project":
        return {}
    if name == "libgomp":
        return {"GOMP_SPINCOUNT": "300000"}
    if name == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if name.startswith("spin") and name[4:].isdigit():
        return {"GOMP_SPINCOUNT": name[4:]}
    raise SystemExit(f"omp_wait: unknown variant {name!r} (project, libgomp, passive, spinN)")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    line = {"wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(_children_cpu() - cpu0, 2), "timeout": timed_out}
    if not timed_out and proc.returncode != 0:
        raise SystemExit(f"omp_wait: {' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                         f"{err[-2000:]}")
    line["stdout"] = out
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genci_dist.bench.omp_wait", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared dataset (copied per run)")
    p.add_argument("--config", required=True)
    p.add_argument("--cache-dir", default="data/cache", help="the tokenizer's embedding cache")
    p.add_argument("--variants", default="project,libgomp,passive,spin1000,spin10000")
    p.add_argument("--background", default="0,2", help="comma list of busy processes")
    p.add_argument("--workloads", default="tokenize,train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        variant_env(v)
    base = {k: v for k, v in os.environ.items() if k not in (*USER_VARS, "OMP_NUM_THREADS")}
    base |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tokenize = [sys.executable, "-m", "genci_dist.tokenizer.cli", "--config", args.config,
                "--no-progress", "--threads", str(args.threads),
                "--tokenizer.cache_dir", json.dumps(str(Path(args.cache_dir).resolve()))]
    train = [sys.executable, "-m", "genci_dist.bench.cli", "--configs", args.config,
             "--models", "genci", "--world-sizes", "1", "--only", "train", "--batch-size",
             "256", "--steps", "6", "--warmup", "2", "--threads", str(args.threads),
             "--inprocess"]
    with tempfile.TemporaryDirectory(prefix="omp_wait-") as tmp:
        for n_bg in (int(b) for b in args.background.split(",")):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(n_bg)]
            try:
                time.sleep(1.0 if n_bg else 0.0)
                for repeat in range(args.repeats):
                    for v in variants:
                        env = base | variant_env(v)
                        for work in args.workloads.split(","):
                            line = {"bench": "omp_wait", "workload": work, "variant": v,
                                    "env": variant_env(v) or "project default",
                                    "background": n_bg, "threads": args.threads,
                                    "repeat": repeat, "load1": os.getloadavg()[0]}
                            if work == "tokenize":
                                data = Path(tmp) / "data"
                                shutil.rmtree(data, ignore_errors=True)
                                shutil.copytree(args.data, data)
                                line |= run([*tokenize, "--data", str(data)], env,
                                            args.timeout)
                            elif work == "train":
                                line |= run(train, env, args.timeout)
                                trains = [json.loads(s) for s in line["stdout"].splitlines()
                                          if s.startswith("{") and '"train"' in s]
                                if trains:
                                    line["samples_per_s"] = round(trains[0]["samples_per_s"],
                                                                  1)
                            else:
                                raise SystemExit(f"omp_wait: unknown workload {work!r}")
                            line.pop("stdout")
                            print(json.dumps(line), flush=True)
            finally:
                for b in busy:
                    b.kill()
                    b.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
