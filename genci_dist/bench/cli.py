"""Training-stack benchmark (JSON lines on stdout): samples/s of the real `Trainer` stack (DMP,
fused sparse optimizer, DDP, the streaming loader) on prepared datasets, at world size 1 and 2
(real gloo processes), with the step time split into phases, plus the generator's achieved
GFLOP/s against a plain fp32 matmul and the peak RSS.

    genci-bench --configs configs/ml1m.toml,configs/ml100k.toml --models genci,deepfm,dcnv2,din \\
        --world-sizes 1,2 --steps 20 --warmup 3 --eval-batches 5
    genci-bench --configs configs/ml1m.toml --models genci --world-sizes 1 --repeats 3 \\
        --variant base:"--model.attention sdpa" --variant fused:"--model.attention genci_t5"
    genci-bench --configs configs/debug.toml --steps 2 --warmup 1 --only train --threads 1 \\
        --train.lr 0.001            # unknown `--section.key VALUE` args apply to every run

One measurement = one (config, model, world size, variant, repeat): W ranks are spawned (fresh
processes, so each peak RSS is its own; `--inprocess` runs world size 1 in this process),
each builds a `Trainer` (checkpoints and TensorBoard off, a temporary run_dir) and runs the
requested benches; rank 0 reports through a file and this process prints one line per bench:

- train: W warm-up + N timed steps of loader next → DMP forward → backward → optimizer (as
  `Trainer._train_epoch`). samples_per_s = samples of all ranks / wall time (max over ranks).
  split_s = seconds per step, mean over ranks: data (next + to(device)); inside the forward,
  by forward hooks on the task's submodules (the outermost hooked call owns the time, so the
  T5 decoder steps run by beam search count as generation): embedding (sparse, intent_emb,
  DIN history), encoder (generator.t5.encoder), decoder (generator.t5 / .decoder / .lm_head
  outside generation: the NTP pass), generation (the task's `generate`, wrapped on the
  instance), attention (cohort_attn, DIN attention), mlp (mlp, teacher, baseline head),
  forward_other (the forward's remainder: losses, DDP, glue); backward (zero_grad +
  backward, incl. fused sparse updates and the DDP all-reduce); optimizer (step + LR).
- eval: forward under no_grad over M batches of the valid split (eval_batch_size), same split.
- flops (genci only): FLOPs of one generator forward+backward (encoder + teacher-forced NTP
  decoder + loss, backward by autograd.grad so DDP's hooks stay out) and of one beam search
  (forward only) on a real local batch with its histories padded to max_history
  (history_tokens wide: the worst case, and the same batch whatever the bucketing), under
  the run's autocast (dtype), counted by FlopCounterMode; achieved GFLOP/s = FLOPs / median
  wall time of the same call; matmul_gflops = n×n torch.mm in the same dtype on the same
  threads; ratio = achieved / matmul. gflop_per_sample is per sample of the local batch.
- matmul: the matmul rate alone (bfloat16 under train.autocast_bf16, else float32).

Variants (`--variant NAME:"OVERRIDES"`) re-run every measurement with their overrides;
with `--repeats R` the variants are interleaved within each repeat and, when R > 1 or there
are several variants, a summary line per bench (repeat = "median": medians, best_*, speedup
against the first variant) follows each (config, model, world size) group.

The commands behind README "Speed". Each starts with `genci-bench --configs configs/ml1m.toml
--models genci`. The numbers are medians of the interleaved repeats. This machine's speed
drifts between minutes, so compare only variants measured in the same run.
- kernel + bucketing (2026-11-23): `--world-sizes 1 --only train --batch-size 256 --steps 16
  --warmup 2`. The variants set `--model.attention sdpa|genci_t5` and
  `--data.bucket_window 0|32`.
- absorbed cross-attention (2026-11-23): `--world-sizes 1 --only train --batch-size 256
  --steps 6 --warmup 2 --threads 1 --inprocess --repeats 2`, with the variants
  `--model.absorb_cross_attention false|true`, each with and without
  `--train.autocast_bf16 true`. The eval form is `--only eval --eval-batch-size 2048
  --eval-batches 3 --eval-warmup 1`.
- generator slices (2026-11-23): `--world-sizes 1 --only train --batch-size 1024 --steps 2
  --warmup 1 --data.bucket_window 0`, with the variants `--model.generator_chunk 0|128`.
  The eval form is `--only eval --eval-batch-size 2048 --threads 1 --inprocess --repeats 2`.
- kept probabilities (2026-11-23): `--world-sizes 1 --only train --batch-size 1024 --steps 3
  --warmup 1 --threads 2 --inprocess --repeats 2`, with the variants
  `--model.attention_keep_probs false|true --train.autocast_bf16 true`.
- freed memory (2026-11-23): `--world-sizes 2 --only train --batch-size 1024 --steps 3
  --warmup 1 --repeats 2`, with the variants `--train.keep_freed_memory false|true
  --train.autocast_bf16 true`.
- ranks vs threads (2026-11-23): `--world-sizes 2`, then `--world-sizes 1`, each with
  `--only train --batch-size 1024 --steps 3 --warmup 1 --train.autocast_bf16 true`. Threads
  are cores / ranks.
- eval dedup (2026-12-03): `--world-sizes 1 --only eval --eval-batch-size 2048
  --eval-batches 2 --eval-warmup 1 --threads 1 --inprocess --repeats 2
  --train.autocast_bf16 true`, with the variants `--model.dedup_eval_histories false|true`.
- FLOPs vs matmul (2026-12-03): `--world-sizes 1 --only flops,matmul --threads 1 --inprocess
  --repeats 2`, with the variants `--train.autocast_bf16 false|true`. The batch is padded to
  max_history, so the count is the worst case: 0.449 GFLOP per sample.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from genci_dist.bench.measure import (
    EVAL_PHASES,
    TRAIN_PHASES,
    Feed,
    PhaseClock,
    install_phase_hooks,
    measure_flops,
    measure_loop,
    measure_matmul,
    peak_rss_mb,
)

BENCHES = ("train", "eval", "flops", "matmul")
MODELS = ("genci", "deepfm", "dcnv2", "din")
HIGHER_IS_BETTER = ("samples_per_s", "achieved_gflops", "generation_gflops", "matmul_gflops",
                    "ratio")
LOWER_IS_BETTER = ("step_s",)


@dataclass
class RunSpec:
    """One measurement: what each spawned rank builds and runs."""

    config: str
    model: str
    world_size: int
    variant: str
    overrides: list[str]
    benches: list[str]
    steps: int
    warmup: int
    eval_batches: int
    eval_warmup: int
    flops_reps: int
    matmul_size: int
    matmul_reps: int
    threads: int
    verbose: bool
    repeat: int = 0




def load_spec_config(spec: RunSpec, run_dir: str) -> Any:
    from genci_dist.config import load_config

    forced = ["--checkpoint.enabled", "false", "--checkpoint.resume", "never",
              "--train.tensorboard", "false", "--train.progress_bar", "false",
              "--train.run_dir", run_dir]
    return load_config(spec.config, ["--model.name", spec.model, *spec.overrides, *forced])


def run_rank(spec: RunSpec, run_dir: str) -> list[dict[str, Any]] | None:
    """Everything one rank does for one measurement; rank 0 returns the report lines."""
    from genci_dist.runtime.distributed import DistEnv
    from genci_dist.runtime.trainer import Trainer

    cfg = load_spec_config(spec, run_dir)
    env = DistEnv.init(cfg.train.device, require_pg=True, keep_freed=cfg.train.keep_freed_memory)
    try:
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        per_rank: dict[str, Any] = {}
        trainer = task = None
        if set(spec.benches) - {"matmul"}:
            quiet = contextlib.redirect_stdout(sys.stderr if spec.verbose else io.StringIO())
            with quiet:  # Trainer prints the resolved config and the plan on rank 0
                trainer = Trainer(cfg, env)
            task = trainer.dmp.module
        clock = PhaseClock()
        hooked = install_phase_hooks(trainer.dmp, task, clock) if trainer is not None else {}
        if trainer is not None and env.rank == 0:
            found = "; ".join(f"{p}={','.join(n) or '-'}" for p, n in hooked.items())
            print(f"[bench] {spec.model} hooked: {found}", file=sys.stderr, flush=True)
        if "train" in spec.benches:
            feed = Feed(trainer.train_loader, env.device)
            per_rank["train"] = measure_loop(trainer, clock, feed, spec.steps, spec.warmup, True)
        if "eval" in spec.benches:
            loader = trainer._loader("valid", shuffle=False,
                                     batch=cfg.data.eval_batch_size // env.world_size)
            per_rank["eval"] = measure_loop(trainer, clock, Feed(loader, env.device),
                                            spec.eval_batches, spec.eval_warmup, False)
        if "flops" in spec.benches and hasattr(task, "generator"):
            env.barrier()
            per_rank["flops"] = measure_flops(trainer, task, spec.flops_reps)
        if "flops" in spec.benches or "matmul" in spec.benches:
            env.barrier()
            # in the run's autocast dtype; the flops line reports it as its own dtype
            per_rank["matmul"] = measure_matmul(
                spec.matmul_size, spec.matmul_reps,
                torch.bfloat16 if cfg.train.autocast_bf16 else torch.float32)
        per_rank["rss"] = peak_rss_mb()
        per_rank["threads"] = torch.get_num_threads()
        gathered = env.all_gather_object(per_rank)
        if env.rank != 0:
            return None
        return report_lines(spec, cfg, gathered, hooked)
    finally:
        env.destroy()


# ---- reporting (rank 0) -------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def report_lines(spec: RunSpec, cfg: Any, ranks: list[dict[str, Any]],
                 hooked: dict[str, list[str]]) -> list[dict[str, Any]]:
    base = {"variant": spec.variant, "config": spec.config, "model": spec.model,
            "world_size": spec.world_size, "repeat": spec.repeat,
            "overrides": spec.overrides, "peak_rss_mb": round(max(r["rss"] for r in ranks), 1),
            "threads": ranks[0]["threads"], "torch": torch.__version__}
    lines: list[dict[str, Any]] = []
    for bench, phases, steps, batch in (
            ("train", TRAIN_PHASES, spec.steps, cfg.data.batch_size),
            ("eval", EVAL_PHASES, spec.eval_batches, cfg.data.eval_batch_size)):
        if bench not in ranks[0]:
            continue
        runs = [r[bench] for r in ranks]
        elapsed = max(r["elapsed"] for r in runs)
        samples = sum(r["samples"] for r in runs)
        split = {p: _mean([r["split"].get(p, 0.0) for r in runs]) / steps for p in phases}
        lines.append({"bench": bench, **base, "batch_size": batch, "steps": steps,
                      "samples": int(samples), "samples_per_s": samples / elapsed,
                      "step_s": elapsed / steps, "split_s": split, "hooked": hooked})
    if "matmul" in ranks[0]:
        mm = _mean([r["matmul"]["matmul_gflops"] for r in ranks])
        mm_s = _mean([r["matmul"]["matmul_s"] for r in ranks])
        if "flops" in ranks[0]:
            f = [r["flops"] for r in ranks]
            achieved = _mean([x["achieved_gflops"] for x in f])
            local = f[0]["local_batch"]
            lines.append({
                "bench": "flops", **base, "batch_size": cfg.data.batch_size,
                "local_batch": local, "steps": spec.flops_reps,
                "history_tokens": f[0]["history_tokens"],
                "dtype": ranks[0]["matmul"]["matmul_dtype"],  # = the run's autocast dtype
                "samples_per_s": sum(x["samples_per_s"] for x in f),
                "step_s": _mean([x["fwd_bwd_s"] for x in f]),
                "split_s": {"fwd_bwd": _mean([x["fwd_bwd_s"] for x in f]),
                            "generation": _mean([x["generation_s"] for x in f])},
                "gflop_per_sample": f[0]["flops"] / local / 1e9,
                "generation_gflop_per_sample": f[0]["gen_flops"] / local / 1e9,
                "achieved_gflops": achieved,
                "generation_gflops": _mean([x["generation_gflops"] for x in f]),
                "matmul_gflops": mm, "ratio": achieved / mm,
                "generation_ratio": _mean([x["generation_gflops"] for x in f]) / mm})
        if "matmul" in spec.benches:
            lines.append({"bench": "matmul", **base, "batch_size": spec.matmul_size,
                          "steps": spec.matmul_reps, "samples_per_s": None, "step_s": mm_s,
                          "split_s": {}, "matmul_gflops": mm,
                          "matmul_dtype": ranks[0]["matmul"]["matmul_dtype"],
                          "matmul_gflops_all_ranks": mm * len(ranks)})
    return lines


def summarize(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (bench, variant): medians over repeats, best_*, speedup vs the first
    variant (median samples/s, or matmul GFLOP/s)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        groups[(line["bench"], line["variant"])].append(line)
    out: list[dict[str, Any]] = []
    first: dict[str, float] = {}
    for (bench, _variant), rows in groups.items():
        summary = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, float):
                values = [r[key] for r in rows]
                summary[key] = statistics.median(values)
                if key in HIGHER_IS_BETTER:
                    summary[f"best_{key}"] = max(values)
                elif key in LOWER_IS_BETTER:
                    summary[f"best_{key}"] = min(values)
        if "peak_rss_mb" in summary:
            summary["peak_rss_mb"] = round(summary["peak_rss_mb"], 1)
        summary["repeat"] = "median"
        summary["repeats"] = len(rows)
        if rows[0].get("split_s"):
            summary["split_s"] = {k: statistics.median(r["split_s"][k] for r in rows)
                                  for k in rows[0]["split_s"]}
        metric = summary.get("samples_per_s") or summary.get("matmul_gflops") or 0.0
        first.setdefault(bench, metric)
        summary["speedup"] = metric / first[bench] if first[bench] else None
        out.append(summary)
    return out


# ---- orchestration ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, spec: RunSpec, port: int, run_dir: str, result: str) -> None:
    """Entry of a spawned rank: torchrun's variables, then `run_rank`; rank 0 writes JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(spec.world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(spec.world_size))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the parent's JSON lines only
        lines = run_rank(spec, run_dir)
    if lines is not None:
        Path(result).write_text(json.dumps(lines))


