"""Synthetic Instrument-shaped data (SPEC §1.4), generated in time and memory linear in the
number of interactions, written in seeded chunks to fixed-size row groups and shards.

Scale factor s = 1 ≈ Amazon-Instrument (57,440 users, 24,588 items); s = 200 ≈ 11.5M users,
4.9M items, 10^8 interactions. Never used for quality claims. The model, per user:

- ``5 + Geometric(1/4.2)`` interactions (mean 9.2; the label rule then drops a third of the
  negatives, leaving 9.2 · (1 - 0.33/3) ≈ 8.19 samples per user).
- Items belong to one of 40 topics (uniform). Inside a topic the items have a random
  popularity rank r = 1, 2, ... and weight r^-POP_EXPONENT, so every topic's rank-frequency
  curve is the same power law (slope -1.3 on log-log axes) whatever the scale.
- The user walks between topics (interest drift): before each interaction, with probability
  0.25 the topic moves by a uniform step in {-2..2} (mod 40). With probability 0.3 the user
  explores: the item comes from a uniformly drawn topic instead. The item is drawn from the
  chosen topic by popularity.
- Click model: on-topic items are clicked (rating 4-5) with probability 0.85, explored ones
  with 0.25; unclicked ones get rating 1-3. So the recent click history predicts the label,
  which is what the sequence models must learn.

Analytic values the tests check: positive rate 0.67 before / 0.7528 after the label rule;
P(two consecutive items share a topic) = 0.49 · 0.8 + 0.51 / 40 = 0.40475.

Every draw is vectorised: the topic walk is a cumulative sum per user, and items are drawn by
inverse CDF, one ``searchsorted`` per chunk over the catalogue's per-topic cumulative
popularity (topic c's segment rises from c to c + 1). Users are generated, turned into samples
(the same protocol as real data) and converted to sequence rows (data_pipes/sequences.py, one
per user, in a seeded order within the chunk) in chunks of CHUNK_USERS; chunk k's output
depends only on (seed, k), so ``--workers N`` generates chunks in N processes while the parent
writes them in order: the files are byte-identical for any N. Row groups hold about
``--row-group-size`` interactions and shards about ``--shard-rows`` (whole users). Memory: the
catalogue (≈ 40 bytes per item) plus a few chunks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipes.protocol import Interactions, apply_label_rule, build_samples
from data_pipes.schema import (
    ITEM,
    ITEMS,
    MANIFEST,
    RAW_ID,
    SCHEMA_VERSION,
    SPLITS,
    TEXT,
    USER,
    USERS,
    DatasetError,
    FeatureSpec,
    manifest_summary,
)
from data_pipes.sequence_writer import SequenceWriter, sequence_table
from data_pipes.writer import finish_counts, sha256_file, split_counts, staging

BASE_USERS, BASE_ITEMS = 57_440, 24_588
N_TOPICS, CATS_PER_TOPIC, STORES_PER_TOPIC = 40, 3, 4
POP_EXPONENT = 1.3          # weight of the item of popularity rank r in its topic: r^-1.3
MIN_LENGTH, EXTRA_LENGTH_MEAN = 5, 4.2   # interactions per user: 5 + Geometric(1 / 4.2)
P_DRIFT, P_EXPLORE = 0.25, 0.3
P_CLICK_ON_TOPIC, P_CLICK_EXPLORE = 0.85, 0.25
WORDS = ("guitar drum piano violin cello flute bass amp pedal string pick strap tuner mic "
         "cable stand case capo reed mallet").split()
ADJ = "classic vintage compact pro studio travel electric acoustic deluxe mini".split()
CHUNK_USERS = 20_000  # users generated and written per step: bounds memory whatever s is
SIDE_ROWS = 1 << 20   # items/users table rows built and written per step
T0 = 1_600_000_000


@dataclass
class Catalogue:
    """Items and the inverse-CDF table. Item id k (1-based) is at index k-1 of the per-item
    arrays; `order` lists item ids by (topic, popularity rank) and `cdf[j]` is the cumulative
    popularity of order[j] inside its topic c, shifted by c (c < cdf[j] ≤ c + 1)."""

    topic: np.ndarray      # int16 [n_items]
    adjective: np.ndarray  # int8 [n_items], index into ADJ (item text)
    store: np.ndarray      # int32 [n_items + 1], row 0 = padding
    categories: pa.ListArray  # list<int32> [n_items + 1], row 0 empty
    order: np.ndarray      # int32 [n_items] item ids
    cdf: np.ndarray        # float64 [n_items]
    sizes: np.ndarray      # int64 [N_TOPICS] items per topic
    ends: np.ndarray       # int64 [N_TOPICS] end of each topic's segment in `order`

    @property
    def n_items(self) -> int:
        return int(self.topic.shape[0])


def make_catalogue(n_items: int, seed: int) -> Catalogue:
    """Items with topics, stores, 1-2 categories of their topic and a popularity rank."""
    rng = np.random.default_rng([seed, 0])
    topic = rng.integers(0, N_TOPICS, n_items).astype(np.int16)
    order = np.lexsort((rng.random(n_items), topic))          # rank order inside each topic
    sizes = np.bincount(topic, minlength=N_TOPICS).astype(np.int64)
    ends = np.cumsum(sizes)
    rank = np.arange(n_items) - np.repeat(ends - sizes, sizes)  # 0-based rank, in `order`
    harmonic = np.cumsum(np.arange(1, int(sizes.max(initial=1)) + 1,
                                   dtype=np.float64) ** -POP_EXPONENT)
    seg = np.repeat(np.arange(N_TOPICS), sizes)
    cdf = seg + harmonic[rank] / harmonic[np.repeat(sizes - 1, sizes)]  # segment ends at c + 1
    store = np.r_[0, topic.astype(np.int32) * STORES_PER_TOPIC
                  + rng.integers(0, STORES_PER_TOPIC, n_items) + 1].astype(np.int32)
    n_cat = rng.integers(1, 3, n_items)
    first = rng.integers(0, CATS_PER_TOPIC, n_items)
    second = (first + rng.integers(1, CATS_PER_TOPIC, n_items)) % CATS_PER_TOPIC
    base = topic.astype(np.int32) * CATS_PER_TOPIC + 1
    pairs = np.stack([base + first, base + second], axis=1)          # [n_items, 2]
    values = pairs[np.arange(2)[None, :] < n_cat[:, None]]            # row-major: item order
    offsets = np.r_[0, 0, np.cumsum(n_cat)].astype(np.int32)
    categories = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))
    adjective = rng.integers(0, len(ADJ), n_items).astype(np.int8)
    return Catalogue(topic, adjective, store, categories, (order + 1).astype(np.int32), cdf,
                     sizes, ends)


def draw_items(cat: Catalogue, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Item ids drawn by popularity from topics `topic` given uniforms `u` in [0, 1). An empty
    topic (tiny scales only) gives item 1."""
    j = np.searchsorted(cat.cdf, topic + u, side="right")
    j = np.minimum(j, cat.ends[topic] - 1)       # c + u may round up to c + 1
    return np.where(cat.sizes[topic] > 0, cat.order[np.maximum(j, 0)], 1).astype(np.int32)


