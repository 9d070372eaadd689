"""The streaming reader: exactly-once across ranks/workers, equal step counts, deterministic
order, mid-epoch resume, and the Batch layout on a hand-built case. (That the samples it
yields are the protocol's, histories included: tests/test_reader_sequences.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipes.collate import build_batch
from data_pipes.schema import DatasetError, FeatureSpec, TokenVocab
from data_pipes.stream import batch_sizes, build_loader, steps_per_epoch
from tests.conftest import write_tiny_dataset


def _split_rows(ds: Path, split: str) -> int:
    return json.loads((ds / "manifest.json").read_text())["counts"][split]["rows"]


def _epoch(ds: Path, split: str, ws: int, nw: int, bs: int = 7, epoch: int = 0,
           seed: int = 1, shuffle: bool = True, bucket: int = 0) -> list[list[np.ndarray]]:
    """Row ids of each rank's batches (shuffle blocks of 4 of the tiny train split's 15 row
    groups: several blocks, the last one short)."""
    out = []
    for r in range(ws):
        loader = build_loader(ds, split, batch_size=bs, rank=r, world_size=ws, num_workers=nw,
                              seed=seed, shuffle=shuffle, bucket_window=bucket,
                              shuffle_block=4)
        loader.dataset.set_epoch(epoch)
        out.append([b.row_ids.numpy() for b in loader])
    return out


@pytest.mark.parametrize("ws", [1, 2, 3])
@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("bucket", [0, 3])
def test_every_sample_exactly_once_and_equal_steps(tiny_dataset: Path, ws: int, nw: int,
                                                   bucket: int) -> None:
    for split in ("train", "test"):
        per_rank = _epoch(tiny_dataset, split, ws, nw, bucket=bucket)
        assert len({len(r) for r in per_rank}) == 1, "ranks must run the same number of steps"
        assert all(len(b) > 0 for r in per_rank for b in r)
        rows = np.concatenate([b for r in per_rank for b in r])
        assert sorted(rows.tolist()) == list(range(_split_rows(tiny_dataset, split)))


def test_order_independent_of_workers_and_seeded(tiny_dataset: Path) -> None:
    a = _epoch(tiny_dataset, "train", 2, 0)
    b = _epoch(tiny_dataset, "train", 2, 2)
    assert all((x == y).all() for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))
    again = _epoch(tiny_dataset, "train", 2, 0)
    assert all((x == y).all() for ra, rb in zip(a, again, strict=True)
               for x, y in zip(ra, rb, strict=True))
    other = np.concatenate(_epoch(tiny_dataset, "train", 1, 0, epoch=1)[0])
    first = np.concatenate(_epoch(tiny_dataset, "train", 1, 0, epoch=0)[0])
    assert not (other == first).all(), "a new epoch must reshuffle"
    unshuffled = np.concatenate(_epoch(tiny_dataset, "valid", 1, 0, shuffle=False)[0])
    assert unshuffled.tolist() == sorted(unshuffled.tolist())


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("bucket", [0, 4])
def test_resume_mid_epoch_yields_exactly_the_rest(tiny_dataset: Path, nw: int,
                                                  bucket: int) -> None:
    kw = dict(batch_size=5, rank=1, world_size=2, num_workers=nw, seed=4, shuffle=True,
              bucket_window=bucket, shuffle_block=4)
    full = build_loader(tiny_dataset, "train", **kw)
    full.dataset.set_epoch(2)
    expected = [b.row_ids for b in full]
    loader = build_loader(tiny_dataset, "train", **kw)
    loader.dataset.set_epoch(2)
    it = iter(loader)
    head = [next(it).row_ids for _ in range(3)]
    state = loader.state_dict()
    fresh = build_loader(tiny_dataset, "train", **kw)
    fresh.dataset.set_epoch(2)
    fresh.load_state_dict(state)
    rest = [b.row_ids for b in fresh]
    got = head + rest
    assert len(got) == len(expected)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


def _batch_tensors(b) -> list[torch.Tensor]:  # noqa: ANN001
    return [b.row_ids, b.labels, b.user_ids, b.item_ids, b.history, b.history_lengths,
            b.history_tokens, b.target_tokens, b.sparse_features.values(),
            b.sparse_features.lengths(), b.sequence_features.values(),
            b.sequence_features.lengths()]


@pytest.mark.parametrize(("ws", "nw", "bucket"), [(1, 0, 0), (2, 0, 3), (3, 2, 0), (2, 2, 4)])
def test_read_ahead_gives_the_same_batches(tiny_dataset: Path, ws: int, nw: int,
                                           bucket: int) -> None:
    """Reading the next row group on a second thread changes when a group is decoded, never
    what a batch holds: every tensor of every batch of every rank is equal with and without
    it, also after a mid-epoch resume."""
    kw = dict(batch_size=7, world_size=ws, num_workers=nw, seed=5, shuffle=True,
              bucket_window=bucket, shuffle_block=3)
    for r in range(ws):
        plain = build_loader(tiny_dataset, "train", rank=r, read_ahead=False, **kw)
        ahead = build_loader(tiny_dataset, "train", rank=r, read_ahead=True, **kw)
        for loader in (plain, ahead):
            loader.dataset.set_epoch(1)
        want = [_batch_tensors(b) for b in plain]
        it = iter(ahead)
        head = [_batch_tensors(next(it)) for _ in range(2)]
        resumed = build_loader(tiny_dataset, "train", rank=r, read_ahead=True, **kw)
        resumed.dataset.set_epoch(1)
        resumed.load_state_dict(ahead.state_dict())
        got = head + [_batch_tensors(b) for b in resumed]
        assert len(got) == len(want) > 2
        for g, w in zip(got, want, strict=True):
            assert all(x.dtype == y.dtype and torch.equal(x, y)
                       for x, y in zip(g, w, strict=True))


def test_read_ahead_thread_ends_with_its_iterator(tiny_dataset: Path) -> None:
    """An iterator dropped mid-epoch (a run stopping early) shuts its thread down."""
    import gc
    import threading
    import time

    def alive() -> int:
        return sum(t.name.startswith("reader-read-ahead") for t in threading.enumerate())

    before = alive()
    it = iter(build_loader(tiny_dataset, "train", batch_size=5, seed=1, read_ahead=True))
    next(it)
    assert alive() == before + 1
    del it
    gc.collect()
    deadline = time.monotonic() + 5
    while alive() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive() == before
    list(build_loader(tiny_dataset, "train", batch_size=5, seed=1, read_ahead=True))
    deadline = time.monotonic() + 5
    while alive() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive() == before


def test_length_bucketing_pads_less_and_keeps_the_epoch(tiny_dataset: Path) -> None:
    """Within each window of W batches the samples are sorted by history length: the summed
    padded width (what the encoder pays for) drops, the epoch's sample set and the batch
    sizes are those of the unbucketed epoch, and a window's batches each hold a contiguous
    run of the length-sorted window."""
    def run(bucket: int) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
        loader = build_loader(tiny_dataset, "train", batch_size=6, seed=3, shuffle=True,
                              bucket_window=bucket)
        loader.dataset.set_epoch(1)
        batches = list(loader)
        return ([b.row_ids.numpy() for b in batches], [b.history.shape[1] for b in batches],
                [b.history_lengths.numpy() for b in batches])
    rows0, width0, _ = run(0)
    rows, width, lens = run(4)
    assert [len(r) for r in rows] == [len(r) for r in rows0]
    assert sorted(np.concatenate(rows).tolist()) == sorted(np.concatenate(rows0).tolist())
    assert sum(width) < sum(width0)
    for w in range(0, len(rows), 4):  # within a window, length ranges do not interleave
        spans = sorted((int(x.min()), int(x.max())) for x in lens[w:w + 4])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    rows_again, _, _ = run(4)
    assert all((a == b).all() for a, b in zip(rows, rows_again, strict=True))
    # without the history's item ids (a GenCI batch) the bucketed batches are the same
    # samples with the same tokens, and carry no ids
    full = build_loader(tiny_dataset, "train", batch_size=6, seed=3, bucket_window=4)
    slim = build_loader(tiny_dataset, "train", batch_size=6, seed=3, bucket_window=4,
                        with_history_ids=False)
    for a, b in zip(full, slim, strict=True):
        assert torch.equal(a.history_tokens, b.history_tokens)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.row_ids, b.row_ids) and torch.equal(a.labels, b.labels)
        assert a.history.shape[1] > 0 and b.history.shape == (b.size, 0)


@pytest.mark.parametrize("read_ahead", [False, True])
@pytest.mark.parametrize("bucket", [0, 4, 50])
def test_each_row_group_is_read_and_decoded_once_per_epoch(tiny_dataset: Path, bucket: int,
                                                           read_ahead: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of a bucketing window come in random order and span several row groups: a
    group may only be dropped from the worker's cache once no later batch needs it."""
    import data_pipes.stream as stream

    decoded: list[str] = []
    real = stream.decode_block

    def counting(table, split, name, expected, mh, features, tables, where, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        decoded.extend(where(None).split("; "))    # a block names each of its groups
        return real(table, split, name, expected, mh, features, tables, where, *a, **k)

    monkeypatch.setattr(stream, "decode_block", counting)
    loader = build_loader(tiny_dataset, "train", batch_size=5, seed=2, shuffle=True,
                          bucket_window=bucket, read_ahead=read_ahead, shuffle_block=2)
    rows = np.concatenate([b.row_ids.numpy() for b in loader])
    assert sorted(rows.tolist()) == list(range(_split_rows(tiny_dataset, "train")))
    assert len(decoded) == len(set(decoded)) == len(loader.dataset.groups)


def test_workers_do_not_inherit_the_trainers_process(tiny_dataset: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers come from a fork server, not from forking the (trainer) process: a forked
    worker keeps a private copy of every heap page the trainer writes afterwards, i.e. the
    trainer's whole peak heap. Proof: state changed in this process after import (a broken
    batch builder) is not seen by the workers, which still build correct batches."""
    import data_pipes.stream as stream

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a worker ran the parent's patched module: it was forked")

    monkeypatch.setattr(stream, "assemble_batch", broken)
    loader = build_loader(tiny_dataset, "train", batch_size=5, num_workers=2, seed=2)
    rows = np.concatenate([b.row_ids.numpy() for b in loader])
    assert sorted(rows.tolist()) == list(range(_split_rows(tiny_dataset, "train")))
    with pytest.raises(AssertionError, match="patched"):  # in-process: the patch is live
        next(iter(build_loader(tiny_dataset, "train", batch_size=5, num_workers=0, seed=2)))


def test_workers_apply_keep_freed_memory_when_asked(tiny_dataset: Path) -> None:
    """build_loader(keep_freed_memory=True) has each worker process apply the trainer's malloc
    policy at start (a fork-server worker does not inherit it); the batches are unchanged."""
    import data_pipes.stream as stream

    kept = build_loader(tiny_dataset, "train", batch_size=5, num_workers=1, seed=2,
                        keep_freed_memory=True)
    assert kept.worker_init_fn.func is stream._init_worker
    assert kept.worker_init_fn.args == (True,)
    plain = build_loader(tiny_dataset, "train", batch_size=5, num_workers=1, seed=2)
    assert plain.worker_init_fn.args == (False,)  # workers still silence known warnings
    assert [b.row_ids.tolist() for b in kept] == [b.row_ids.tolist() for b in plain]
    assert build_loader(tiny_dataset, "train", batch_size=5, num_workers=0,
                        keep_freed_memory=True).worker_init_fn is None  # no workers


def test_batch_sizes_never_leave_an_empty_tail() -> None:
    assert batch_sizes(10, 3, 4) == [4, 4, 2]
    assert batch_sizes(8, 3, 4) == [4, 3, 1]       # 8 = 2 full batches but 3 steps required
    with pytest.raises(DatasetError, match="fewer ranks"):
        batch_sizes(2, 3, 4)


def test_batch_layout_on_a_hand_built_case() -> None:
    features = [FeatureSpec("user_id", "user", False, 10), FeatureSpec("item_id", "item", False, 6),
                FeatureSpec("genres", "item", True, 4)]
    table = pa.table({
        "user_id": pa.array([3, 7], pa.int32()), "item_id": pa.array([5, 2], pa.int32()),
        "label": pa.array([1, 0], pa.int8()), "timestamp": pa.array([1, 2], pa.int64()),
        "history": pa.array([[1, 2, 4], []], pa.list_(pa.int32())),
        "genres": pa.array([[1, 0, 3], [2]], pa.list_(pa.int32())),
    })
    vocab = TokenVocab(levels=2, codebook_size=3, n_collision=2)
    tokens = np.zeros((6, 3), dtype=np.int64)
    for item in range(1, 6):  # codes (item % 3, (item + 1) % 3), collision item % 2
        codes = [item % 3, (item + 1) % 3, item % 2]
        tokens[item] = [c + o for c, o in zip(codes, vocab.offsets(), strict=True)]
    b = build_batch(table, features, np.array([10, 11]), tokens, "case")
    assert b.sparse_features.keys() == ["user_id", "item_id", "genres"]
    assert b.sparse_features.lengths().tolist() == [1, 1, 1, 1, 2, 1]  # genre pad 0 dropped
    assert b.sparse_features.values().tolist() == [3, 7, 5, 2, 1, 3, 2]
    assert b.sequence_features.keys() == ["history_item_id"]
    assert b.sequence_features.lengths().tolist() == [3, 0]
    assert b.history.tolist() == [[1, 2, 4], [0, 0, 0]]
    assert b.history_lengths.tolist() == [3, 0]
    # item 1: codes (1, 2, 1) → tokens (1+1, 4+2, 7+1); item 5: (2, 0, 1) → (3, 4, 8)
    assert b.history_tokens.shape == (2, 9)
    assert b.history_tokens[0, :3].tolist() == [2, 6, 8]
    assert b.history_tokens[1].tolist() == [0] * 9
    assert b.target_tokens.tolist() == [[3, 4, 8], [3, 4, 7]]  # item 2: codes (2, 0, 0)
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == [1.0, 0.0]
    assert b.row_ids.tolist() == [10, 11]
    padded = build_batch(table, features, np.array([0, 1]), tokens, "case", pad_history_to=5)
    assert padded.history.shape == (2, 5)
    short = build_batch(table, features, np.array([0, 1]), tokens, "case", max_history=2)
    assert short.history.tolist() == [[2, 4], [0, 0]]        # the most recent two, in order
    assert short.sequence_features.values().tolist() == [2, 4]
    assert short.history_tokens[0, :3].tolist() == tokens[2].tolist()


def _set_list(t: pa.Table, name: str, row: int, pos: int, value: int) -> pa.Table:
    """`t` with position `pos` of list column `name` in row `row` set to `value`."""
    col = t.column(name).combine_chunks()
    vals = col.values.to_numpy(zero_copy_only=False).copy()
    vals[col.offsets[row].as_py() + pos] = value
    new = pa.ListArray.from_arrays(col.offsets, pa.array(vals, col.type.value_type))
    return t.set_column(t.column_names.index(name), name, new)


@pytest.mark.parametrize("read_ahead", [False, True])
def test_bad_rows_name_file_and_field(tmp_path: Path, read_ahead: bool) -> None:
    """With read-ahead the bad group is decoded on the reader's thread: the same error, raised
    where the batch needs that group. (The tiny shards: 2 row groups of 2 users each.)"""
    ds = write_tiny_dataset(tmp_path / "bad", semantic_ids=False)
    shard = sorted((ds / "sequences").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    assert pq.ParquetFile(shard).metadata.num_row_groups == 2 and t.num_rows == 4

    def load(**kw) -> list:  # noqa: ANN003
        return build_loader(ds, "train", shuffle=False, with_tokens=False,
                            read_ahead=read_ahead, check_files=False, **kw)

    pq.write_table(_set_list(t, "items", 1, 3, 999), shard, row_group_size=2)
    with pytest.raises(DatasetError, match=r"part-00000.*row group 0, row 1\).*'items' has id 999"):
        list(load(batch_size=1000))
    # batches of 5 samples, a bad id in the first row of group 1 (train samples 18-35): the
    # three batches before the first one that needs group 1 (samples 15-19) still come out,
    # although with read-ahead that group was read (and failed) earlier, on the other thread
    pq.write_table(_set_list(t, "items", 2, 0, 999), shard, row_group_size=2)
    it = iter(load(batch_size=5, shuffle_block=1))
    assert [next(it).row_ids.tolist() for _ in range(3)][-1] == [10, 11, 12, 13, 14]
    with pytest.raises(DatasetError, match=r"part-00000.*row group 1, row 0\).*'items' has id 999"):
        next(it)
    pq.write_table(_set_list(t, "labels", 0, 0, 2), shard, row_group_size=2)
    with pytest.raises(DatasetError, match=r"row group 0, row 0\).*'labels' has 2 at position 0"):
        list(load(batch_size=1000))
    pq.write_table(_set_list(t, "splits", 3, 2, 3), shard, row_group_size=2)
    with pytest.raises(DatasetError, match=r"row group 1, row 1\).*'splits' has 3 at position 2"):
        list(load(batch_size=1000))
    short = pa.array([[1] * (len(x) - (k == 1)) for k, x in
                      enumerate(t.column("labels").to_pylist())], pa.list_(pa.int8()))
    pq.write_table(t.set_column(t.column_names.index("labels"), "labels", short), shard,
                   row_group_size=2)
    with pytest.raises(DatasetError, match=r"row group 0, row 1\).*'labels' has 11 values, "
                                           r"'items' has 12"):
        list(load(batch_size=1000))
    shard.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="part-00000.parquet: row group 0 unreadable"):
        list(load(batch_size=10))


@pytest.mark.parametrize("nw", [0, 2])
def test_drop_last_gives_full_batches_and_steps_per_epoch_matches(tiny_dataset: Path,
                                                                  nw: int) -> None:
    n = _split_rows(tiny_dataset, "train")
    for drop_last in (False, True):
        steps = steps_per_epoch(tiny_dataset, "train", batch_size=7, world_size=2,
                                drop_last=drop_last)
        assert steps == ((n // 2) // 7 if drop_last else math.ceil(math.ceil(n / 2) / 7))
        rows = []
        for r in range(2):
            loader = build_loader(tiny_dataset, "train", batch_size=7, rank=r, world_size=2,
                                  num_workers=nw, seed=3, drop_last=drop_last)
            got = [b.row_ids.tolist() for b in loader]
            assert len(got) == steps
            if drop_last:
                assert [len(b) for b in got] == [7] * steps
            rows += [x for b in got for x in b]
        assert len(rows) == len(set(rows)) == (2 * 7 * steps if drop_last else n)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    ds = write_tiny_dataset(tmp_path / "nogender", semantic_ids=False)
    shard = sorted((ds / "sequences").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    pq.write_table(t.drop_columns(["gender"]), shard, row_group_size=2)
    with pytest.raises(DatasetError, match=r"sequences/part-00000\.parquet.*missing "
                                           r"column.*gender"):
        list(build_loader(ds, "valid", batch_size=8, shuffle=False, with_tokens=False,
                          check_files=False))
    items = ds / "items.parquet"
    pq.write_table(pq.read_table(items).drop_columns(["genres"]), items)
    with pytest.raises(DatasetError, match=r"items\.parquet: cannot read the item features"):
        build_loader(ds, "valid", batch_size=8, shuffle=False, with_tokens=False,
                     check_files=False)