def run_measurement(spec: RunSpec, inprocess: bool) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="genci-bench-") as tmp:
        run_dir = str(Path(tmp) / "run")
        if inprocess and spec.world_size == 1:
            with contextlib.redirect_stdout(sys.stderr):
                return run_rank(spec, run_dir) or []
        result = Path(tmp) / "result.json"
        mp.start_processes(_spawned, args=(spec, _free_port(), run_dir, str(result)),
                           nprocs=spec.world_size, join=True, start_method="spawn")
        return json.loads(result.read_text())


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME:--a.b 1 --c.d=x` → (NAME, ["--a.b", "1", "--c.d=x"])."""
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:OVERRIDES")
    return name.strip(), shlex.split(overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genci-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unknown --section.key VALUE args are config overrides "
                                       "for every run.")
    p.add_argument("--configs", default="configs/ml1m.toml,configs/ml100k.toml")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps first")
    p.add_argument("--eval-batches", type=int, default=5)
    p.add_argument("--eval-warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=0, help="data.batch_size (global)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="data.eval_batch_size")
    p.add_argument("--only", default=",".join(BENCHES),
                   help=f"comma list of {', '.join(BENCHES)}")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   metavar="NAME:OVERRIDES")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--flops-reps", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per rank (0 = DistEnv's cores // ranks)")
    p.add_argument("--inprocess", action="store_true",
                   help="run world size 1 in this process (faster; RSS is this process's)")
    p.add_argument("--verbose", action="store_true", help="show the Trainer's config and plan")
    return p


def _emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """A bad config or override ends as one line on stderr and exit code 2 before any run
    starts (`--debug` or GENCI_DEBUG=1: with the traceback; see genci_dist/errors.py)."""
    from genci_dist.errors import run_cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["scale"]:  # genci-bench scale ...: the data-path stages at growing sizes
        from genci_dist.bench import scale

        return scale.main(args[1:])
    return run_cli("genci-bench", _bench, args)


def _bench(argv: list[str]) -> int:
    from types import SimpleNamespace

    from genci_dist.config_loader import ConfigError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args, common = build_parser().parse_known_args(argv)
    benches = _csv(args.only)
    models = _csv(args.models)
    bad = [b for b in benches if b not in BENCHES] + [m for m in models if m not in MODELS]
    if bad:
        raise ConfigError(f"--only / --models: unknown bench or model {bad} (benches: "
                          f"{', '.join(BENCHES)}; models: {', '.join(MODELS)})")
    sizes = [] if args.batch_size <= 0 else ["--data.batch_size", str(args.batch_size)]
    if args.eval_batch_size > 0:
        sizes += ["--data.eval_batch_size", str(args.eval_batch_size)]
    variants = args.variant or [("default", [])]
    for config in _csv(args.configs):  # every run's config is valid before any run starts
        for model in models:
            for world in (int(w) for w in _csv(args.world_sizes)):
                for _name, overrides in variants:  # (the three fields load_spec_config reads)
                    spec = SimpleNamespace(config=config, model=model,
                                           overrides=[*common, *sizes, *overrides])
                    load_spec_config(spec, "runs/bench-check").check_world_size(world)
    failed = 0
    for config in _csv(args.configs):
        for model in models:
            for world in (int(w) for w in _csv(args.world_sizes)):
                group: list[dict[str, Any]] = []
                for repeat in range(args.repeats):
                    for name, overrides in variants:
                        spec = RunSpec(
                            config, model, world, name, [*common, *sizes, *overrides],
                            [b for b in benches if b != "flops" or model == "genci"],
                            args.steps, args.warmup, args.eval_batches, args.eval_warmup,
                            args.flops_reps, args.matmul_size, args.matmul_reps,
                            args.threads, args.verbose, repeat)
                        if not spec.benches:
                            continue
                        try:
                            lines = run_measurement(spec, args.inprocess)
                        except Exception as e:  # report, then go on with the other runs
                            traceback.print_exc()
                            failed += 1
                            _emit({"bench": "error", **asdict(spec), "error": repr(e)[:2000]})
                            continue
                        for line in lines:
                            _emit(line)
                        group += lines
                if group and (args.repeats > 1 or len(variants) > 1):
                    for line in summarize(group):
                        _emit(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