def make_users(first: int, count: int, cat: Catalogue, rng: np.random.Generator
               ) -> Interactions:
    """Interactions of users first..first+count-1: drifting topic walks (module docstring)."""
    lengths = MIN_LENGTH + rng.geometric(1 / EXTRA_LENGTH_MEAN, count)
    n = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    user = np.repeat(np.arange(first, first + count, dtype=np.int32), lengths)
    step = np.where(rng.random(n) < P_DRIFT, rng.integers(-2, 3, n), 0)
    walk = np.cumsum(step)
    origin = rng.integers(0, N_TOPICS, count) - (walk[starts] - step[starts])
    topic = (walk + np.repeat(origin, lengths)) % N_TOPICS     # drift applies before a pick
    explore = rng.random(n) < P_EXPLORE
    pick = np.where(explore, rng.integers(0, N_TOPICS, n), topic)
    pick = np.where(cat.sizes[pick] > 0, pick, topic)            # empty explored topic
    item = draw_items(cat, pick, rng.random(n))
    positive = rng.random(n) < np.where(explore, P_CLICK_EXPLORE, P_CLICK_ON_TOPIC)
    rating = np.where(positive, 4 + rng.integers(0, 2, n), 1 + rng.integers(0, 3, n))
    ts = T0 + np.arange(n, dtype=np.int64) * 60
    return Interactions(user, item, rating.astype(np.float64), ts)


