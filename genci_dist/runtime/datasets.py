"""Makes sure the configured dataset (and its semantic IDs) exist before training starts.

Rank 0 prepares a missing dataset from the configured source and runs the tokenizer; every
other rank waits at a barrier. A fresh clone can therefore run `configs/debug.toml` with no
download: its source is a tiny synthetic dataset the project generates itself. Running the
tokenizer inside the trainer embeds every item of the dataset first (minutes on a real
catalogue), so it is announced in one line that says how to do it beforehand with
`genci-tokenize`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import tomli_w

from data_pipes.schema import MANIFEST, SEMANTIC_IDS, DatasetError, load_manifest
from genci_dist.config import JobConfig
from genci_dist.config_loader import to_plain
from genci_dist.runtime.distributed import DistEnv

# Scale factor of the "tiny" source: ~0.3% of Amazon-Instrument, a few hundred users.
TINY_SCALE = 0.004


def _prepare_args(cfg: JobConfig, out: Path) -> list[str]:
    d = cfg.data
    if d.source == "tiny":
        source, extra = "synthetic", ["--scale", str(TINY_SCALE)]
    elif d.source == "synthetic":
        source, extra = "synthetic", ["--scale", str(d.synthetic_scale)]
    else:
        source, extra = d.source, []
    return ["--dataset", source, "--out", str(out), "--split", d.split,
            "--max-history", str(d.max_history), "--seed", str(d.seed),
            "--data-root", str(out.parent), *extra]


def _run_tokenizer(cfg: JobConfig, dataset_dir: Path) -> None:
    from genci_dist.tokenizer.cli import main as tokenize_main

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.toml"
        path.write_text(tomli_w.dumps({"tokenizer": to_plain(cfg.tokenizer)}))
        rc = tokenize_main(["--data", str(dataset_dir), "--config", str(path)])
    if rc != 0:
        raise DatasetError(f"{dataset_dir}: the tokenizer failed (exit {rc})")


def tokenizer_notice(dataset_dir: Path) -> str:
    """The one line printed before the trainer runs the tokenizer itself."""
    try:
        n_items: object = load_manifest(dataset_dir)["counts"]["items"]
    except (DatasetError, KeyError, TypeError):
        n_items = "?"
    return (f"[data] {dataset_dir} has no semantic IDs: running the tokenizer now on its "
            f"{n_items} items (embeds every item text; the IDs go to "
            f"{dataset_dir / SEMANTIC_IDS}); to do this beforehand: genci-tokenize --data "
            f"{dataset_dir} --config <job or tokenizer .toml>")


def ensure_dataset(cfg: JobConfig, env: DistEnv, need_semantic_ids: bool) -> Path:
    """Returns the prepared dataset folder, building what is missing on rank 0."""
    dataset_dir = Path(cfg.data.dir)
    if env.rank == 0:
        if not (dataset_dir / MANIFEST).is_file():
            if cfg.data.source == "none":
                raise DatasetError(f"{dataset_dir}: no prepared dataset (manifest.json missing) "
                                   "and data.source = 'none'; run genci-prepare first")
            from data_pipes.prepare import main as prepare_main

            print(f"[data] {dataset_dir} missing: preparing source '{cfg.data.source}'",
                  flush=True)
            rc = prepare_main(_prepare_args(cfg, dataset_dir))
            if rc != 0:
                raise DatasetError(f"{dataset_dir}: genci-prepare failed (exit {rc})")
        if need_semantic_ids and not (dataset_dir / SEMANTIC_IDS).is_file():
            print(tokenizer_notice(dataset_dir), flush=True)
            _run_tokenizer(cfg, dataset_dir)
    env.barrier()
    return dataset_dir
