"""Makes sure the configured dataset (and its semantic IDs) exist before training starts.

Rank 0 prepares a missing dataset from the configured source and runs the tokenizer; every
other rank waits at a barrier. A fresh clone can therefore run `configs/debug.toml` with no
download: its source is a tiny synthetic dataset the project generates itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import tomli_w

from data_pipes.schema import MANIFEST, SEMANTIC_IDS, DatasetError
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
            print(f"[data] {dataset_dir} has no semantic IDs: running the tokenizer", flush=True)
            _run_tokenizer(cfg, dataset_dir)
    env.barrier()
    return dataset_dir
