"""Shared fixtures: tiny prepared datasets written through the real protocol and writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_tiny_dataset(out: Path, n_users: int = 30, n_items: int = 40, per_user: int = 12,
                       seed: int = 0, row_group_size: int = 16, levels: int = 2,
                       codebook_size: int = 4, semantic_ids: bool = True) -> Path:
    """A MovieLens-shaped prepared dataset with random ratings, written by the real writer."""
    from data_pipes.protocol import Interactions, apply_label_rule, build_samples
    from data_pipes.writer import SideTable, write_dataset

    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(1, n_users + 1), per_user).astype(np.int32)
    item = rng.integers(1, n_items + 1, size=user.size).astype(np.int32)
    rating = rng.choice([1.0, 2.0, 4.0, 5.0], size=user.size)
    ts = rng.integers(0, 50, size=user.size).astype(np.int64)
    inter = Interactions(user, item, rating, ts)
    kept, label = apply_label_rule(inter)
    samples = build_samples(kept, label, split="temporal", max_history=5)
    genre_len = rng.integers(0, 3, size=n_items + 1)
    genre_len[0] = 0
    offsets = np.r_[0, np.cumsum(genre_len)]
    genres = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                      pa.array(rng.integers(1, 6, offsets[-1]), pa.int32()))
    users = SideTable(np.arange(1, n_users + 1).astype(str),
                      {"gender": np.r_[0, rng.integers(1, 3, n_users)].astype(np.int32)}, {})
    items = SideTable(np.arange(1, n_items + 1).astype(str),
                      {"release_year": np.r_[0, rng.integers(1, 9, n_items)].astype(np.int32)},
                      {"genres": genres}, [f"movie {i}; genre" for i in range(1, n_items + 1)])
    write_dataset(out, dataset="tiny", protocol={"split": "temporal", "max_history": 5},
                  samples=samples, user=users, item=items, row_group_size=row_group_size,
                  shard_rows=row_group_size * 3, seed=seed)
    if semantic_ids:  # through the tokenizer's own writers, so every check of them applies
        import json

        from genci_dist.tokenizer.cohorts import CohortIndex
        from genci_dist.tokenizer.semantic_ids import build_semantic_ids, write_semantic_ids

        codes = rng.integers(0, codebook_size, size=(n_items, levels))
        manifest = json.loads((out / "manifest.json").read_text())
        sids = build_semantic_ids(codes, codebook_size, model="test",
                                  items_hash=manifest["files"]["items.parquet"]["sha256"])
        write_semantic_ids(out, sids)
        CohortIndex.build(codes, codebook_size, content_hash=sids.content_hash).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")
