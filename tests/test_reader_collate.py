"""The vectorised collate (decode a row group once, gather batches out of it) against a plain
per-row reference of the Batch contract, on random rows with every awkward case: missing
scalar ids, padding ids and empty bags in multi-valued features, empty and truncated
histories, a 0 id inside a history, batches gathered from several row groups, fixed padding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipes.collate import decode_rows, gather_batch
from data_pipes.schema import DatasetError, FeatureSpec

FEATURES = [FeatureSpec("user_id", "user", False, 50), FeatureSpec("gender", "user", False, 3),
            FeatureSpec("tags", "user", True, 7), FeatureSpec("item_id", "item", False, 30),
            FeatureSpec("year", "item", False, 5), FeatureSpec("genres", "item", True, 6)]


def _table(rng: np.random.Generator, n: int, missing: bool = True) -> pa.Table:
    def bags(card: int) -> pa.Array:
        return pa.array([rng.integers(0, card, rng.integers(0, 4)).tolist() for _ in range(n)],
                        pa.list_(pa.int32()))
    hist = [rng.integers(1, 30, rng.integers(0, 9)).tolist() for _ in range(n)]
    if n > 3:
        hist[3] = [5, 0, 7]               # a stored 0 id is kept as an item, not as padding
    low = 0 if missing else 1
    return pa.table({
        "user_id": pa.array(rng.integers(1, 50, n), pa.int32()),
        "item_id": pa.array(rng.integers(1, 30, n), pa.int32()),
        "label": pa.array(rng.integers(0, 2, n), pa.int8()),
        "timestamp": pa.array(np.arange(n), pa.int64()),
        "history": pa.array(hist, pa.list_(pa.int32())),
        "gender": pa.array(rng.integers(low, 3, n), pa.int32()),
        "tags": bags(7), "year": pa.array(rng.integers(low, 5, n), pa.int32()),
        "genres": bags(6)})


def _expected(table: pa.Table, rows: np.ndarray, tokens: np.ndarray, max_history: int | None,
              pad_to: int | None) -> dict[str, object]:
    """The Batch contract, one row at a time."""
    cols = table.to_pydict()
    hists = [cols["history"][r][-max_history:] if max_history else cols["history"][r]
             for r in rows]
    width = pad_to or max(max((len(h) for h in hists), default=0), 1)
    t = tokens.shape[1]
    out: dict[str, object] = {"keys": [f.name for f in FEATURES], "lengths": [], "values": []}
    for f in FEATURES:
        for r in rows:
            ids = cols[f.name][r] if f.multi else [cols[f.name][r]]
            ids = [i for i in ids if i != 0]               # 0 = padding / missing
            out["lengths"].append(len(ids))
            out["values"] += ids
    out["history"] = [h + [0] * (width - len(h)) for h in hists]
    out["history_lengths"] = [len(h) for h in hists]
    out["seq_values"] = [i for h in hists for i in h]
    out["history_tokens"] = [[int(x) for i in h for x in tokens[i]] for h in out["history"]]
    out["target_tokens"] = [tokens[cols["item_id"][r]].tolist() for r in rows]
    out["labels"] = [float(cols["label"][r]) for r in rows]
    out["user_ids"] = [cols["user_id"][r] for r in rows]
    out["item_ids"] = [cols["item_id"][r] for r in rows]
    assert len(out["history_tokens"][0]) == width * t
    return out


def _check(batch, want: dict[str, object], row_ids: np.ndarray,  # noqa: ANN001
           ids: bool = True) -> None:
    sp = batch.sparse_features
    assert sp.keys() == want["keys"]
    assert sp.lengths().tolist() == want["lengths"]
    assert sp.values().tolist() == want["values"]
    ref = KeyedJaggedTensor.from_lengths_sync(keys=sp.keys(), values=sp.values(),
                                              lengths=sp.lengths())
    assert sp.length_per_key() == ref.length_per_key()
    assert sp.offset_per_key() == ref.offset_per_key()
    assert sp.stride() == len(row_ids)
    seq = batch.sequence_features
    if ids:
        assert seq.keys() == ["history_item_id"] and seq.stride() == len(row_ids)
        assert seq.lengths().tolist() == want["history_lengths"]
        assert seq.values().tolist() == want["seq_values"]
        assert seq.length_per_key() == [len(want["seq_values"])]
        assert batch.history.tolist() == want["history"]
    else:   # the history's item ids left out: no key, no columns, nothing else changes
        assert seq.keys() == [] and seq.stride() == len(row_ids) and seq.values().numel() == 0
        assert batch.history.shape == (len(row_ids), 0)
    assert batch.history_lengths.tolist() == want["history_lengths"]
    assert batch.history_tokens.tolist() == want["history_tokens"]
    assert batch.target_tokens.tolist() == want["target_tokens"]
    assert batch.labels.tolist() == want["labels"]
    assert batch.user_ids.tolist() == want["user_ids"]
    assert batch.item_ids.tolist() == want["item_ids"]
    assert batch.row_ids.tolist() == row_ids.tolist()
    for name in ("history", "history_lengths", "user_ids", "item_ids", "row_ids"):
        assert getattr(batch, name).dtype == torch.int64
    assert batch.history_tokens.dtype == batch.target_tokens.dtype == torch.int32
    assert batch.labels.dtype == torch.float32
    assert sp.values().dtype == sp.lengths().dtype == seq.values().dtype == torch.int64
    # one storage for everything: a worker ships a batch through shared memory in one piece
    storages = {t.untyped_storage().data_ptr() for t in (
        sp.values(), sp.lengths(), seq.values(), batch.history, batch.history_tokens,
        batch.target_tokens, batch.labels, batch.user_ids, batch.row_ids)}
    assert len(storages) == 1


@pytest.mark.parametrize("max_history", [None, 3])
@pytest.mark.parametrize("pad_to", [None, 12])
@pytest.mark.parametrize("missing", [True, False])
@pytest.mark.parametrize("ids", [True, False])
def test_gather_matches_the_per_row_contract(max_history: int | None, pad_to: int | None,
                                             missing: bool, ids: bool) -> None:
    rng = np.random.default_rng(7)
    tokens = np.zeros((30, 3), dtype=np.int64)
    tokens[1:] = rng.integers(1, 40, (29, 3))
    tables = [_table(rng, 40, missing), _table(rng, 25, missing)]
    decoded = [decode_rows(t, FEATURES, f"group {g}", max_history, tokens.shape[0])
               for g, t in enumerate(tables)]
    # rows of both groups in an arbitrary order, as length bucketing gathers them
    picks = [rng.permutation(40)[:17], rng.permutation(25)[:9]]
    offsets = [1000, 2000]
    batch = gather_batch(list(zip(decoded, picks, strict=True)),
                         np.concatenate([o + p for o, p in zip(offsets, picks, strict=True)]),
                         FEATURES, tokens, pad_to, with_history_ids=ids)
    want = [_expected(t, p, tokens, max_history, pad_to)
            for t, p in zip(tables, picks, strict=True)]
    width = pad_to or max(max(max(w["history_lengths"]) for w in want), 1)
    merged: dict[str, object] = {"keys": want[0]["keys"], "lengths": [], "values": []}
    for f in range(len(FEATURES)):   # KJT values are key-major across both parts
        for w, p in zip(want, picks, strict=True):
            lens = w["lengths"][f * len(p):(f + 1) * len(p)]
            start = sum(w["lengths"][:f * len(p)])
            merged["lengths"] += lens
            merged["values"] += w["values"][start:start + sum(lens)]
    for key in ("history_lengths", "seq_values", "target_tokens", "labels", "user_ids",
                "item_ids"):
        merged[key] = want[0][key] + want[1][key]
    merged["history"] = [h[:width] + [0] * (width - len(h[:width]))
                         for w in want for h in w["history"]]
    merged["history_tokens"] = [h[:width * 3] + [0] * (width * 3 - len(h[:width * 3]))
                                for w in want for h in w["history_tokens"]]
    _check(batch, merged, np.concatenate([o + p for o, p in zip(offsets, picks, strict=True)]),
           ids)


def test_decode_errors_name_the_row_and_field() -> None:
    rng = np.random.default_rng(1)
    t = _table(rng, 10)
    bad = t.set_column(t.column_names.index("history"), "history",
                       pa.array([[1]] * 6 + [[2, 31]] + [[1]] * 3, pa.list_(pa.int32())))
    with pytest.raises(DatasetError, match=r"g \(batch row 6\): field 'history' has id 31"):
        decode_rows(bad, FEATURES, "g")
    tokens = np.zeros((20, 3), dtype=np.int32)   # items 20..29 have no semantic ID
    items = t.column("item_id").to_numpy().copy()
    items[:] = 1
    items[4] = 25
    bad = t.set_column(t.column_names.index("item_id"), "item_id", pa.array(items, pa.int32()))
    with pytest.raises(DatasetError, match=r"batch row 4\): field 'item_id' has item id 25 "
                                           r"beyond the semantic-ID table"):
        decode_rows(bad, FEATURES, "g", token_rows=tokens.shape[0])
    labels = t.column("label").to_numpy().astype(np.float32)
    labels[2] = np.nan
    bad = t.set_column(t.column_names.index("label"), "label", pa.array(labels))
    with pytest.raises(DatasetError, match=r"batch row 2\): label nan is not 0 or 1"):
        decode_rows(bad, FEATURES, "g")
    rows = decode_rows(t, FEATURES, "g")
    with pytest.raises(DatasetError, match="longer than pad_history_to=1"):
        gather_batch([(rows, np.arange(10))], np.arange(10), FEATURES, None, pad_history_to=1)
    with pytest.raises(ValueError, match="not validated against this semantic-ID table"):
        gather_batch([(rows, np.arange(10))], np.arange(10), FEATURES, tokens)


def test_rows_without_dense_history_give_the_same_fields_batch() -> None:
    """The fields layout (no history ids, no tokens; DeepFM, DCNv2) gathers from rows decoded
    without the dense history matrix: the same Batch, field for field; the history's ids are
    still validated, and a layout that needs them refuses such rows."""
    rng = np.random.default_rng(3)
    tables = [_table(rng, 40), _table(rng, 25)]
    picks = [rng.permutation(40)[:17], rng.permutation(25)[:9]]
    row_ids = np.concatenate([1000 + picks[0], 2000 + picks[1]])
    batches = []
    for dense in (True, False):
        decoded = [decode_rows(t, FEATURES, "g", 3, dense_history=dense) for t in tables]
        assert all((r.hist is None) != dense for r in decoded)
        batches.append(gather_batch(list(zip(decoded, picks, strict=True)), row_ids, FEATURES,
                                    None, with_history_ids=False))
    a, b = batches
    for name in ("history", "history_lengths", "history_tokens", "target_tokens", "labels",
                 "user_ids", "item_ids", "row_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for kjt in ("sparse_features", "sequence_features"):
        x, y = getattr(a, kjt), getattr(b, kjt)
        assert x.keys() == y.keys()
        assert torch.equal(x.lengths(), y.lengths()) and torch.equal(x.values(), y.values())
    assert a.history_lengths.tolist() == [
        min(len(t.column("history")[int(r)].as_py()), 3)
        for t, p in zip(tables, picks, strict=True) for r in p]
    t = tables[0]
    bad = t.set_column(t.column_names.index("history"), "history",
                       pa.array([[1]] * 39 + [[2, 31]], pa.list_(pa.int32())))
    with pytest.raises(DatasetError, match=r"g \(batch row 39\): field 'history' has id 31"):
        decode_rows(bad, FEATURES, "g", dense_history=False)
    light = decode_rows(t, FEATURES, "g", dense_history=False)
    with pytest.raises(ValueError, match="without their dense history"):
        gather_batch([(light, np.arange(5))], np.arange(5), FEATURES, None)