@dataclass(frozen=True)
class ChunkJob:
    """Everything chunk k needs besides the catalogue (plain values: cheap to send)."""

    seed: int
    split: str
    max_history: int
    n_users: int
    chunk_users: int


Chunk = tuple[pa.Table, dict[str, dict[str, int]], int]


def make_chunk(job: ChunkJob, k: int, cat: Catalogue, features: list[FeatureSpec]) -> Chunk:
    """Chunk k as (its sequence rows, per-split {rows, positives, hist} counts, interactions
    generated before the label rule); a function of (job, k) only. (`features`: the manifest's;
    the synthetic users have no side features, so the rows hold the user id only.)"""
    first = 1 + k * job.chunk_users
    count = min(job.chunk_users, job.n_users - first + 1)
    rng = np.random.default_rng([job.seed, 1, k])
    raw = make_users(first, count, cat, rng)
    kept, label = apply_label_rule(raw)
    smp = build_samples(kept, label, split=job.split,  # type: ignore[arg-type]
                        max_history=job.max_history, seed=job.seed + first,
                        histories=False)
    return (sequence_table(smp, {}, {}, [job.seed, 2, k]), split_counts(smp),
            int(raw.user.size))


# A pool worker's inputs, set once per worker process by the pool initializer (with fork the
# catalogue is inherited, not pickled).
_WORKER: tuple[ChunkJob, Catalogue, list[FeatureSpec]] | None = None


def _init_worker(job: ChunkJob, cat: Catalogue, features: list[FeatureSpec]) -> None:
    global _WORKER
    _WORKER = (job, cat, features)


def _worker_chunk(k: int) -> Chunk:
    assert _WORKER is not None
    return make_chunk(_WORKER[0], k, _WORKER[1], _WORKER[2])


def iter_chunks(job: ChunkJob, cat: Catalogue, features: list[FeatureSpec], workers: int
                ) -> Iterator[Chunk]:
    """Chunks 0, 1, ... in order; with workers > 1 computed ahead by forked processes (at most
    2 per worker in flight, so memory stays a few chunks)."""
    n_chunks = -(-job.n_users // job.chunk_users)
    if workers <= 1:
        for k in range(n_chunks):
            yield make_chunk(job, k, cat, features)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                             initializer=_init_worker, initargs=(job, cat, features)) as pool:
        pending: list[Future[Chunk]] = []
        nxt = 0
        for _ in range(n_chunks):
            while nxt < n_chunks and len(pending) < 2 * workers:
                pending.append(pool.submit(_worker_chunk, nxt))
                nxt += 1
            yield pending.pop(0).result()


def _item_text(cat: Catalogue, lo: int, hi: int) -> list[str]:
    """Text of items lo+1..hi: 'adjective word model id; topicT catA catB'."""
    offs = cat.categories.offsets.to_numpy()
    vals = cat.categories.values.to_numpy()
    return [f"{ADJ[a]} {WORDS[t % len(WORDS)]} model {i + 1}; topic{t} "
            + " ".join(f"cat{c}" for c in vals[offs[i + 1]:offs[i + 2]])
            for i, t, a in zip(range(lo, hi), cat.topic[lo:hi].tolist(),
                               cat.adjective[lo:hi].tolist(), strict=True)]


