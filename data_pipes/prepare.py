"""`genci-prepare`: raw dataset → prepared Parquet layout (SPEC §2).

    genci-prepare --dataset ml-100k --out data/ml-100k
    genci-prepare --dataset ml-1m --out data/ml-1m --split random
    genci-prepare --dataset ml-dat --source path/to/ml-1m-dat-folder --out data/ml-1m-dat
    genci-prepare --dataset recbole --source path/to/atomic-folder --out data/mine
    genci-prepare --dataset recbole --atomic-dir DIR --name NAME --label-rule implicit --out data/N
    genci-prepare --dataset amazon --source path/to/Musical_Instruments.jsonl.gz --out data/instr
    genci-prepare --dataset recbole --atomic-dir DIR --label-rule drop-band:3-3 --partitions auto \
        --out data/big        # out of core (data_pipes/partitioned.py), any .inter size
    genci-prepare --dataset synthetic --scale 1.0 --out data/synth-1
    genci-prepare verify data/ml-100k     # sizes, sha256, schemas, ids, labels, nulls; exit 2

`--dataset recbole --source DIR` reads MovieLens-shaped atomic files (the ML-100K/ML-1M
fields and features); `--dataset recbole --atomic-dir DIR` is the generic RecBole source (any
`.inter` with user_id, item_id, a rating or label column, optional timestamp; side features
from whatever `.user`/`.item` columns exist; see data_pipes/sources/recbole.py).

Prints a progress bar and, at the end, a JSON report (counts, per-split rows and positive
rates, average history length, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipes.protocol import MOVIELENS, LabelRule, apply_label_rule, build_samples
from data_pipes.schema import DatasetError, manifest_summary
from data_pipes.writer import write_dataset

DATASETS = ("ml-100k", "ml-1m", "ml-dat", "recbole", "amazon", "synthetic")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genci-prepare", description=__doc__.split("\n")[0],
                                epilog="genci-prepare verify DATA: checks a prepared dataset "
                                "against its manifest (see genci-prepare verify --help)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, help="output folder of the prepared dataset")
    p.add_argument("--source", default=None, help="raw files (ml-dat, recbole, amazon)")
    p.add_argument("--atomic-dir", default=None,
                   help="recbole only: folder of RecBole atomic files for the generic source "
                        "(NAME.inter, optional NAME.user / NAME.item)")
    p.add_argument("--name", default=None,
                   help="generic recbole: the files' stem and the manifest's dataset name "
                        "(default: the one *.inter in --atomic-dir)")
    p.add_argument("--label-rule", type=_label_rule, default=None,
                   help="threshold:T (label = rating >= T) | drop-band:LO-HI (drop LO..HI, "
                        "label = rating > HI; MovieLens = drop-band:3-3, the MovieLens default) "
                        "| implicit (all positive) | label (the .inter's 0/1 label column, the "
                        "generic default when it has one)")
    p.add_argument("--float-buckets", type=int, default=10,
                   help="generic recbole: :float side features with more distinct values are "
                        "bucketised into this many equal-frequency buckets; 0 = leave them out")
    p.add_argument("--data-root", default="data", help="download cache root (wheels)")
    p.add_argument("--split", default=None, choices=["temporal", "random", "leave_one_out"],
                   help="default: temporal (MovieLens), leave_one_out (Amazon, synthetic)")
    p.add_argument("--max-history", type=int, default=None,
                   help="default 50 for MovieLens, 20 for Amazon/synthetic")
    p.add_argument("--row-group-size", type=int, default=8192,
                   help="interactions per sequence row group (whole users: a group closes "
                        "once it reaches this many)")
    p.add_argument("--shard-rows", type=int, default=1 << 18,
                   help="interactions per sequence shard (whole row groups)")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic scale factor")
    p.add_argument("--workers", type=int, default=1,
                   help="synthetic: processes generating chunks (same files for any value)")
    p.add_argument("--partitions", type=_partitions, default=1,
                   help="recbole: N > 1 or 'auto' = the out-of-core partitioned prepare "
                        "(data_pipes/partitioned.py; auto: N = kept rows / --partition-rows); "
                        "1 = in memory")
    p.add_argument("--partition-rows", type=int, default=2_000_000,
                   help="--partitions auto: kept interactions per partition")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset")
    p.add_argument("--no-progress", action="store_true")
    return p


def _label_rule(text: str) -> LabelRule:
    try:
        return LabelRule.parse(text)
    except DatasetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _partitions(text: str) -> int:
    """'auto' → 0 (sized by --partition-rows), else a positive count."""
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 1 or 'auto'")
    return int(text)


def _partitioned(args: argparse.Namespace, generic: bool) -> dict[str, Any]:
    from data_pipes.partitioned import prepare_partitioned

    t0 = time.perf_counter()
    if args.dataset != "recbole":
        raise DatasetError(f"--partitions: the partitioned prepare reads RecBole atomic files "
                           f"(--dataset recbole), not --dataset {args.dataset}")
    with tqdm(desc="writing", unit="rows", disable=True if args.no_progress else None) as bar:
        manifest = prepare_partitioned(
            Path(args.atomic_dir if generic else _need_source(args)), Path(args.out),
            shape="generic" if generic else "ml", name=args.name if generic else None,
            rule=getattr(args, "label_rule", None), partitions=args.partitions,
            partition_rows=args.partition_rows, split=args.split or "temporal",
            max_history=args.max_history or 50, seed=args.seed,
            row_group_size=args.row_group_size, shard_rows=args.shard_rows,
            float_buckets=args.float_buckets, force=args.force, tick=bar.update)
    return manifest_summary(manifest, time.perf_counter() - t0, args.out)


def _movielens(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from data_pipes.sources import movielens as ml

    if args.dataset in ("ml-100k", "ml-1m"):
        raw, source = ml.load_wheel(args.dataset, Path(args.data_root))
    elif args.dataset == "ml-dat":
        raw, source = ml.load_dat_dir(Path(_need_source(args))), {"path": args.source}
    else:
        raw, source = ml.load_atomic_dir(Path(_need_source(args))), {"path": args.source}
    return ml.to_tables(raw, getattr(args, "label_rule", None) or MOVIELENS), source


def _need_source(args: argparse.Namespace) -> str:
    if not args.source:
        raise DatasetError(f"--dataset {args.dataset} needs --source")
    return args.source


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    rule: LabelRule = getattr(args, "label_rule", None) or MOVIELENS
    generic = args.dataset == "recbole" and getattr(args, "atomic_dir", None)
    if getattr(args, "label_rule", None) and args.dataset in ("amazon", "synthetic"):
        raise DatasetError(f"--label-rule: the {args.dataset} source has its fixed rule "
                           "(drop rating 3, > 3 positive)")
    if generic and args.source:
        raise DatasetError("--dataset recbole: give --source (MovieLens-shaped files) or "
                           "--atomic-dir (generic), not both")
    if getattr(args, "partitions", 1) != 1:
        return _partitioned(args, bool(generic))
    name, extra = args.dataset, {}
    if args.dataset == "synthetic":
        from data_pipes.sources.synthetic import prepare_synthetic

        return prepare_synthetic(args)
    if args.dataset == "amazon":
        from data_pipes.sources.amazon import load_amazon

        (inter, user, item), source = load_amazon(Path(_need_source(args)))
        split, max_hist = args.split or "leave_one_out", args.max_history or 20
    elif generic:
        from data_pipes.sources.recbole import load_generic

        (inter, user, item), rule, source, extra = load_generic(
            Path(args.atomic_dir), args.name, getattr(args, "label_rule", None),
            float_buckets=args.float_buckets)
        name = source["name"]
        split, max_hist = args.split or "temporal", args.max_history or 50
    else:
        (inter, user, item), source = _movielens(args)
        split, max_hist = args.split or "temporal", args.max_history or 50
    kept, label = apply_label_rule(inter, rule)
    samples = build_samples(kept, label, split=split, max_history=max_hist, seed=args.seed,
                            histories=False)
    protocol = {"label_rule": rule.describe(),
                "ordering": "per user by (timestamp, dense item id = sorted raw id)",
                "split": split, "max_history": max_hist, "seed": args.seed,
                "history": "earlier positives of the user, most recent max_history, oldest first",
                **extra}
    with tqdm(total=len(samples), desc=f"writing {name}", unit="rows",
              disable=True if args.no_progress else None) as bar:
        manifest = write_dataset(Path(args.out), dataset=name, protocol=protocol,
                                 samples=samples, user=user, item=item,
                                 row_group_size=args.row_group_size, shard_rows=args.shard_rows,
                                 seed=args.seed, force=args.force, source=source,
                                 tick=bar.update)
    return manifest_summary(manifest, time.perf_counter() - t0, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:      # genci-prepare verify DATA (data_pipes/verify.py)
        from data_pipes.verify import main as verify_main

        return verify_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        rep = run(args)
    except DatasetError as e:
        print(f"genci-prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
