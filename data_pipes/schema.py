"""The prepared-dataset layout (SPEC §2): the one contract between the dataset sources, the
item tokenizer and the streaming reader.

A prepared dataset is a folder::

    manifest.json          schema version, protocol, counts, feature cardinalities, file hashes
    items.parquet          item_id (int32, 1..n_items; 0 = padding), raw_id (str), text (str),
                           one column per item-side feature (int32, or list<int32> if multi)
    users.parquet          user_id (int32, 1..n_users), raw_id (str), one column per user feature
    sequences/             part-00000.parquet ...: one row per user sequence (users in a seeded
                           random order), row groups of about row_group_size interactions
    semantic_ids.parquet   written by the tokenizer: item_id, code_0..code_{N-1}, collision
    cohorts.npz            written by the tokenizer: CSR cohort index
    item_tokens-<hash>.npy derived by the reader from semantic_ids.parquet, memory-mapped

Sequence shard columns: ``user_id`` (int32), one column per user-side feature (int32, or
list<int32> if multi), and per position of the user's sequence, in protocol order (timestamp,
item id): ``items`` (list<int32>), ``labels`` (list<int8>, 0/1), ``timestamps`` (list<int64>,
seconds), ``splits`` (list<int8>: 0 train, 1 valid, 2 test). Every position is a sample of its
split; its history (the user's earlier positives, the most recent ``max_history``, oldest
first) and its item-side features (items.parquet) are cut at read time
(data_pipes/sequences.py), so the layout is O(interactions). The manifest lists, per sequence
shard, each row group's sample count per split (``groups``: [[train, valid, test], ...]), so
an epoch is planned from the manifest alone.

Every sparse id is dense: 0 means padding/unknown and real values are 1..cardinality-1, so a
feature's embedding table has exactly ``cardinality`` rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
SEMANTIC_IDS = "semantic_ids.parquet"
COHORTS = "cohorts.npz"
# The reader's memory-mapped token table, derived from SEMANTIC_IDS (data_pipes.collate)
ITEM_TOKENS_STEM = "item_tokens"
SPLITS = ("train", "valid", "test")
SEQUENCES = "sequences"

USER = "user_id"
ITEM = "item_id"
LABEL = "label"
TIMESTAMP = "timestamp"
HISTORY = "history"
RAW_ID = "raw_id"
# sequence shard columns
SEQ_ITEMS = "items"
LABELS = "labels"
TIMESTAMPS = "timestamps"
SEQ_SPLITS = "splits"
TEXT = "text"

# Sequence feature key used for the history in Batch.sequence_features (EmbeddingCollection).
HISTORY_FEATURE = "history_item_id"


class DatasetError(ValueError):
    """Bad input at the data layer; the message names the file and the row or field."""


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse feature: its column name, side ("user" or "item"), whether it is multi-valued
    (a list column pooled into one bag) and its cardinality (embedding rows, padding included)."""

    name: str
    side: str
    multi: bool
    cardinality: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "side": self.side, "multi": self.multi,
                "cardinality": self.cardinality}


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; is {dataset_dir} a prepared dataset?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("schema_version") == 1:
        raise DatasetError(f"{path}: schema_version 1 (one row per sample, histories stored) "
                           f"is no longer read; this code reads the compact layout of version "
                           f"{SCHEMA_VERSION} (one row per user sequence): re-run "
                           f"`genci-prepare ... --out {dataset_dir} --force`")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema_version {manifest.get('schema_version')!r}, "
                           f"this code reads {SCHEMA_VERSION}")
    return manifest


def manifest_summary(manifest: dict[str, Any], seconds: float, out: str) -> dict[str, Any]:
    """The JSON summary `genci-prepare` prints for a written dataset (any source)."""
    c = manifest["counts"]
    return {"dataset": manifest["dataset"], "out": str(out), "samples": c["samples"],
            "users": c["users"], "items": c["items"],
            "splits": {s: c[s] for s in ("train", "valid", "test")},
            "positive_rate": round(c["positive_rate"], 4),
            "avg_history": round(c["avg_history"], 3),
            "features": {f["name"]: f["cardinality"] for f in manifest["features"]},
            "seconds": round(seconds, 2)}


def feature_specs(manifest: dict[str, Any]) -> list[FeatureSpec]:
    """The sparse features in manifest order (the KeyedJaggedTensor key order)."""
    return [FeatureSpec(f["name"], f["side"], bool(f["multi"]), int(f["cardinality"]))
            for f in manifest["features"]]


# ---- semantic-ID token vocabulary (shared by the reader's collate and the generator) --------
# token 0 = padding (also T5's decoder start); level n < N code c -> 1 + n*K + c;
# collision digit d -> 1 + N*K + d.


@dataclass(frozen=True)
class TokenVocab:
    levels: int          # N
    codebook_size: int   # K
    n_collision: int     # max collision digit + 1 (>= 1)

    @property
    def tokens_per_item(self) -> int:
        return self.levels + 1

    @property
    def size(self) -> int:
        return 1 + self.levels * self.codebook_size + self.n_collision

    def offsets(self) -> list[int]:
        """Per-position token offsets: token = offset[position] + code."""
        return [1 + n * self.codebook_size for n in range(self.levels + 1)]
