"""Synthetic Instrument-shaped data (SPEC §1.4) that streams to shards with bounded memory.

Scale factor s = 1 ≈ Amazon-Instrument (57,440 users, 24,588 items, ≈0.5M interactions,
≈9 interactions per user: the paper's "avg history" is interactions / users). Items belong
to topics and have power-law popularity; every user walks between topics (interest drift),
mostly picking items of the current topic and clicking them,
sometimes exploring popular off-topic items and mostly not clicking those — so the recent
click history predicts the label, which is what the sequence models must learn. Users are
generated, turned into samples (the same protocol as real data) and written chunk by chunk,
so memory is bounded by one chunk whatever s is. Never used for quality claims.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipes.protocol import Interactions, apply_label_rule, build_samples
from data_pipes.schema import (
    ITEMS,
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    USERS,
    DatasetError,
    manifest_summary,
)
from data_pipes.writer import (
    SideTable,
    feature_list,
    sample_table,
    sha256_file,
    side_table,
    staging,
)

BASE_USERS, BASE_ITEMS = 57_440, 24_588
N_TOPICS, CATS_PER_TOPIC, STORES_PER_TOPIC = 40, 3, 4
WORDS = ("guitar drum piano violin cello flute bass amp pedal string pick strap tuner mic "
         "cable stand case capo reed mallet").split()
CHUNK_USERS = 20_000  # users generated and written per step: bounds memory whatever s is
ADJ = "classic vintage compact pro studio travel electric acoustic deluxe mini".split()


def make_items(n_items: int, rng: np.random.Generator
               ) -> tuple[SideTable, list[np.ndarray], np.ndarray]:
    """Items with topics → (item table, item ids of each topic, popularity weight per item)."""
    topic = rng.integers(0, N_TOPICS, n_items)
    pop = rng.zipf(1.3, n_items).astype(np.float64)
    by_topic = [np.flatnonzero(topic == t) + 1 for t in range(N_TOPICS)]
    n_cat = rng.integers(1, 3, n_items)
    cat = [topic[i] * CATS_PER_TOPIC + rng.choice(CATS_PER_TOPIC, n_cat[i], replace=False) + 1
           for i in range(n_items)]
    offsets = np.r_[0, 0, np.cumsum(n_cat)]
    cats = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(np.concatenate(cat).astype(np.int32)))
    store = np.r_[0, topic * STORES_PER_TOPIC + rng.integers(0, STORES_PER_TOPIC, n_items) + 1]
    text = [f"{ADJ[rng.integers(len(ADJ))]} {WORDS[t % len(WORDS)]} model {i + 1}; "
            f"topic{t} " + " ".join(f"cat{c}" for c in cat[i]) for i, t in enumerate(topic)]
    items = SideTable(np.array([f"S{i:07d}" for i in range(1, n_items + 1)], dtype=object),
                      {"store": store.astype(np.int32)}, {"categories": cats}, text)
    return items, by_topic, pop


def make_users(first: int, count: int, topic_items: list[np.ndarray], pop: np.ndarray,
               rng: np.random.Generator) -> Interactions:
    """Interactions of users first..first+count-1: drifting topic walks."""
    lengths = 5 + rng.geometric(1 / 4.2, count)               # mean ≈ 9 interactions
    n = int(lengths.sum())
    user = np.repeat(np.arange(first, first + count), lengths).astype(np.int32)
    item = np.empty(n, dtype=np.int32)
    positive = np.empty(n, dtype=bool)
    k = 0
    for length in lengths:
        t = rng.integers(N_TOPICS)
        for _ in range(length):
            if rng.random() < 0.25:                            # interest drift
                t = (t + rng.integers(-2, 3)) % N_TOPICS
            explore = rng.random() < 0.3
            cands = topic_items[rng.integers(N_TOPICS)] if explore else topic_items[t]
            if cands.size == 0:
                cands = topic_items[t] if topic_items[t].size else np.array([1])
            w = pop[cands - 1]
            item[k] = cands[rng.choice(cands.size, p=w / w.sum())]
            positive[k] = rng.random() < (0.25 if explore else 0.85)
            k += 1
    rating = np.where(positive, rng.choice([4.0, 5.0], n), rng.choice([1.0, 2.0, 3.0], n))
    ts = 1_600_000_000 + np.arange(n, dtype=np.int64) * 60
    return Interactions(user, item, rating, ts)


def prepare_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = float(args.scale)
    if s <= 0:
        raise DatasetError("--scale must be > 0")
    rng = np.random.default_rng(args.seed)
    n_users, n_items = max(20, round(BASE_USERS * s)), max(30, round(BASE_ITEMS * s))
    items, topic_items, pop = make_items(n_items, rng)
    users = SideTable(np.array([f"U{u:08d}" for u in range(1, n_users + 1)], dtype=object), {},
                      {})
    features = feature_list(users, items)
    split = args.split or "leave_one_out"
    max_hist = args.max_history or 20
    chunk = CHUNK_USERS
    files: dict[str, Any] = {}
    counts: dict[str, Any] = {s_: {"rows": 0, "positives": 0, "hist": 0} for s_ in SPLITS}
    with staging(Path(args.out), args.force) as tmp, tqdm(
            total=n_users, desc="synthetic users", disable=args.no_progress) as bar:
        writers: dict[str, pq.ParquetWriter] = {}
        for first in range(1, n_users + 1, chunk):
            count = min(chunk, n_users - first + 1)
            kept, label = apply_label_rule(make_users(first, count, topic_items, pop, rng))
            smp = build_samples(kept, label, split=split, max_history=max_hist,
                                seed=args.seed + first)
            for code, name in enumerate(SPLITS):
                idx = np.flatnonzero(smp.split == code)
                if name == "train":
                    idx = idx[rng.permutation(idx.size)]
                part = smp.take(idx)
                table = sample_table(part, users, items, features)
                if name not in writers:
                    (tmp / name).mkdir()
                    writers[name] = pq.ParquetWriter(tmp / name / "part-00000.parquet",
                                                     table.schema)
                writers[name].write_table(table, row_group_size=args.row_group_size)
                c = counts[name]
                c["rows"] += int(idx.size)
                c["positives"] += int(part.label.sum())
                c["hist"] += int(part.hist_offsets[-1])
            bar.update(count)
        for name, w in writers.items():
            w.close()
            rel = f"{name}/part-00000.parquet"
            meta = pq.ParquetFile(tmp / rel).metadata
            files[rel] = {"rows": meta.num_rows, "row_groups": meta.num_row_groups}
        pq.write_table(side_table(items, "item_id", features, "item"), tmp / ITEMS)
        pq.write_table(side_table(users, "user_id", features, "user"), tmp / USERS)
        files[ITEMS], files[USERS] = {"rows": n_items}, {"rows": n_users}
        for rel in files:
            files[rel]["sha256"] = sha256_file(tmp / rel)
        total = sum(c["rows"] for c in counts.values())
        out_counts: dict[str, Any] = {"samples": total, "users": n_users, "items": n_items,
                                      "n_users": n_users, "n_items": n_items}
        for name, c in counts.items():
            out_counts[name] = {"rows": c["rows"], "positives": c["positives"],
                                "positive_rate": c["positives"] / max(c["rows"], 1),
                                "avg_history": c["hist"] / max(c["rows"], 1)}
        out_counts["positive_rate"] = sum(c["positives"] for c in counts.values()) / max(total, 1)
        out_counts["avg_history"] = sum(c["hist"] for c in counts.values()) / max(total, 1)
        manifest = {"schema_version": SCHEMA_VERSION, "dataset": "synthetic",
                    "protocol": {"split": split, "max_history": max_hist, "seed": args.seed,
                                 "scale": s, "label_rule": "drop rating 3; label = rating > 3"},
                    "counts": out_counts, "features": [f.to_json() for f in features],
                    "row_group_size": args.row_group_size, "files": files,
                    "source": {"generator": "data_pipes.sources.synthetic", "scale": s}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest_summary(manifest, time.perf_counter() - t0, args.out)
