"""Scale benchmark of the data stages (JSON lines on stdout).

    python -m genci_dist.bench.scale --stages generate,read --scales 1,10,100 \\
        --out data/bench_scale [--workers 1] [--clean]

For every scale s (in order) and every stage (in order) the stage runs in its own subprocess,
so its figures are its own: one JSON line per (stage, s) with

    wall_s         the subprocess's wall time (interpreter start and imports included)
    stage_s        the time the stage itself reports (its work only)
    cpu_s          user + system CPU seconds of the subprocess (and its reaped children):
                   on a loaded machine a steadier figure than the wall times
    peak_rss_gb    the largest peak RSS of one process of the stage: the child's own VmHWM
                   (read by the child itself at its end) or its reaped children's ru_maxrss
                   (the generator's --workers; not their sum). Not os.wait4's ru_maxrss of
                   the child: Linux carries the forking parent's high-water mark across
                   exec, so a child started from a large process (a test runner, a trainer)
                   would report the parent's peak.
    bytes          bytes on disk of the dataset folder after the stage
    interactions   interactions generated (before the label rule), from the manifest
    samples        rows written / read; load1 = the 1-minute load average at the start

then one line per stage with the growth exponents k of stage_s, wall_s and cpu_s
∝ interactions^k (least squares on log-log axes; k ≈ 1 is linear). The machine may be
shared: read load1 before trusting a figure.

Stages (STAGES: name → the child command; add one by adding an entry):

    generate  `python -m data_pipes.prepare --dataset synthetic --scale s` into
              OUT/synthetic-s<s> (the real CLI, so its RSS is the generator's alone)
    prepare   the real-data protocol out of core: raw synthetic interactions (RecBole .inter
              in OUT/raw-s<s>, written once, not measured) through `genci-prepare --dataset
              recbole --atomic-dir ... --label-rule drop-band:3-3 --partitions auto`
              (2,000,000 kept rows per partition) into OUT/synthetic-s<s>
    prepare_mem  the same with --partitions 1 (the in-memory path), for comparison
    read      one full pass of data_pipes.stream.build_loader over the train split (batch
              1024, history item ids, semantic-ID tokens if the dataset has them, shard
              hashes checked first as in training); samples_per_s over the whole pass
    tokenize  genci-tokenize at catalogue scale (genci_dist/bench/scale_jobs.py: bf16
              chunks, RQ-VAE on a sample with --tokenizer-steps); items/s and its report
    train     --train-steps steps of --train-model on --world-size ranks under torchrun,
              no validation; samples/s after warm-up, each rank's peak RSS and its drift
    evaluate  genci-evaluate of the train stage's checkpoint on --eval-split under torchrun:
              rows, AUC / LogLoss / GAUC, seconds, each rank's peak RSS

--repeat 1,2,4 runs the prepare stages once per factor r on raw data whose every user's
interactions are repeated r times (same users and items, r-fold interactions; lines carry
"repeat"): peak RSS flat in r means memory bounded by the partition size and the
vocabularies, not by the interactions. Other stages run once, at r = 1.

--clean deletes each scale's dataset after its last stage (s = 200 takes 2.7 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipes.schema import MANIFEST, SEMANTIC_IDS


def dataset_dir(out: Path, scale: float) -> Path:
    return out / f"synthetic-s{scale:g}"


def generate_command(out: Path, scale: float, opts: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "data_pipes.prepare", "--dataset", "synthetic",
            "--scale", f"{scale:g}", "--out", str(dataset_dir(out, scale)), "--force",
            "--no-progress", "--seed", str(opts.seed),
            *(["--workers", str(opts.workers)] if opts.workers != 1 else [])]


def read_command(out: Path, scale: float, opts: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "genci_dist.bench.scale", "--child-read",
            str(dataset_dir(out, scale)), "--batch-size", str(opts.batch_size)]


def raw_inter(out: Path, scale: float, seed: int, repeat: int = 1) -> Path:
    """OUT/raw-s<s>[-x<r>]/synth.inter: raw synthetic interactions (data_pipes.raw_inter.
    write_raw_synthetic, each user's repeated r times), written once by the benchmark's own
    process, outside the measure."""
    from data_pipes.raw_inter import write_raw_synthetic

    path = out / (f"raw-s{scale:g}" + (f"-x{repeat}" if repeat > 1 else "")) / "synth.inter"
    if not path.is_file():
        write_raw_synthetic(path, scale, seed, repeat=repeat)
    return path


def prepare_command(out: Path, scale: float, opts: argparse.Namespace,
                    partitions: str = "auto") -> list[str]:
    return [sys.executable, "-m", "data_pipes.prepare", "--dataset", "recbole",
            "--atomic-dir", str(raw_inter(out, scale, opts.seed, opts.repeat).parent),
            "--label-rule", "drop-band:3-3", "--partitions", partitions,
            "--out", str(dataset_dir(out, scale)), "--force", "--no-progress",
            "--seed", str(opts.seed)]


def prepare_mem_command(out: Path, scale: float, opts: argparse.Namespace) -> list[str]:
    return prepare_command(out, scale, opts, partitions="1")


def _job(stage: str, out: Path, scale: float, opts: argparse.Namespace) -> list[str]:
    """A stage of genci_dist/bench/scale_jobs.py on the scale's dataset."""
    return [sys.executable, "-m", "genci_dist.bench.scale_jobs", stage,
            "--data", str(dataset_dir(out, scale)), "--threads", str(opts.threads),
            "--tokenizer-steps", str(opts.tokenizer_steps), "--model", opts.train_model,
            "--steps", str(opts.train_steps), "--world-size", str(opts.world_size),
            "--batch-size", str(opts.batch_size), "--config", opts.train_config,
            "--run-dir", str(out / f"run-s{scale:g}-{opts.train_model}"),
            "--split", opts.eval_split]


STAGES: dict[str, Callable[[Path, float, argparse.Namespace], list[str]]] = {
    "generate": generate_command,
    "read": read_command,
    "prepare": prepare_command,
    "prepare_mem": prepare_mem_command,
    "tokenize": lambda out, s, o: _job("tokenize", out, s, o),
    "train": lambda out, s, o: _job("train", out, s, o),
    "evaluate": lambda out, s, o: _job("evaluate", out, s, o),
}


def read_pass(data: Path, batch_size: int) -> dict[str, Any]:
    """One full pass over the train split in this process → samples, batches, stage_s."""
    from data_pipes.stream import build_loader

    t0 = time.perf_counter()
    loader = build_loader(data, "train", batch_size=batch_size, num_workers=0, seed=0,
                          with_tokens=(data / SEMANTIC_IDS).is_file(), with_history_ids=True)
    samples = batches = 0
    for batch in loader:
        samples += batch.size
        batches += 1
    seconds = time.perf_counter() - t0
    return {"samples": samples, "batches": batches, "stage_s": round(seconds, 3),
            "samples_per_s": round(samples / max(seconds, 1e-9), 1)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# Runs `python -m MODULE ARGS` in this interpreter, then writes the process's own peak RSS
# (VmHWM: this mm's high-water mark, which exec reset) and its reaped children's to argv[1].
_PEAK_WRAPPER = '''
import json, resource, runpy, sys
peak_file, module = sys.argv[1], sys.argv[3]
sys.argv = [module] + sys.argv[4:]
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    hwm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(peak_file, "w") as f:
        json.dump({"self_kib": hwm, "children_kib": kids}, f)
sys.exit(code)
'''


def _peak_kib(cmd: list[str], peak_file: Path) -> list[str]:
    """`cmd` (`python -m MODULE ...`) wrapped so that the child reports its own peak RSS."""
    if cmd[1:2] != ["-m"]:
        raise ValueError(f"stage commands are `python -m MODULE ...`, got {cmd[:3]}")
    return [cmd[0], "-c", _PEAK_WRAPPER, str(peak_file), *cmd[1:]]


def run_stage(stage: str, cmd: list[str], data: Path, scale: float) -> dict[str, Any]:
    """Runs `cmd` as a child and returns its measurement line. The child prints one JSON
    document on stdout (genci-prepare's summary, or read_pass's dict)."""
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    peak_file = data.parent / f".peak-{stage}-{os.getpid()}.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(_peak_kib(cmd, peak_file), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} at s={scale:g} failed (exit {proc.returncode}): "
                           f"{' '.join(cmd)}")
    child = json.loads(text)
    peak = json.loads(peak_file.read_text())
    peak_file.unlink()
    manifest = json.loads((data / MANIFEST).read_text()) if (data / MANIFEST).is_file() else {}
    interactions = (manifest.get("source", {}).get("interactions")
                    or manifest.get("source", {}).get("raw_interactions"))
    return {"stage": stage, "scale": scale, "wall_s": round(wall, 3),
            "stage_s": child.get("stage_s", child.get("seconds")),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_gb": round(max(peak["self_kib"], peak["children_kib"]) / 2**20, 3),
            "bytes": dir_bytes(data), "interactions": interactions,
            "samples": child.get("samples"), "load1": round(load1, 2),
            **{k: v for k, v in child.items() if k in ("samples_per_s", "batches")},
            **child.get("line", {})}   # the scale_jobs stages' own figures


def growth_exponent(x: Sequence[float], y: Sequence[float]) -> float:
    """k of y ∝ x^k by least squares on log-log axes (needs two distinct x)."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    return float(np.polyfit(lx, ly, 1)[0])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genci-bench scale",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--stages", default="generate", help=f"comma list of {sorted(STAGES)}")
    p.add_argument("--scales", default="1,10,100", help="comma list of synthetic scales")
    p.add_argument("--out", default="data/bench_scale", help="folder of the datasets")
    p.add_argument("--workers", type=int, default=1, help="generator processes")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--batch-size", type=int, default=1024, help="read stage batch size")
    p.add_argument("--threads", type=int, default=0, help="tokenize: compute threads")
    p.add_argument("--tokenizer-steps", type=int, default=10000,
                   help="tokenize: RQ-VAE step budget (on a 262,144-item sample)")
    p.add_argument("--train-model", default="deepfm", help="train/evaluate: model.name")
    p.add_argument("--train-config", default="configs/instrument.toml")
    p.add_argument("--train-steps", type=int, default=100, help="train: steps (a slice)")
    p.add_argument("--world-size", type=int, default=2, help="train/evaluate: ranks")
    p.add_argument("--eval-split", default="train", help="evaluate: split")
    p.add_argument("--repeat", default="1",
                   help="prepare stages: comma list of interaction repeat factors (module doc)")
    p.add_argument("--clean", action="store_true",
                   help="delete each scale's dataset after its stages")
    p.add_argument("--child-read", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.child_read:
        print(json.dumps(read_pass(Path(args.child_read), args.batch_size)))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"genci-bench scale: error: unknown stage(s) {unknown}; known: {sorted(STAGES)}",
              file=sys.stderr)
        return 2
    try:
        scales = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        print(f"genci-bench scale: error: --scales {args.scales!r} is not a comma list of "
              "numbers", file=sys.stderr)
        return 2
    if not scales or min(scales) <= 0:
        print("genci-bench scale: error: --scales must be > 0", file=sys.stderr)
        return 2
    try:
        repeats = [int(r) for r in args.repeat.split(",") if r]
    except ValueError:
        repeats = []
    if not repeats or min(repeats) < 1:
        print(f"genci-bench scale: error: --repeat {args.repeat!r} is not a comma list of "
              "integers >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[dict[str, Any]]] = {s: [] for s in stages}
    for scale in scales:
        data = dataset_dir(out, scale)
        for stage in stages:
            for r in repeats if stage.startswith("prepare") else [1]:
                opts = argparse.Namespace(**{**vars(args), "repeat": r})  # this run's factor
                line = run_stage(stage, STAGES[stage](out, scale, opts), data, scale)
                if len(repeats) > 1:
                    line["repeat"] = r
                lines[stage].append(line)
                print(json.dumps(line), flush=True)
        if args.clean:
            shutil.rmtree(data, ignore_errors=True)
    for stage, got in lines.items():
        pts = [g for g in got if g["interactions"] and g["stage_s"]]
        fit: dict[str, Any] = {"stage": stage, "fit": "seconds ∝ interactions^k",
                               "points": len(pts)}
        if len({g["interactions"] for g in pts}) >= 2:
            x = [g["interactions"] for g in pts]
            fit["exponent_stage_s"] = round(growth_exponent(x, [g["stage_s"] for g in pts]), 3)
            fit["exponent_wall_s"] = round(growth_exponent(x, [g["wall_s"] for g in pts]), 3)
            fit["exponent_cpu_s"] = round(growth_exponent(x, [g["cpu_s"] for g in pts]), 3)
            fit["us_per_interaction"] = {f"{g['scale']:g}": round(1e6 * g["stage_s"]
                                                                  / g["interactions"], 3)
                                         for g in pts}
        print(json.dumps(fit, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