def write_side_tables(tmp: Path, cat: Catalogue, n_users: int) -> None:
    """items.parquet and users.parquet (the columns writer.side_table writes) in steps of
    SIDE_ROWS rows, so no Python string exists for more than one step's rows."""
    w = None
    for lo in range(0, cat.n_items, SIDE_ROWS):
        hi = min(lo + SIDE_ROWS, cat.n_items)
        ids = np.arange(lo + 1, hi + 1, dtype=np.int32)
        t = pa.table({ITEM: ids, RAW_ID: pa.array([f"S{i:07d}" for i in ids.tolist()]),
                      TEXT: pa.array(_item_text(cat, lo, hi), pa.string()),
                      "store": pa.array(cat.store[lo + 1:hi + 1], pa.int32()),
                      "categories": cat.categories.slice(lo + 1, hi - lo)})
        w = w or pq.ParquetWriter(tmp / ITEMS, t.schema)
        w.write_table(t, row_group_size=SIDE_ROWS)
    assert w is not None
    w.close()
    w = None
    for lo in range(0, n_users, SIDE_ROWS):
        ids = np.arange(lo + 1, min(lo + SIDE_ROWS, n_users) + 1, dtype=np.int32)
        t = pa.table({USER: ids, RAW_ID: pa.array([f"U{u:08d}" for u in ids.tolist()])})
        w = w or pq.ParquetWriter(tmp / USERS, t.schema)
        w.write_table(t, row_group_size=SIDE_ROWS)
    assert w is not None
    w.close()


def prepare_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = float(args.scale)
    if s <= 0:
        raise DatasetError("--scale must be > 0")
    workers = int(getattr(args, "workers", 1) or 1)
    if workers < 1:
        raise DatasetError("--workers must be >= 1")
    n_users, n_items = max(20, round(BASE_USERS * s)), max(30, round(BASE_ITEMS * s))
    cat = make_catalogue(n_items, args.seed)
    cats = cat.categories.values.to_numpy()
    features = [FeatureSpec(USER, "user", False, n_users + 1),
                FeatureSpec(ITEM, "item", False, n_items + 1),
                FeatureSpec("store", "item", False, int(cat.store.max()) + 1),
                FeatureSpec("categories", "item", True, int(cats.max(initial=0)) + 1)]
    job = ChunkJob(args.seed, args.split or "leave_one_out", args.max_history or 20, n_users,
                   CHUNK_USERS)
    counts: dict[str, Any] = {s_: {"rows": 0, "positives": 0, "hist": 0} for s_ in SPLITS}
    with staging(Path(args.out), args.force) as tmp, tqdm(
            total=n_users, desc="synthetic users", disable=args.no_progress) as bar:
        writer = SequenceWriter(tmp, args.row_group_size, args.shard_rows)
        interactions = 0
        for table, got, n_raw in iter_chunks(job, cat, features, workers):
            interactions += n_raw
            writer.add(table)
            for name, c in got.items():
                for key, v in c.items():
                    counts[name][key] += v
            bar.update(min(job.chunk_users, n_users - bar.n))
        files: dict[str, Any] = writer.close()
        write_side_tables(tmp, cat, n_users)
        files[ITEMS], files[USERS] = {"rows": n_items}, {"rows": n_users}
        for rel in files:
            files[rel]["bytes"] = (tmp / rel).stat().st_size
            files[rel]["sha256"] = sha256_file(tmp / rel)
        out_counts = finish_counts(counts, {"users": n_users, "items": n_items,
                                            "n_users": n_users, "n_items": n_items})
        manifest = {"schema_version": SCHEMA_VERSION, "dataset": "synthetic",
                    "protocol": {"split": job.split, "max_history": job.max_history,
                                 "seed": args.seed, "scale": s,
                                 "label_rule": "drop rating 3; label = rating > 3"},
                    "counts": out_counts, "features": [f.to_json() for f in features],
                    "row_group_size": args.row_group_size, "files": files,
                    "source": {"generator": "data_pipes.sources.synthetic", "version": 2,
                               "scale": s, "popularity_exponent": POP_EXPONENT,
                               "chunk_users": job.chunk_users,
                               "interactions": interactions}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest_summary(manifest, time.perf_counter() - t0, args.out)
