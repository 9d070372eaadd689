"""The compact layout (data_pipes/sequences.py): what is stored, and that the samples cut at
read time are exactly the protocol's (`protocol.build_samples`: order, labels, splits,
histories) with the right features, through `read_split_samples` and through the streaming
reader for several ranks x workers, shuffle blocks and a resume; plus the refusal of the old
per-sample layout and the bytes per interaction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.protocol import Interactions, Samples, apply_label_rule, build_samples
from data_pipes.schema import DatasetError, load_manifest
from data_pipes.sequences import read_split_samples
from data_pipes.stream import EpochPlan, build_loader, list_row_groups
from data_pipes.writer import SideTable, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _protocol(split: str, max_history: int, seed: int = 3) -> tuple[Samples, SideTable,
                                                                    SideTable]:
    """MovieLens-shaped interactions (ties in time, ratings 1-5 with 3 dropped) → samples."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 25, 30
    lengths = rng.integers(1, 20, n_users)
    user = np.repeat(np.arange(1, n_users + 1), lengths).astype(np.int32)
    item = rng.integers(1, n_items + 1, user.size).astype(np.int32)
    rating = rng.integers(1, 6, user.size).astype(np.float64)
    ts = rng.integers(0, 15, user.size).astype(np.int64)
    kept, label = apply_label_rule(Interactions(user, item, rating, ts))
    samples = build_samples(kept, label, split=split, max_history=max_history,  # type: ignore[arg-type]
                            seed=seed)
    tags_len = rng.integers(0, 3, n_items + 1)
    tags_len[0] = 0
    offsets = np.r_[0, np.cumsum(tags_len)]
    tags = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(rng.integers(0, 5, offsets[-1]), pa.int32()))
    hobby_len = rng.integers(0, 3, n_users + 1)
    hobby_len[0] = 0
    h_off = np.r_[0, np.cumsum(hobby_len)]
    hobbies = pa.ListArray.from_arrays(pa.array(h_off.astype(np.int32)),
                                       pa.array(rng.integers(1, 4, h_off[-1]), pa.int32()))
    users = SideTable(np.arange(1, n_users + 1).astype(str),
                      {"age": np.r_[0, rng.integers(0, 4, n_users)].astype(np.int32)},
                      {"hobbies": hobbies})
    items = SideTable(np.arange(1, n_items + 1).astype(str),
                      {"year": np.r_[0, rng.integers(1, 6, n_items)].astype(np.int32)},
                      {"tags": tags}, [f"item {i}" for i in range(1, n_items + 1)])
    return samples, users, items


def _write(out: Path, split: str = "temporal", max_history: int = 4, row_group_size: int = 20,
           shard_rows: int = 60) -> tuple[Path, Samples, SideTable, SideTable]:
    samples, users, items = _protocol(split, max_history)
    write_dataset(out, dataset="seq", protocol={"split": split, "max_history": max_history},
                  samples=samples, user=users, item=items, row_group_size=row_group_size,
                  shard_rows=shard_rows, seed=5)
    return out, samples, users, items


def _lists(arr: pa.ListArray, ids: np.ndarray) -> list[list[int]]:
    return [x if x is not None else [] for x in arr.take(pa.array(ids)).to_pylist()]


def _expected(samples: Samples, users: SideTable, items: SideTable, split: str,
              max_history: int | None = None) -> list[dict]:
    """The protocol's samples of `split` as read_split_samples' rows (history cut to the
    reader's max_history, the most recent ones)."""
    s = samples.take(np.flatnonzero(samples.split == ("train", "valid", "test").index(split)))
    hist = [s.hist_values[a:b].tolist() for a, b in zip(s.hist_offsets[:-1], s.hist_offsets[1:],
                                                        strict=True)]
    if max_history is not None:
        hist = [h[len(h) - min(len(h), max_history):] for h in hist]
    cols = {"user_id": s.user.tolist(), "item_id": s.item.tolist(),
            "label": s.label.tolist(), "timestamp": s.timestamp.tolist(), "history": hist,
            "age": users.single["age"][s.user].tolist(),
            # padding ids (0) inside a bag are dropped when decoded
            "hobbies": [[v for v in x if v] for x in _lists(users.multi["hobbies"], s.user)],
            "year": items.single["year"][s.item].tolist(),
            "tags": [[v for v in x if v] for x in _lists(items.multi["tags"], s.item)]}
    return [dict(zip(cols, v, strict=True)) for v in zip(*cols.values(), strict=True)]


