"""Semantic IDs: collision digits, the parquet contract, refusal of mismatching files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.schema import SEMANTIC_IDS, DatasetError
from genci_dist.tokenizer.semantic_ids import (
    SemanticIdError,
    build_semantic_ids,
    collision_digits,
    collision_stats,
    load_semantic_ids,
    write_semantic_ids,
)


def test_collision_digits_hand_case() -> None:
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 4], [1, 2, 3], [0, 0, 0]])
    assert collision_digits(codes).tolist() == [0, 0, 1, 0, 2, 1]
    s = collision_stats(codes)
    assert s == {"collision_rate": 5 / 6, "largest_collision_group": 3, "n_collision": 3,
                 "unique_ids": 3}


def test_collision_digits_unique_per_full_id_and_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(2000, 3))  # 27 IDs: many collisions
    digits = collision_digits(codes)
    full = {tuple(c) + (d,) for c, d in zip(codes.tolist(), digits.tolist(), strict=True)}
    assert len(full) == 2000
    seen: dict[tuple[int, ...], int] = {}
    for i, c in enumerate(map(tuple, codes.tolist())):
        assert digits[i] == seen.get(c, 0)  # index among earlier items with the same codes
        seen[c] = seen.get(c, 0) + 1
    stats = collision_stats(codes)
    assert stats["largest_collision_group"] == max(seen.values()) == digits.max() + 1


def _manifest(n: int, sha: str = "ab" * 32) -> dict:
    return {"schema_version": 1, "counts": {"items": n},
            "files": {"items.parquet": {"sha256": sha}}}


def _write(tmp_path: Path, n: int = 50, sha: str = "ab" * 32) -> Path:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, size=(n, 3))
    sids = build_semantic_ids(codes, 4, model="m", items_hash=sha, config={"levels": 3},
                              metrics={"collision_rate": 0.5})
    return write_semantic_ids(tmp_path, sids)


def test_round_trip_and_metadata_contract(tmp_path: Path) -> None:
    path = _write(tmp_path)
    table = pq.read_table(path)
    assert table.column_names == ["item_id", "code_0", "code_1", "code_2", "collision"]
    assert all(t == pa.int32() for t in table.schema.types)
    meta = table.schema.metadata
    assert meta[b"levels"] == b"3" and meta[b"codebook_size"] == b"4"
    assert meta[b"n_items"] == b"50" and meta[b"model"] == b"m"
    assert json.loads(meta[b"metrics"]) == {"collision_rate": 0.5}
    sids = load_semantic_ids(tmp_path, expected=_manifest(50))
    assert sids.item_ids.tolist() == list(range(1, 51))
    assert sids.vocab.n_collision == int(meta[b"n_collision"]) == sids.collision.max() + 1
    assert len({tuple(r) for r in sids.full_ids().tolist()}) == 50
    assert sids.config == {"levels": 3}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_refuses_other_item_count(tmp_path: Path) -> None:
    _write(tmp_path, n=50)
    with pytest.raises(SemanticIdError, match="has 50 items but the dataset's manifest has 60"):
        load_semantic_ids(tmp_path, expected=_manifest(60))


def test_refuses_other_items_hash(tmp_path: Path) -> None:
    _write(tmp_path, sha="cd" * 32)
    with pytest.raises(SemanticIdError, match="items changed since tokenizing"):
        load_semantic_ids(tmp_path, expected=_manifest(50, sha="ef" * 32))


def test_refuses_edited_rows(tmp_path: Path) -> None:
    path = _write(tmp_path)
    table = pq.read_table(path)
    codes = table.column("code_2").to_numpy().copy()
    coll = table.column("collision").to_numpy()
    # change an item whose new ID stays collision-consistent: only the hash can tell
    i = int(np.nonzero(coll == 0)[0][-1])
    others = {tuple(r) for r in np.stack([table.column(f"code_{n}").to_numpy()
                                          for n in range(3)], 1).tolist()}
    for v in range(4):
        cand = (int(table.column("code_0")[i].as_py()), int(table.column("code_1")[i].as_py()), v)
        if cand not in others:
            codes[i] = v
            break
    else:
        pytest.fail("no free code")
    edited = table.set_column(3, "code_2", pa.array(codes, pa.int32()))
    pq.write_table(edited, path)
    with pytest.raises(SemanticIdError, match="content_hash .* does not match the rows"):
        load_semantic_ids(tmp_path)


def test_refuses_bad_codes_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SemanticIdError, match="no semantic IDs; run `genci-tokenize"):
        load_semantic_ids(tmp_path)
    path = _write(tmp_path)
    table = pq.read_table(path)
    codes = table.column("code_1").to_numpy().copy()
    codes[7] = 9
    pq.write_table(table.set_column(2, "code_1", pa.array(codes, pa.int32())), path)
    with pytest.raises(SemanticIdError, match=r"row 7 \(item 8\): codes .* outside \[0, 4\)"):
        load_semantic_ids(tmp_path)
    (tmp_path / SEMANTIC_IDS).write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_semantic_ids(tmp_path)


def test_refuses_manifest_without_item_hash(tmp_path: Path) -> None:
    _write(tmp_path)
    with pytest.raises(DatasetError, match="manifest.json: cannot read the item count"):
        load_semantic_ids(tmp_path, expected={"counts": {"items": 50}})
