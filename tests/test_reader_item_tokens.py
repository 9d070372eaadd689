"""The reader's semantic-ID token table: one memory-mapped file per dataset shared by ranks and
workers, equal to the table computed from semantic_ids.parquet, never stale."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_pipes.item_tokens import build_item_tokens, load_item_tokens
from data_pipes.schema import SEMANTIC_IDS
from data_pipes.stream import StreamingSplit
from tests.conftest import write_tiny_dataset


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "ds")


def _hand_table(dataset: Path) -> np.ndarray:
    """Token = 1 + level * K + code; collision digit d -> 1 + N * K + d (schema.TokenVocab)."""
    import pyarrow.parquet as pq

    t = pq.read_table(dataset / SEMANTIC_IDS)
    n, k = int(t.schema.metadata[b"levels"]), int(t.schema.metadata[b"codebook_size"])
    items = t.column("item_id").to_numpy()
    out = np.zeros((items.max() + 1, n + 1), dtype=np.int64)
    for level in range(n):
        out[items, level] = 1 + level * k + t.column(f"code_{level}").to_numpy()
    out[items, n] = 1 + n * k + t.column("collision").to_numpy()
    return out


def test_mapped_table_equals_the_parquet_and_is_reused(dataset: Path) -> None:
    tokens, vocab = load_item_tokens(dataset)
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    np.testing.assert_array_equal(tokens, _hand_table(dataset))
    np.testing.assert_array_equal(tokens, build_item_tokens(dataset / SEMANTIC_IDS)[0])
    (cache,) = dataset.glob("item_tokens-*.npy")
    stamp = cache.stat().st_mtime_ns
    again, vocab2 = load_item_tokens(dataset)
    assert vocab2 == vocab and cache.stat().st_mtime_ns == stamp   # mapped, not rewritten
    assert not list(dataset.glob(".item_tokens*"))                  # no temp file left
    in_memory, _ = load_item_tokens(dataset, mmap=False)
    assert not isinstance(in_memory, np.memmap)
    np.testing.assert_array_equal(in_memory, tokens)


def test_a_retokenised_dataset_never_reads_the_old_table(dataset: Path) -> None:
    old, _ = load_item_tokens(dataset)
    (old_file,) = dataset.glob("item_tokens-*.npy")
    old_copy = np.array(old)
    del old
    from genci_dist.tokenizer.semantic_ids import build_semantic_ids, write_semantic_ids

    manifest = json.loads((dataset / "manifest.json").read_text())
    codes = np.random.default_rng(7).integers(0, 4, size=(40, 2))
    write_semantic_ids(dataset, build_semantic_ids(
        codes, 4, model="test", items_hash=manifest["files"]["items.parquet"]["sha256"]))
    new, _ = load_item_tokens(dataset)
    np.testing.assert_array_equal(new, _hand_table(dataset))
    assert not np.array_equal(new, old_copy)
    (new_file,) = dataset.glob("item_tokens-*.npy")    # the stale table is gone
    assert new_file != old_file


def test_unwritable_folder_falls_back_to_memory(dataset: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(np, "save", refuse)
    tokens, _ = load_item_tokens(dataset)
    assert not isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, _hand_table(dataset))
    assert not list(dataset.glob("*item_tokens*"))


def test_a_pickled_reader_maps_the_file_instead_of_carrying_the_table(dataset: Path) -> None:
    ds = StreamingSplit(dataset, "train", batch_size=8, rank=0, world_size=1, seed=0,
                        shuffle=True)
    assert isinstance(ds.item_tokens, np.memmap)
    blob = pickle.dumps(ds)
    assert ds.item_tokens.tobytes() not in blob      # the table's bytes are not shipped
    worker_copy = pickle.loads(blob)
    assert isinstance(worker_copy.item_tokens, np.memmap)
    assert Path(worker_copy.item_tokens.filename) == Path(ds.item_tokens.filename)
    a, b = next(iter(ds)), next(iter(worker_copy))
    assert a.history_tokens.tolist() == b.history_tokens.tolist()
    assert a.target_tokens.tolist() == b.target_tokens.tolist()
