"""Semantic IDs: N codes + a collision digit per item, stored as semantic_ids.parquet.

File layout (one row per item, sorted): ``item_id`` int32 (1..n_items), ``code_0`` ..
``code_{N-1}`` int32 in [0, K), ``collision`` int32 >= 0 (the item's index, by item id, among
the items sharing its N codes). Schema metadata (bytes → bytes, ints as ASCII):
``levels``, ``codebook_size``, ``n_collision`` (max collision + 1), ``n_items``, ``model``,
``tokenizer_config`` (JSON), ``content_hash`` (see `content_hash`), ``items_hash`` (the
manifest's sha256 of items.parquet), ``metrics`` (JSON quality report).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.schema import ITEM, ITEMS, SEMANTIC_IDS, DatasetError, TokenVocab

COLLISION = "collision"


class SemanticIdError(DatasetError):
    """semantic_ids.parquet is malformed or does not belong to this dataset."""


def code_column(level: int) -> str:
    return f"code_{level}"


def collision_digits(codes: np.ndarray) -> np.ndarray:
    """codes [M, N] (row i = item i+1) → int32 [M]: for each item, how many lower-numbered
    items share all N codes with it. Vectorised: one stable lexsort."""
    m = codes.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int32)
    order = np.lexsort(codes.T[::-1])  # by code_0, then code_1, ...; stable → item order kept
    sorted_codes = codes[order]
    new_group = np.ones(m, dtype=bool)
    new_group[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(m), 0))
    digits = np.empty(m, dtype=np.int32)
    digits[order] = (np.arange(m) - group_start).astype(np.int32)
    return digits


def collision_stats(codes: np.ndarray) -> dict[str, float | int]:
    """collision_rate: share of items whose N codes are shared with another item;
    largest_collision_group: most items on one N-code ID; n_collision = max digit + 1."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_item = counts[inverse.reshape(-1)]
    return {"collision_rate": float((per_item > 1).mean()) if len(codes) else 0.0,
            "largest_collision_group": int(counts.max()) if len(counts) else 0,
            "n_collision": int(counts.max()) if len(counts) else 1,
            "unique_ids": int(len(counts))}