def _got(ds: Path, split: str, max_history: int | None = None) -> list[dict]:
    rows = read_split_samples(ds, split, max_history).to_pylist()
    keys = ("user_id", "item_id", "label", "timestamp", "history", "age", "hobbies", "year",
            "tags")
    return [{k: r[k] for k in keys} for r in rows]


@pytest.mark.parametrize("split", ["temporal", "leave_one_out", "random"])
def test_samples_and_histories_are_the_protocols(tmp_path: Path, split: str) -> None:
    """Every split's samples in (user, position) order with their histories and features, as
    build_samples made them; the reader's smaller max_history keeps the most recent items.
    `random` assigns splits over all interactions, not per user: the per-position split codes
    carry it."""
    ds, samples, users, items = _write(tmp_path / "d", split)
    for name in ("train", "valid", "test"):
        want = _expected(samples, users, items, name)
        assert len(want) > 0
        assert _got(ds, name) == want, name
        assert _got(ds, name, max_history=2) == _expected(samples, users, items, name, 2)


def test_sequence_rows_hold_each_user_once_in_protocol_order(tmp_path: Path) -> None:
    ds, samples, _, _ = _write(tmp_path / "d")
    rows = [r for p in sorted((ds / "sequences").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    users = [r["user_id"] for r in rows]
    assert sorted(users) == sorted(set(samples.user.tolist())) and users != sorted(users)
    for r in rows:
        k = np.flatnonzero(samples.user == r["user_id"])      # protocol order of this user
        assert r["items"] == samples.item[k].tolist()
        assert r["labels"] == samples.label[k].tolist()
        assert r["timestamps"] == samples.timestamp[k].tolist()
        assert r["splits"] == samples.split[k].tolist()
    manifest = load_manifest(ds)
    total = 0
    for rel, entry in manifest["files"].items():
        if not rel.startswith("sequences/"):
            continue
        pf = pq.ParquetFile(ds / rel)
        assert len(entry["groups"]) == pf.metadata.num_row_groups == entry["row_groups"]
        for g, counts in enumerate(entry["groups"]):
            splits = [c for x in pf.read_row_group(g).column("splits").to_pylist() for c in x]
            assert counts == [splits.count(c) for c in (0, 1, 2)]
            total += len(splits)
    assert total == len(samples) == manifest["counts"]["samples"]


def _by_row(ds: Path, split: str) -> dict[int, dict]:
    s = read_split_samples(ds, split)
    return {int(r): row for r, row in zip(s.row_id, s.to_pylist(), strict=True)}


@pytest.mark.parametrize(("ws", "nw", "block"), [(1, 0, 1), (2, 2, 3), (3, 1, 16), (2, 0, 2)])
def test_reader_yields_every_sample_once_with_its_history(tmp_path_factory: pytest.TempPathFactory,
                                                          ws: int, nw: int, block: int) -> None:
    ds = tmp_path_factory.getbasetemp() / "seq-reader"
    if not (ds / "manifest.json").exists():
        _write(ds)
    for split in ("train", "valid", "test"):
        want = _by_row(ds, split)
        seen: list[int] = []
        for r in range(ws):
            loader = build_loader(ds, split, batch_size=6, rank=r, world_size=ws,
                                  num_workers=nw, seed=9, shuffle=split == "train",
                                  with_tokens=False, shuffle_block=block)
            for b in loader:
                sparse = {k: v.to_dense() for k, v in b.sparse_features.to_dict().items()}
                for i, row in enumerate(b.row_ids.tolist()):
                    w = want[row]
                    assert (b.user_ids[i].item(), b.item_ids[i].item(), b.labels[i].item()) \
                        == (w["user_id"], w["item_id"], w["label"])
                    n = int(b.history_lengths[i])
                    assert b.history[i, :n].tolist() == w["history"]
                    assert not b.history[i, n:].any()
                    for name in ("age", "hobbies", "year", "tags"):
                        got = sparse[name][i].tolist()
                        expect = w[name] if isinstance(w[name], list) else [w[name]]
                        assert got == [v for v in expect if v], (name, row)
                seen += b.row_ids.tolist()
        assert sorted(seen) == list(range(len(want))), split


def test_shuffle_blocks_mix_groups_deterministically(tmp_path: Path) -> None:
    """The epoch's shuffled group order is cut into blocks of M groups whose samples are
    permuted jointly: a batch draws from all M groups of its block; the order is a function of
    (seed, epoch); evaluation reads in file order."""
    ds, _, _, _ = _write(tmp_path / "d", row_group_size=8, shard_rows=1000)
    groups = list_row_groups(ds, "train")
    assert len(groups) >= 12

    def order(seed: int, epoch: int, block: int) -> list[int]:
        loader = build_loader(ds, "train", batch_size=1000, seed=seed, shuffle=True,
                              with_tokens=False, shuffle_block=block)
        loader.dataset.set_epoch(epoch)
        return [r for b in loader for r in b.row_ids.tolist()]

    a = order(1, 0, 4)
    assert a == order(1, 0, 4) and sorted(a) == list(range(sum(g.rows for g in groups)))
    assert a != order(1, 1, 4) and a != order(2, 0, 4) and a != order(1, 0, 1)
    plan = EpochPlan(groups, epoch=0, seed=1, shuffle=True, rank=0, world_size=1,
                     batch_size=1000, shuffle_block=4)
    first = plan.blocks[0]
    span = [(g.offset, g.offset + g.rows) for g in (groups[int(k)] for k in first)]
    head = a[:sum(groups[int(k)].rows for k in first)]      # the first block's samples

    def group_of(row: int) -> int:
        return next(k for k, (lo, hi) in enumerate(span) if lo <= row < hi)

    assert sorted(group_of(r) for r in head) == sorted(
        k for k, g in enumerate(groups[int(x)] for x in first) for _ in range(g.rows))
    assert len({group_of(r) for r in head[:8]}) > 1        # the first 8 already mix groups
    plain = build_loader(ds, "valid", batch_size=5, shuffle=False, with_tokens=False,
                         shuffle_block=4)
    assert [r for b in plain for r in b.row_ids.tolist()] == list(
        range(load_manifest(ds)["counts"]["valid"]["rows"]))


def test_schema_version_1_is_refused_with_the_way_out(tmp_path: Path) -> None:
    ds, _, _, _ = _write(tmp_path / "old")
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"schema_version 1 \(one row per sample, histories "
                                           r"stored\) is no longer read.*re-run "
                                           rf"`genci-prepare \.\.\. --out {ds} --force`"):
        build_loader(ds, "train", batch_size=4, with_tokens=False)


def test_synthetic_sequences_take_at_most_20_bytes_per_interaction(tmp_path: Path) -> None:
    """The layout's size goal on generated data (5.2 B per interaction measured at s = 1; a
    small scale pays more per-file overhead, still far below the bound)."""
    from data_pipes.prepare import main

    out = tmp_path / "syn"
    assert main(["--dataset", "synthetic", "--scale", "0.05", "--out", str(out),
                 "--no-progress"]) == 0
    stored = sum(p.stat().st_size for p in (out / "sequences").glob("*.parquet"))
    assert stored / load_manifest(out)["counts"]["samples"] <= 20


def test_ml100k_reader_equals_the_protocol(tmp_path: Path) -> None:
    """The real ML-100K (the recbole wheel, fetched from PyPI into GENCI_DATA_ROOT/downloads
    when not cached there): the reader's samples and histories, every split, equal
    build_samples' over the source's interactions."""
    from data_pipes.prepare import main
    from data_pipes.protocol import MOVIELENS
    from data_pipes.sources import movielens as ml

    root = Path(os.environ.get("GENCI_DATA_ROOT", ROOT / "data"))
    out = tmp_path / "ml"
    assert main(["--dataset", "ml-100k", "--out", str(out), "--data-root", str(root),
                 "--no-progress"]) == 0
    raw, _ = ml.load_wheel("ml-100k", root)
    inter, _, _ = ml.to_tables(raw, MOVIELENS)
    kept, label = apply_label_rule(inter, MOVIELENS)
    samples = build_samples(kept, label, split="temporal", max_history=50)
    for code, split in enumerate(("train", "valid", "test")):
        want = samples.take(np.flatnonzero(samples.split == code))
        seen = np.zeros(len(want), dtype=bool)
        got = read_split_samples(out, split)
        order = np.argsort(got.row_id)
        for b in build_loader(out, split, batch_size=4096, seed=0, shuffle=True,
                              with_tokens=False):
            k = order[b.row_ids.numpy()]        # positions in (user, position) order
            assert (b.user_ids.numpy() == want.user[k]).all()
            assert (b.item_ids.numpy() == want.item[k]).all()
            assert (b.labels.numpy() == want.label[k]).all()
            lens = b.history_lengths.numpy()
            assert (lens == np.diff(want.hist_offsets)[k]).all()
            for i in np.flatnonzero(lens):
                a = want.hist_offsets[k[i]]
                assert (b.history[i, :lens[i]].numpy() == want.hist_values[a:a + lens[i]]).all()
            seen[k] = True
        assert seen.all()
