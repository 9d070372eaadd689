"""Cluster projection (JSON lines on stdout, a markdown report with --markdown): what a
production-sized GenCI / DeepFM job (default 10^8 users, 10^7 items, 10^10 interactions, the
paper's Amazon-Instrument dimensions of configs/instrument.toml) needs, from figures measured
on this machine.

    python -m genci_dist.bench.projection --config configs/instrument.toml \\
        --dataset data/bench_scale/synthetic-s100 --world-sizes 64,128 --budgets-gb 80,16 \\
        --measured deepfm=28093:2 --measured genci=289.4:2 --markdown /tmp/projection.md

The measured rates (2026-12-04, 2 ranks × 1 thread, batch 1024, this 2-core host under load):
DeepFM one full epoch of synthetic s=100 (35,551,486 samples, `torchrun ... -m
genci_dist.train --config configs/instrument.toml --model.name deepfm --train.epochs 1`,
steps 50 → 34,700 in 1263 s, load 5-13); GenCI 20 steps of 1024 on synthetic s=10 with
random semantic IDs (`genci-bench --configs configs/instrument.toml --models genci
--world-sizes 2 --steps 20 --warmup 2 --only train`, 3.54 s/step, load 4-8).

Lines (each a JSON object with "kind"):

- table: every embedding table of the model at the target size (the real model class built
  on the meta device; its side features keep the measured dataset's cardinalities):
  rows × dim × bytes per value + the fused sparse optimizer's state (sharding.py's
  `table_sizes`, the figures the trainer's planner budgets with).
- plan: the TorchRec planner run for real on a simulated topology (`Topology(world_size=W,
  compute_device="cuda", hbm_cap=budget - RUNTIME_RESERVE_GB, local_world_size=8)`) with the
  trainer's own constraints, sharders and state-aware storage estimator (sharding.py); per
  table the sharding type and kernel it picks, per rank the estimated bytes (max and min over
  ranks), or the planner's failure when the tables do not fit the budget.
- data: bytes on disk per sample, measured on --dataset (train split files / train rows), the
  target's samples (leave-one-out: interactions × samples/interactions of --dataset minus
  valid + test, one each per user) and bytes per epoch.
- epoch: projected epoch time = train samples / (measured samples/s per rank × ranks), where
  samples/s per rank = the measured run's samples/s / its ranks (perfect scaling assumed:
  an upper bound on speed; communication of a real cluster is not in it).

Every figure carries the arithmetic that made it ("how").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.distributed.planner import Topology

from data_pipes.schema import SEQUENCES, FeatureSpec, TokenVocab, feature_specs, load_manifest
from genci_dist.config import load_config
from genci_dist.config_loader import ConfigError
from genci_dist.errors import ArgumentParser, run_cli
from genci_dist.model.build import build_task
from genci_dist.model.config import ModelConfig
from genci_dist.model.task import GenerationAssets
from genci_dist.runtime.sharding import (
    GB,
    RUNTIME_RESERVE_GB,
    MemoryBudget,
    ShardingConfig,
    _plan,
    build_planner,
    build_sharders,
    table_sizes,
)
from genci_dist.tokenizer.trie import SemanticIdTrie

USER, ITEM = "user_id", "item_id"


# ---- the model at the target size ----------------------------------------------------------
def target_features(features: list[FeatureSpec], users: int, items: int) -> list[FeatureSpec]:
    """The dataset's features with user_id / item_id resized to the target (+1: row 0 is
    padding, as in every manifest); side features keep their measured cardinality."""
    size = {USER: users + 1, ITEM: items + 1}
    return [replace(f, cardinality=size.get(f.name, f.cardinality)) for f in features]


def placeholder_assets(levels: int, codebook_size: int) -> GenerationAssets:
    """GenCI's generation assets with the real vocabulary shape (levels × codebook_size codes,
    one collision digit) and a one-item trie / empty cohorts: they size no table (the intent
    table is n_items × d_model, code-mode cohorts are levels × K bags of it), so the model's
    tables and dense layers are exactly those of the full-size model."""
    vocab = TokenVocab(levels, codebook_size, 1)
    trie = SemanticIdTrie(np.zeros((1, levels + 1), dtype=np.int64), np.array([1]),
                          [codebook_size] * levels + [1])
    n = levels * codebook_size
    return GenerationAssets(vocab, trie, np.zeros(n + 1, dtype=np.int64),
                            np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.long), n,
                            "projection")


def build_target_model(model_cfg: ModelConfig, features: list[FeatureSpec], levels: int = 3,
                       codebook_size: int = 256) -> torch.nn.Module:
    assets = placeholder_assets(levels, codebook_size) if model_cfg.name == "genci" else None
    return build_task(model_cfg, features, assets, device=torch.device("meta"))


# ---- the planner on a simulated topology ---------------------------------------------------
@dataclass(frozen=True)
class SimulatedPlan:
    world_size: int
    budget_gb: float
    ok: bool
    tables: dict[str, dict[str, Any]]   # name -> {sharding, kernel, ranks}
    rank_bytes_max: int
    rank_bytes_min: int
    reserved_bytes: int
    error: str = ""


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _planner_quiet() -> Iterator[None]:
    """Silences what TorchRec says about a dry run, all expected here: the Topology is built
    directly (it is simulated on purpose), HeuristicalStorageReservation's FutureWarning (the
    trainer uses the same reservation, so the projection matches it), its note that a meta
    model's dense size is not materialised (the dense part is a few MB against GB of tables)
    and "Sharding spec not found" for data_parallel tables (they have none). Errors show."""
    drop = _DropRecords()
    loggers = [logging.getLogger(), logging.getLogger("torchrec.distributed.planner.types"),
               logging.getLogger("torchrec.distributed.planner.storage_reservations")]
    for log in loggers:
        log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log in loggers:
            log.removeFilter(drop)


def plan_on_topology(model: torch.nn.Module, cfg: ShardingConfig, world_size: int,
                     budget_gb: float, local_world_size: int = 8,
                     compute_device: str = "cuda", host_gb: float = 256.0) -> SimulatedPlan:
    """The trainer's planner path (sharding.plan_sharding without the process group): same
    constraints, sharders and state-aware estimator, on a Topology of `world_size` simulated
    devices with `budget_gb` each (less RUNTIME_RESERVE_GB, as build_topology) in HBM (cuda)
    or DDR (cpu), `host_gb` of host memory per rank beside it on cuda."""
    if world_size < 1 or budget_gb <= RUNTIME_RESERVE_GB:
        raise ConfigError(f"projection: world size {world_size} and budget {budget_gb} GB: "
                          f"need ≥ 1 rank and more than the {RUNTIME_RESERVE_GB} GB reserve")
    budget = MemoryBudget(int(budget_gb * GB), f"simulated {budget_gb:g} GB per rank",
                          int(RUNTIME_RESERVE_GB * GB))
    cap = budget.planner_bytes
    local = min(local_world_size, world_size)
    with _planner_quiet():
        if compute_device == "cuda":
            topology = Topology(world_size=world_size, compute_device="cuda", hbm_cap=cap,
                                ddr_cap=int(host_gb * GB), local_world_size=local)
        else:
            topology = Topology(world_size=world_size, compute_device=compute_device, ddr_cap=cap,
                                local_world_size=local)
        planner = build_planner(model, cfg, topology)
        status, value = _plan(planner, model, build_sharders(cfg), budget)
    if status == "error":
        reserved, reason = value
        return SimulatedPlan(world_size, budget_gb, False, {}, 0, 0, reserved, reason)
    plan, estimate = value
    tables: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            ranks = sorted({r for r in (ps.ranks or [])})
            tables[name] = {"sharding": ps.sharding_type, "kernel": ps.compute_kernel,
                            "ranks": len(ranks)}
    per_rank = [estimate.rank_bytes(r) for r in range(world_size)]
    return SimulatedPlan(world_size, budget_gb, True, tables, max(per_rank), min(per_rank),
                         estimate.reserved_bytes)


# ---- data volume and epoch time ------------------------------------------------------------
@dataclass(frozen=True)
class DataMeasure:
    interactions: int
    samples: int
    train_rows: int
    train_bytes: int

    @property
    def bytes_per_sample(self) -> float:
        return self.train_bytes / self.train_rows

    @property
    def samples_per_interaction(self) -> float:
        return self.samples / self.interactions


def measure_dataset(dataset_dir: str | Path) -> DataMeasure:
    """Counts from the manifest; train bytes = the sequence shards on disk, which an epoch of
    train reads whole (every split's samples are cut from the same user sequences)."""
    d = Path(dataset_dir)
    m = load_manifest(d)
    inter = int(m.get("source", {}).get("interactions") or m["counts"]["samples"])
    train_bytes = sum(p.stat().st_size for p in (d / SEQUENCES).glob("*.parquet"))
    return DataMeasure(inter, int(m["counts"]["samples"]), int(m["counts"]["train"]["rows"]),
                       train_bytes)


def target_train_samples(interactions: int, users: int, samples_per_interaction: float) -> int:
    """Leave-one-out: every kept interaction is a sample; each user gives one valid and one
    test sample, the rest train."""
    return int(round(interactions * samples_per_interaction)) - 2 * users


def epoch_seconds(train_samples: int, measured_samples_per_s: float, measured_ranks: int,
                  ranks: int) -> float:
    """train samples / (samples/s per rank × ranks), samples/s per rank = measured / its ranks."""
    return train_samples / (measured_samples_per_s / measured_ranks * ranks)


# ---- report --------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB" if n < 1e12 else f"{n / 1e12:,.2f} TB"


def _hours(s: float) -> str:
    return f"{s / 3600:,.2f} h" if s >= 3600 else f"{s / 60:,.1f} min"


def project(args: argparse.Namespace) -> list[dict[str, Any]]:
    job = load_config(args.config, args.overrides)
    manifest = load_manifest(Path(args.dataset))
    features = target_features(feature_specs(manifest), args.users, args.items)
    data = measure_dataset(args.dataset)
    train = target_train_samples(args.interactions, args.users, data.samples_per_interaction)
    lines: list[dict[str, Any]] = []
    lines.append({
        "kind": "data", "dataset": str(args.dataset),
        "measured": {"interactions": data.interactions, "samples": data.samples,
                     "train_rows": data.train_rows, "train_bytes": data.train_bytes},
        "bytes_per_sample": round(data.bytes_per_sample, 2),
        "samples_per_interaction": round(data.samples_per_interaction, 4),
        "target": {"users": args.users, "items": args.items,
                   "interactions": args.interactions, "train_samples": train},
        "epoch_bytes": int(train * data.bytes_per_sample),
        "how": (f"train samples = {args.interactions:.3g} × {data.samples_per_interaction:.4f}"
                f" − 2 × {args.users:.3g} = {train:.4g}; bytes/sample = {data.train_bytes:,} "
                f"/ {data.train_rows:,} = {data.bytes_per_sample:.2f}; epoch = {train:.4g} × "
                f"{data.bytes_per_sample:.2f} B = {_gb(train * data.bytes_per_sample)}")})
    measured = dict(args.measured)
    for name in args.models:
        model_cfg = replace(job.model, name=name)
        model = build_target_model(model_cfg, features)
        sizes = table_sizes(model, job.sharding)
        for t in sizes:
            lines.append({"kind": "table", "model": name, "table": t.name, "rows": t.rows,
                          "dim": t.cols, "dtype": t.dtype, "weight_bytes": t.weight_bytes,
                          "state_bytes": t.state_bytes,
                          "how": f"{t.rows:,} × {t.cols} × {t.weight_bytes // (t.rows * t.cols)}"
                                 f" B + {job.sharding.sparse_optimizer} state "
                                 f"{t.state_bytes:,} B = {_gb(t.bytes)}"})
        total = sum(t.bytes for t in sizes)
        for w in args.world_sizes:
            for b in args.budgets_gb:
                p = plan_on_topology(build_target_model(model_cfg, features), job.sharding, w,
                                     b, local_world_size=args.local_world_size,
                                     host_gb=args.host_gb)
                lines.append({"kind": "plan", "model": name, "world_size": w, "budget_gb": b,
                              "ok": p.ok, "tables_bytes": total, "tables": p.tables,
                              "rank_bytes_max": p.rank_bytes_max,
                              "rank_bytes_min": p.rank_bytes_min,
                              "reserved_bytes": p.reserved_bytes, "error": p.error})
            if name in measured:
                sps, ranks = measured[name]
                sec = epoch_seconds(train, sps, ranks, w)
                lines.append({"kind": "epoch", "model": name, "world_size": w,
                              "measured_samples_per_s": sps, "measured_ranks": ranks,
                              "epoch_s": round(sec, 1),
                              "how": f"{train:.4g} / ({sps:g} / {ranks} × {w}) = {sec:,.0f} s "
                                     f"= {_hours(sec)}"})
    return lines


def markdown(lines: list[dict[str, Any]]) -> str:
    out = []
    data = next(x for x in lines if x["kind"] == "data")
    size = {(x["model"], x["table"]): x["weight_bytes"] + x["state_bytes"]
            for x in lines if x["kind"] == "table"}
    out += ["| model | table | rows × dim | weights + optimizer state |", "|---|---|---|---|"]
    for x in lines:
        if x["kind"] == "table":
            out.append(f"| {x['model']} | {x['table']} | {x['rows']:,} × {x['dim']} | "
                       f"{_gb(x['weight_bytes'])} + {_gb(x['state_bytes'])} |")
    out += ["", "| model | ranks | budget/rank | plan (table: sharding/kernel) | est. per rank "
            "(max / min) |", "|---|---|---|---|---|"]
    for x in lines:
        if x["kind"] != "plan":
            continue
        if x["ok"]:
            big = sorted(x["tables"].items(), key=lambda kv: -size.get((x["model"], kv[0]), 0))
            plan = ", ".join(f"{t}: {v['sharding']}/{v['kernel']}" for t, v in big)
            est = f"{_gb(x['rank_bytes_max'])} / {_gb(x['rank_bytes_min'])}"
        else:
            plan, est = f"does not fit: {x['error'][:80]}", "-"
        out.append(f"| {x['model']} | {x['world_size']} | {x['budget_gb']:g} GB | {plan} | "
                   f"{est} |")
    out += ["", f"Data per epoch: {data['how']}.", ""]
    for x in lines:
        if x["kind"] == "epoch":
            out.append(f"- {x['model']}, {x['world_size']} ranks: {x['how']}")
    return "\n".join(out) + "\n"


def _measured(text: str) -> tuple[str, tuple[float, int]]:
    try:
        name, rest = text.split("=", 1)
        sps, ranks = rest.split(":", 1)
        return name, (float(sps), int(ranks))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--measured {text!r}: expected MODEL=SAMPLES_PER_S:"
                                         f"RANKS, e.g. deepfm=35000:2") from None


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _body(argv: list[str]) -> int:
    p = ArgumentParser(prog="genci-projection", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/instrument.toml")
    p.add_argument("--dataset", required=True, help="prepared dataset whose bytes/sample and "
                   "side features are measured (e.g. data/bench_scale/synthetic-s100)")
    p.add_argument("--users", type=lambda s: int(float(s)), default=10**8)
    p.add_argument("--items", type=lambda s: int(float(s)), default=10**7)
    p.add_argument("--interactions", type=lambda s: int(float(s)), default=10**10)
    p.add_argument("--models", type=lambda s: s.split(","), default=["genci", "deepfm"])
    p.add_argument("--world-sizes", type=_ints, default=[64, 128])
    p.add_argument("--budgets-gb", type=_floats, default=[80.0, 16.0])
    p.add_argument("--local-world-size", type=int, default=8)
    p.add_argument("--host-gb", type=float, default=256.0,
                   help="host memory per rank beside the device budget (UVM kernels)")
    p.add_argument("--measured", type=_measured, action="append", default=[],
                   help="MODEL=SAMPLES_PER_S:RANKS of a measured run (repeatable)")
    p.add_argument("--markdown", default="", help="also write the markdown report here")
    args, rest = p.parse_known_args(argv)
    args.overrides = rest
    lines = project(args)
    for x in lines:
        print(json.dumps(x), flush=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("genci-projection", _body, argv)


if __name__ == "__main__":
    sys.exit(main())
