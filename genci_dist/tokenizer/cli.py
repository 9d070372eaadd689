"""`genci-tokenize --data DIR [--config FILE] [--tokenizer.KEY VALUE ...]`

Reads a prepared dataset's items.parquet, embeds the item texts (cached), trains the RQ-VAE,
and writes semantic_ids.parquet and cohorts.npz into the dataset with a JSON quality report
(also printed). The config file is a TOML whose ``[tokenizer]`` table maps onto
`TokenizerConfig` (other tables are ignored: a full job config can be passed); dotted
overrides win over the file.
"""

from __future__ import annotations

import json
import os
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


def _utilisation(codes: np.ndarray, codebook_size: int | Sequence[int]) -> list[float]:
    """Share of each level's codes used by some item (of K_n codes when sizes per level)."""
    sizes = ([codebook_size] * codes.shape[1] if isinstance(codebook_size, int)
             else list(codebook_size))
    return [len(np.unique(codes[:, n])) / sizes[n] for n in range(codes.shape[1])]


def quality_report(codes: np.ndarray, x: np.ndarray, x_hat: np.ndarray,
                   codebook_size: int | Sequence[int]) -> dict[str, Any]:
    """Reconstruction error, per-level utilisation, collision figures for codes [M, N]."""
    from genci_dist.tokenizer.semantic_ids import collision_stats

    err = ((x_hat - x) ** 2).sum()
    var = ((x - x.mean(0)) ** 2).sum()
    util = _utilisation(codes, codebook_size)
    # items whose text embedding equals another item's (duplicate texts) must collide
    _, inv, cnt = np.unique(x, axis=0, return_inverse=True, return_counts=True)
    return {"n_items": int(codes.shape[0]), "recon_mse": float(err / x.size),
            "recon_rel": float(err / max(var, 1e-30)),
            "utilisation": [round(u, 4) for u in util], **collision_stats(codes),
            "items_with_duplicate_embedding": int((cnt[inv.reshape(-1)] > 1).sum())}


def duplicate_rows(x: np.ndarray, batch_size: int = 65536) -> int:
    """How many rows of x [M, D] equal another row (by a 128-bit hash of their bytes, read
    in batches: memory O(M) for the hashes instead of a sort of the whole array)."""
    import hashlib

    from genci_dist.tokenizer.embed import drop_pages

    keys = np.empty((x.shape[0], 2), dtype=np.uint64)
    for lo in range(0, x.shape[0], batch_size):
        xb = np.ascontiguousarray(x[lo:lo + batch_size])
        for i, row in enumerate(xb):
            keys[lo + i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=16).digest(),
                                         dtype=np.uint64)
        drop_pages(x)
    _, inv, cnt = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    return int((cnt[inv.reshape(-1)] > 1).sum())


def scaled_quality_report(codes: np.ndarray, sq_err: float, sq_dev: float, n_values: int,
                          n_duplicates: int, codebook_size: int | Sequence[int]
                          ) -> dict[str, Any]:
    """`quality_report` from batched sums (the sampled path never holds x̂ for all items)."""
    from genci_dist.tokenizer.semantic_ids import collision_stats

    util = _utilisation(codes, codebook_size)
    return {"n_items": int(codes.shape[0]), "recon_mse": float(sq_err / max(n_values, 1)),
            "recon_rel": float(sq_err / max(sq_dev, 1e-30)),
            "utilisation": [round(u, 4) for u in util], **collision_stats(codes),
            "items_with_duplicate_embedding": n_duplicates}


def _scaled(cfg: TokenizerConfig) -> bool:
    return cfg.train_sample > 0 or cfg.train_steps > 0 or cfg.kmeans_sample > 0


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
                      progress=progress, chunk_size=cfg.embed_chunk_size, mmap=_scaled(cfg),
                      dtype=cfg.embed_dtype)
    del texts
    t0 = time.perf_counter()
    model, stats = train_rqvae(emb.vectors, cfg, progress=progress)
    if _scaled(cfg):
        from genci_dist.tokenizer.rqvae import assign_codes

        a = assign_codes(model, emb.vectors, cfg.assign_batch_size)
        seconds_train = time.perf_counter() - t0
        codes = a.codes
        report = scaled_quality_report(codes, a.sq_err, a.sq_dev, a.n_values,
                                       duplicate_rows(emb.vectors), cfg.level_sizes)
    else:
        x = torch.from_numpy(emb.vectors)
        codes_t, x_hat = model.tokenize(x)
        seconds_train = time.perf_counter() - t0
        codes = codes_t.numpy().astype(np.int32)
        report = quality_report(codes, emb.vectors, x_hat.numpy(), cfg.level_sizes)
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


def affinity_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class pin_threads:  # noqa: N801 - used as a context manager
    """Caps every thread pool of the run at n (0 = the affinity mask): OMP/MKL/OpenBLAS env
    for libraries not loaded yet, torch.set_num_threads / set_num_interop_threads, and
    threadpoolctl for BLAS/OpenMP runtimes already loaded (numpy's, scikit-learn's). One
    compute thread per usable core. (What made runs swing 80x on a shared machine was
    libgomp's spin-waiting, not the thread count: see data_pipes/omp.py.)"""

    def __init__(self, n: int = 0) -> None:
        self.n = n if n > 0 else affinity_cpus()
        self._limits = None

    _VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

    def __enter__(self) -> int:
        self._env = {v: os.environ.get(v) for v in self._VARS}
        for var in self._VARS:
            os.environ[var] = str(self.n)
        import torch

        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already fixed once parallel work ran in this process
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(self.n)
        except ImportError:
            self._limits = None
        return self.n

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._limits is not None:
            self._limits.restore_original_limits()
        torch.set_num_threads(self._torch_threads)
        for var, old in self._env.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old


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
    parser.add_argument("--threads", type=int, default=0,
                        help="compute threads (torch, BLAS, OpenMP); default: the CPUs this "
                             "process may run on (its affinity mask)")
    add_debug_flag(parser)
    args, rest = parser.parse_known_args(argv)
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 1 (or 0 = the affinity mask), got {args.threads}")
    cfg = load_tokenizer_config(args.config, rest)
    progress = cfg.progress_bar and not args.no_progress and sys.stderr.isatty()
    with pin_threads(args.threads) as n_threads:
        report = tokenize_dataset(args.data, cfg, progress=progress)
    report["threads"] = n_threads
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
