"""`genci-tokenize --data DIR [--config FILE] [--tokenizer.KEY VALUE ...]`

Reads a prepared dataset's items.parquet, embeds the item texts (cached), trains the RQ-VAE,
and writes semantic_ids.parquet and cohorts.npz into the dataset with a JSON quality report
(also printed). The config file is a TOML whose ``[tokenizer]`` table maps onto
`TokenizerConfig` (other tables are ignored: a full job config can be passed); dotted
overrides win over the file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.schema import ITEM, ITEMS, TEXT, DatasetError, load_manifest
from genci_dist.config_loader import (
    ConfigError,
    build_dataclass,
    merge,
    parse_overrides,
    read_toml,
)
from genci_dist.tokenizer.config import TokenizerConfig


def load_tokenizer_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TokenizerConfig:
    """TOML file's [tokenizer] table ← `--tokenizer.key value` overrides → TokenizerConfig.
    Unknown keys and wrong types raise ConfigError naming the file or flag."""
    file_data: dict[str, Any] = read_toml(path) if path is not None else {}
    cli = parse_overrides(list(overrides))
    extra = [k for k in cli if k != "tokenizer"]
    if extra:
        raise ConfigError(f"command line: only --tokenizer.* overrides are accepted, got "
                          f"--{extra[0]}.*")
    section = file_data.get("tokenizer", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tokenizer] must be a table")
    try:
        build_dataclass(TokenizerConfig, cli.get("tokenizer", {}), "tokenizer")
    except ConfigError as e:
        raise ConfigError(f"command line: --{e}") from None
    try:
        return build_dataclass(TokenizerConfig, merge(section, cli.get("tokenizer", {})),
                               "tokenizer")
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def read_item_texts(dataset_dir: Path, n_items: int) -> list[str]:
    """Texts of items 1..n_items from items.parquet, validated (sorted dense ids, strings)."""
    path = dataset_dir / ITEMS
    try:
        table = pq.read_table(path, columns=[ITEM, TEXT])
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: missing") from e
    except (OSError, pa.ArrowException, KeyError) as e:
        raise DatasetError(f"{path}: cannot read columns {ITEM!r}, {TEXT!r} ({e})") from e
    ids = table.column(ITEM).to_numpy(zero_copy_only=False)
    if len(ids) != n_items:
        raise DatasetError(f"{path}: {len(ids)} rows, the manifest says {n_items} items")
    bad = np.nonzero(ids != np.arange(1, n_items + 1))[0]
    if len(bad):
        raise DatasetError(f"{path}: row {bad[0]}: item_id {ids[bad[0]]}, expected {bad[0] + 1}")
    texts = table.column(TEXT).to_pylist()
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DatasetError(f"{path}: row {i} (item {i + 1}): field {TEXT!r} is empty or "
                               "not a string")
    return texts


def quality_report(codes: np.ndarray, x: np.ndarray, x_hat: np.ndarray,
                   codebook_size: int) -> dict[str, Any]:
    """Reconstruction error, per-level utilisation, collision figures for codes [M, N]."""
    from genci_dist.tokenizer.semantic_ids import collision_stats

    err = ((x_hat - x) ** 2).sum()
    var = ((x - x.mean(0)) ** 2).sum()
    util = [len(np.unique(codes[:, n])) / codebook_size for n in range(codes.shape[1])]
    # items whose text embedding equals another item's (duplicate texts) must collide
    _, inv, cnt = np.unique(x, axis=0, return_inverse=True, return_counts=True)
    return {"n_items": int(codes.shape[0]), "recon_mse": float(err / x.size),
            "recon_rel": float(err / max(var, 1e-30)),
            "utilisation": [round(u, 4) for u in util], **collision_stats(codes),
            "items_with_duplicate_embedding": int((cnt[inv.reshape(-1)] > 1).sum())}


def tokenize_dataset(dataset_dir: str | Path, cfg: TokenizerConfig,
                     progress: bool = True) -> dict[str, Any]:
    """The whole pipeline; returns the quality report (also stored in the parquet metadata)."""
    import torch

    from genci_dist.tokenizer.cohorts import CohortIndex
    from genci_dist.tokenizer.embed import embed_texts
    from genci_dist.tokenizer.rqvae import train_rqvae
    from genci_dist.tokenizer.semantic_ids import (
        build_semantic_ids,
        manifest_items,
        write_semantic_ids,
    )

    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    n_items, items_hash = manifest_items(manifest)
    texts = read_item_texts(dataset_dir, n_items)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else dataset_dir.resolve().parent / "cache"

    emb = embed_texts(texts, cfg.model, cache_dir, batch_size=cfg.embed_batch_size,
                      progress=progress)
    t0 = time.perf_counter()
    model, stats = train_rqvae(emb.vectors, cfg, progress=progress)
    x = torch.from_numpy(emb.vectors)
    codes_t, x_hat = model.tokenize(x)
    seconds_train = time.perf_counter() - t0
    codes = codes_t.numpy().astype(np.int32)

    report = quality_report(codes, emb.vectors, x_hat.numpy(), cfg.codebook_size)
    report.update({"embedding_dim": int(emb.vectors.shape[1]), "embed_cached": emb.cached,
                   "seconds_embed": round(emb.seconds, 3), "seconds_train": round(seconds_train, 3),
                   "train_steps": stats.steps, "codes_reset": stats.codes_reset,
                   "final_train_loss": round(stats.final_loss, 6)})
    cfg_json = asdict(cfg)
    sids = build_semantic_ids(codes, cfg.codebook_size, model=cfg.model, items_hash=items_hash,
                              config=cfg_json, metrics=report)
    cohorts = CohortIndex.build(sids.codes, cfg.codebook_size, member_cap=cfg.cohort_member_cap,
                                seed=cfg.seed, content_hash=sids.content_hash)
    report["cohort_sizes"] = {"code": cohorts.size_histogram("code"),
                              "prefix": cohorts.size_histogram("prefix")}
    report["content_hash"] = sids.content_hash
    # cohorts first: semantic_ids.parquet is what marks the dataset as tokenized
    cohorts.save(dataset_dir)
    write_semantic_ids(dataset_dir, sids)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """A bad config, dataset or embedding model ends as one line on stderr and exit code 2
    (`--debug` or GENCI_DEBUG=1: with the traceback; see genci_dist/errors.py)."""
    from genci_dist.errors import run_cli

    return run_cli("genci-tokenize", _tokenize, argv)


def _tokenize(argv: list[str]) -> int:
    from genci_dist.errors import ArgumentParser, add_debug_flag

    parser = ArgumentParser(prog="genci-tokenize", description=__doc__.split("\n\n")[1],
                            epilog="Overrides: --tokenizer.KEY VALUE (TOML literals).")
    parser.add_argument("--data", required=True, help="prepared dataset folder (manifest.json)")
    parser.add_argument("--config", default=None, help="TOML file with a [tokenizer] table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    args, rest = parser.parse_known_args(argv)
    cfg = load_tokenizer_config(args.config, rest)
    progress = cfg.progress_bar and not args.no_progress and sys.stderr.isatty()
    report = tokenize_dataset(args.data, cfg, progress=progress)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
