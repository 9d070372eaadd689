"""One rank of the distributed partitioned prepare: `python -m data_pipes.partitioned_job`
with genci-prepare's arguments, launched by torchrun or the TorchX `prepare` component
(launchers/components.py). The steps themselves are data_pipes/partitioned.py's."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipes.partitioned import (
    PARTITION_ROWS,
    check_out,
    finish,
    run_partition,
    scan,
    work_dir,
)
from data_pipes.protocol import LabelRule
from data_pipes.schema import DatasetError, manifest_summary


def _parser() -> argparse.ArgumentParser:
    """genci-prepare's options that the partitioned prepare reads (data_pipes/prepare.py
    documents them; data_pipes.prepare imports this module, so no import back)."""
    def rule(text: str) -> LabelRule:
        try:
            return LabelRule.parse(text)
        except DatasetError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def parts(text: str) -> int:
        if text == "auto":
            return 0
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 1 or 'auto'")
        return int(text)

    p = argparse.ArgumentParser(prog="python -m data_pipes.partitioned_job",
                                description="one rank of the distributed partitioned prepare")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--source", default=None)
    p.add_argument("--atomic-dir", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--label-rule", type=rule, default=None)
    p.add_argument("--float-buckets", type=int, default=10)
    p.add_argument("--split", default=None, choices=["temporal", "random", "leave_one_out"])
    p.add_argument("--max-history", type=int, default=None)
    p.add_argument("--row-group-size", type=int, default=8192)
    p.add_argument("--shard-rows", type=int, default=1 << 18)
    p.add_argument("--partitions", type=parts, default=0)
    p.add_argument("--partition-rows", type=int, default=PARTITION_ROWS)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """One rank of the distributed partitioned prepare (genci-prepare's arguments; RANK and
    WORLD_SIZE from torchrun / TorchX dist.ddp): rank 0 scans, every rank takes partitions
    rank::world, rank 0 writes the manifest; ranks meet at gloo barriers and
    share each step's outcome, so a bad input ends every rank with the same one-line error.
    All ranks need the same filesystem (the work folder next to --out)."""
    import os

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    generic = bool(args.atomic_dir)
    out_dir, work = Path(args.out), work_dir(Path(args.out))
    t0 = time.perf_counter()

    def step(fn: Callable[[], Any]) -> Any:
        """Runs `fn` and returns its value; raises every rank's first error on every rank."""
        err, value = "", None
        try:
            value = fn()
        except DatasetError as e:
            err = str(e)
        if dist is not None:
            got: list[Any] = [None] * world
            dist.all_gather_object(got, (err, value))
            errs = [e for e, _ in got if e]
            err = errs[0] if errs else ""
            value = got[0][1]
        if err:
            raise DatasetError(err)
        return value

    def start() -> int:
        if args.dataset != "recbole":
            raise DatasetError(f"the partitioned prepare reads RecBole atomic files "
                               f"(--dataset recbole), not --dataset {args.dataset}")
        check_out(out_dir, args.force)
        shutil.rmtree(work, ignore_errors=True)
        return scan(Path(args.atomic_dir if generic else args.source or ""), work,
                    shape="generic" if generic else "ml", name=args.name if generic else None,
                    rule=args.label_rule, partitions=args.partitions,
                    partition_rows=args.partition_rows, split=args.split or "temporal",
                    max_history=args.max_history or 50, seed=args.seed,
                    row_group_size=args.row_group_size, shard_rows=args.shard_rows,
                    float_buckets=args.float_buckets)

    try:
        p = step(lambda: start() if rank == 0 else None)
        step(lambda: [run_partition(work, k) for k in range(rank, p, world)])
        manifest = step(lambda: finish(work, out_dir, args.force) if rank == 0 else None)
    except DatasetError as e:
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
            print(f"genci-prepare: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            dist.destroy_process_group()
    if rank == 0:
        summary = manifest_summary(manifest, time.perf_counter() - t0, str(out_dir))
        print(json.dumps({**summary, "ranks": world}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
