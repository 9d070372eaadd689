"""Evaluation: `python -m genci_dist.evaluate --checkpoint RUN/checkpoints/best --split test`.

Loads a DCP checkpoint at any world size and sharding plan: in one process without torchrun it
builds the plain unsharded model and no process group (DCP's no-dist load); under torchrun it
builds a DMP with the *current* sharding config (`--sharding.default_type row_wise`, ...) and
DCP reshards. Writes metrics JSON (AUC, LogLoss, GAUC, RelaImpr against `--base`) and, with
`--predictions`, a Parquet file of per-sample predictions.

A missing or foreign checkpoint, a bad override or bad data stops it with one line on stderr
(`genci-evaluate: error: ...`) and exit code 2; `--debug` or GENCI_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.evaluation import bf16_autocast, evaluate_loader, write_predictions
from genci_dist.runtime.metrics import rela_impr


def main(argv: Sequence[str] | None = None) -> int:
    """Errors of the config, the data or the checkpoint end as one line on stderr and exit
    code 2 (`--debug` or GENCI_DEBUG=1: with the traceback; see genci_dist/errors.py)."""
    from genci_dist.errors import run_cli

    return run_cli("genci-evaluate", _evaluate, argv)


def _evaluate(argv: list[str]) -> int:
    from genci_dist.errors import ArgumentParser, add_debug_flag

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = ArgumentParser(prog="genci-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (or its run folder)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--out", default=None, help="metrics JSON (default: <ckpt>/eval_<split>.json)")
    p.add_argument("--predictions", default=None, help="write per-sample predictions (Parquet)")
    p.add_argument("--base", default=None, help="metrics JSON of a base run for RelaImpr")
    p.add_argument("--batch-size", type=int, default=0)
    add_debug_flag(p)
    args, overrides = p.parse_known_args(argv)

    from data_pipes.schema import feature_specs, load_manifest
    from data_pipes.stream import build_loader
    from genci_dist.config import ConfigError
    from genci_dist.errors import one_line
    from genci_dist.model.build import batch_fields, build_task, load_generation_assets
    from genci_dist.runtime.checkpoint import load_checkpoint_config, load_model_only

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"--checkpoint {ckpt}: no such file or folder")
    try:
        cfg = load_checkpoint_config(ckpt, overrides)
    except FileNotFoundError as e:  # a folder with no checkpoint in it
        raise ConfigError(f"--checkpoint {one_line(e)}") from e
    if args.batch_size < 0:
        raise ConfigError(f"--batch-size must be >= 0, got {args.batch_size}")
    try:
        env = DistEnv.init(cfg.train.device, keep_freed=cfg.train.keep_freed_memory)
    except ValueError as e:  # a device this machine does not have
        raise ConfigError(f"train.device: {e}") from e
    try:
        size = args.batch_size or cfg.data.eval_batch_size
        if size < env.world_size:
            raise ConfigError(f"--batch-size (else data.eval_batch_size) must be >= the world "
                              f"size {env.world_size}, got {size}")
        dataset_dir = Path(cfg.data.dir)
        manifest = load_manifest(dataset_dir)
        assets = load_generation_assets(dataset_dir, manifest, cfg.model)
        if env.world_size == 1:
            model = build_task(cfg.model, feature_specs(manifest), assets, device=env.device)
            load_model_only(model, ckpt)
        else:
            from genci_dist.runtime.checkpoint import load_model_sharded
            from genci_dist.runtime.sharding import build_dmp

            task = build_task(cfg.model, feature_specs(manifest), assets,
                              device=torch.device("meta"))
            model, _plan = build_dmp(task, env, cfg.sharding)
            load_model_sharded(model, ckpt)
        batch = (args.batch_size or cfg.data.eval_batch_size) // env.world_size
        loader = build_loader(dataset_dir, args.split, batch_size=batch, rank=env.rank,
                              world_size=env.world_size, num_workers=cfg.data.num_workers,
                              read_ahead=cfg.data.read_ahead, seed=cfg.data.seed, shuffle=False,
                              max_history=cfg.data.max_history,
                              keep_freed_memory=cfg.train.keep_freed_memory,
                              **batch_fields(cfg.model))
        preds: list[dict[str, Any]] | None = [] if args.predictions else None
        # as the trainer's validation runs it (train.autocast_bf16 of the checkpoint's config,
        # or `--train.autocast_bf16 true` to score an fp32 checkpoint in bf16)
        with bf16_autocast(env.device, cfg.train.autocast_bf16):
            metrics = evaluate_loader(model, loader, env, preds)
        metrics["autocast_bf16"] = cfg.train.autocast_bf16
        metrics = {"model": cfg.model.name, "split": args.split, "world_size": env.world_size,
                   "checkpoint": str(ckpt), **metrics}
        if args.base:
            base = json.loads(Path(args.base).read_text())
            base_auc = base[args.split]["auc"] if args.split in base else base["auc"]
            metrics["rela_impr_pct"] = rela_impr(metrics["auc"], base_auc)
            metrics["base"] = args.base
        if preds is not None:
            write_predictions(preds, Path(f"{args.predictions}.rank{env.rank}")
                               if env.world_size > 1 else Path(args.predictions))
        if env.rank == 0:
            out = Path(args.out) if args.out else ckpt / f"eval_{args.split}.json"
            out.write_text(json.dumps(metrics, indent=2))
            print(json.dumps(metrics), flush=True)
    finally:
        env.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