def content_hash(item_ids: np.ndarray, codes: np.ndarray, collision: np.ndarray) -> str:
    """sha256 over item_id, code_0..code_{N-1}, collision as little-endian int32 columns."""
    h = hashlib.sha256()
    for col in (item_ids, *codes.T, collision):
        h.update(np.ascontiguousarray(col, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SemanticIds:
    item_ids: np.ndarray
    """int32 [M], 1..M."""
    codes: np.ndarray
    """int32 [M, N]."""
    collision: np.ndarray
    """int32 [M]."""
    codebook_size: int
    model: str
    content_hash: str
    items_hash: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_collision(self) -> int:
        return int(self.collision.max()) + 1 if self.n_items else 1

    @property
    def vocab(self) -> TokenVocab:
        return TokenVocab(self.levels, self.codebook_size, self.n_collision)

    def full_ids(self) -> np.ndarray:
        """int64 [M, N+1]: the N codes then the collision digit (unique per item)."""
        return np.concatenate([self.codes, self.collision[:, None]], axis=1).astype(np.int64)


def build_semantic_ids(codes: np.ndarray, codebook_size: int, *, model: str, items_hash: str,
                       config: dict[str, Any] | None = None,
                       metrics: dict[str, Any] | None = None) -> SemanticIds:
    """Codes [M, N] of items 1..M → SemanticIds with collision digits and the content hash."""
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    if codes.ndim != 2 or (codes.size and (codes.min() < 0 or codes.max() >= codebook_size)):
        raise ValueError(f"codes must be [M, N] ints in [0, {codebook_size})")
    item_ids = np.arange(1, codes.shape[0] + 1, dtype=np.int32)
    coll = collision_digits(codes)
    return SemanticIds(item_ids, codes, coll, codebook_size, model,
                       content_hash(item_ids, codes, coll), items_hash,
                       dict(config or {}), dict(metrics or {}))


def write_semantic_ids(dataset_dir: str | Path, sids: SemanticIds) -> Path:
    """Writes <dataset_dir>/semantic_ids.parquet atomically (temp file + rename)."""
    path = Path(dataset_dir) / SEMANTIC_IDS
    cols = {ITEM: pa.array(sids.item_ids, pa.int32())}
    for n in range(sids.levels):
        cols[code_column(n)] = pa.array(sids.codes[:, n], pa.int32())
    cols[COLLISION] = pa.array(sids.collision, pa.int32())
    meta = {
        b"levels": str(sids.levels).encode(),
        b"codebook_size": str(sids.codebook_size).encode(),
        b"n_collision": str(sids.n_collision).encode(),
        b"n_items": str(sids.n_items).encode(),
        b"model": sids.model.encode(),
        b"tokenizer_config": json.dumps(sids.config, sort_keys=True).encode(),
        b"content_hash": sids.content_hash.encode(),
        b"items_hash": sids.items_hash.encode(),
        b"metrics": json.dumps(sids.metrics, sort_keys=True).encode(),
    }
    table = pa.table(cols).replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def manifest_items(manifest: dict[str, Any]) -> tuple[int, str]:
    """(n_items, sha256 of items.parquet) as recorded in a prepared dataset's manifest."""
    try:
        counts = manifest["counts"]
        n_items = int(counts["items"] if "items" in counts else counts["n_items"])
        items_hash = str(manifest["files"][ITEMS]["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"manifest.json: cannot read the item count / items.parquet sha256 "
                           f"(missing {e}); expected counts.items and files['{ITEMS}'].sha256") from e
    return n_items, items_hash


def _meta_int(meta: dict[bytes, bytes], key: bytes, path: Path) -> int:
    try:
        return int(meta[key].decode())
    except (KeyError, ValueError) as e:
        raise SemanticIdError(f"{path}: schema metadata {key.decode()!r} missing or not an "
                              "integer; rerun genci-tokenize") from e


def load_semantic_ids(dataset_dir: str | Path,
                      expected: dict[str, Any] | None = None) -> SemanticIds:
    """Reads and validates semantic_ids.parquet. With ``expected`` (the dataset's manifest),
    refuses a file made for other items (item count or items.parquet hash differ)."""
    path = Path(dataset_dir) / SEMANTIC_IDS
    hint = f"run `genci-tokenize --data {dataset_dir}` to (re)build it"
    if not path.is_file():
        raise SemanticIdError(f"{path}: no semantic IDs; {hint}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise SemanticIdError(f"{path}: not a readable Parquet file ({e}); {hint}") from e
    meta = table.schema.metadata or {}
    levels = _meta_int(meta, b"levels", path)
    k = _meta_int(meta, b"codebook_size", path)
    n_items_meta = _meta_int(meta, b"n_items", path)
    names = [ITEM, *(code_column(n) for n in range(levels)), COLLISION]
    for name in names:
        if name not in table.column_names:
            raise SemanticIdError(f"{path}: column {name!r} missing (levels = {levels}); {hint}")
        if table.schema.field(name).type != pa.int32():
            raise SemanticIdError(f"{path}: column {name!r} is {table.schema.field(name).type}, "
                                  "expected int32")
    if table.column(ITEM).null_count or any(table.column(c).null_count for c in names):
        raise SemanticIdError(f"{path}: null values in the ID columns")
    item_ids = table.column(ITEM).to_numpy()
    codes = np.stack([table.column(code_column(n)).to_numpy() for n in range(levels)], 1)
    coll = table.column(COLLISION).to_numpy()
    m = len(item_ids)
    bad = np.nonzero(item_ids != np.arange(1, m + 1))[0]
    if len(bad):
        raise SemanticIdError(f"{path}: row {bad[0]}: item_id {item_ids[bad[0]]}, expected "
                              f"{bad[0] + 1} (one sorted row per item 1..n)")
    if m != n_items_meta:
        raise SemanticIdError(f"{path}: {m} rows but metadata n_items = {n_items_meta}")
    bad_rows = np.nonzero(((codes < 0) | (codes >= k)).any(1))[0]
    if len(bad_rows):
        r = bad_rows[0]
        raise SemanticIdError(f"{path}: row {r} (item {r + 1}): codes {codes[r].tolist()} "
                              f"outside [0, {k})")
    if not np.array_equal(coll, collision_digits(codes)):
        r = int(np.nonzero(coll != collision_digits(codes))[0][0])
        raise SemanticIdError(f"{path}: row {r} (item {r + 1}): collision digit {coll[r]} is "
                              "not the item's index among items sharing its codes")
    stored = meta.get(b"content_hash", b"").decode()
    actual = content_hash(item_ids, codes, coll)
    if stored != actual:
        raise SemanticIdError(f"{path}: content_hash in metadata ({stored[:12] or 'none'}) does "
                              f"not match the rows ({actual[:12]}); file altered? {hint}")
    items_hash = meta.get(b"items_hash", b"").decode()
    if expected is not None:
        n_expected, hash_expected = manifest_items(expected)
        if m != n_expected:
            raise SemanticIdError(f"{path}: has {m} items but the dataset's manifest has "
                                  f"{n_expected}; the IDs belong to another dataset; {hint}")
        if items_hash != hash_expected:
            raise SemanticIdError(
                f"{path}: built from items.parquet sha256 {items_hash[:12] or 'unknown'}…, but "
                f"the manifest's items.parquet is {hash_expected[:12]}…; the items changed "
                f"since tokenizing; {hint}")
    try:
        config = json.loads(meta.get(b"tokenizer_config", b"{}"))
        metrics = json.loads(meta.get(b"metrics", b"{}"))
    except json.JSONDecodeError as e:
        raise SemanticIdError(f"{path}: metadata JSON unreadable ({e})") from e
    return SemanticIds(item_ids.astype(np.int32), codes.astype(np.int32), coll.astype(np.int32),
                       k, meta.get(b"model", b"").decode(), actual, items_hash, config, metrics)
