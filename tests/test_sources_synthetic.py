"""Synthetic Instrument-shaped data: deterministic per seed and for any --workers, fixed-size
row groups and shards, leave-one-out, histories of earlier positives only, manifest
cardinalities; the generator's statistics against the analytic values of its own parameters;
the inverse-CDF draw on hand-computed boundaries."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_pipes.sources.synthetic as synthetic
from data_pipes.prepare import _parser, main
from data_pipes.protocol import apply_label_rule
from data_pipes.sequences import read_split_samples


def _run(out: Path, *extra: str) -> dict:
    assert main(["--dataset", "synthetic", "--scale", "0.01", "--out", str(out),
                 "--no-progress", "--seed", "7", "--row-group-size", "500",
                 "--shard-rows", "1200", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _hashes(m: dict) -> dict[str, str]:
    return {k: v["sha256"] for k, v in m["files"].items()}


def test_deterministic_sharded_leave_one_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs with one seed give byte-identical files, and so does --workers 2 (chunks made
    in two processes); row groups hold exactly 500 rows and shards 1000 (1200 rounded down to
    whole row groups) except the last of each split; every user has one test row and at most
    one valid row, the last ones in time; histories = the user's earlier positives, last 20."""
    monkeypatch.setattr(synthetic, "CHUNK_USERS", 100)          # 6 chunks
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    args = _parser().parse_args(["--dataset", "synthetic", "--scale", "0.01", "--out",
                                 str(tmp_path / "w"), "--no-progress", "--seed", "7",
                                 "--row-group-size", "500", "--shard-rows", "1200"])
    args.workers = 2                                           # genci-prepare --workers 2
    synthetic.prepare_synthetic(args)
    w = json.loads((tmp_path / "w" / "manifest.json").read_text())
    capsys.readouterr()
    assert _hashes(a) == _hashes(b) == _hashes(w)
    c = _run(tmp_path / "c", "--seed", "8")
    assert c["files"]["sequences/part-00000.parquet"]["sha256"] != \
        a["files"]["sequences/part-00000.parquet"]["sha256"]
    assert a["counts"]["users"] == round(57_440 * 0.01) == 574
    assert a["counts"]["items"] == round(24_588 * 0.01) == 246
    assert 5 * 574 <= a["counts"]["samples"] < a["source"]["interactions"]
    out = tmp_path / "a"
    # row groups of whole users closed once they reach 500 interactions, shards once they
    # reach 1200; every sample is a stored position
    parts = sorted((out / "sequences").iterdir())
    assert [p.name for p in parts] == [f"part-{k:05d}.parquet" for k in range(len(parts))]
    longest = 0
    group_sizes, shard_sizes = [], []
    for p in parts:
        items = pq.read_table(p, columns=["items"]).column("items")
        longest = max(longest, max(len(x) for x in items.to_pylist()))
        pf = pq.ParquetFile(p)
        sizes = [sum(len(x) for x in pf.read_row_group(g, columns=["items"]).column("items")
                     .to_pylist()) for g in range(pf.metadata.num_row_groups)]
        group_sizes += sizes
        shard_sizes.append(sum(sizes))
        assert a["files"][f"sequences/{p.name}"]["interactions"] == sum(sizes)
    assert sum(group_sizes) == a["counts"]["samples"]
    assert all(500 <= n < 500 + longest for n in group_sizes[:-1]) and group_sizes[-1] > 0
    assert all(1200 <= n < 1200 + 500 + longest for n in shard_sizes[:-1])

    rows = [dict(r, split=s) for s in ("train", "valid", "test")
            for r in read_split_samples(out, s).to_pylist()]
    assert len(rows) == a["counts"]["samples"]
    per_user: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        per_user[r["user_id"]].append(r)
    assert sorted(per_user) == list(range(1, 575))
    for u, rs in per_user.items():
        rs.sort(key=lambda r: (r["timestamp"], r["item_id"]))
        splits = [r["split"] for r in rs]
        assert splits[-1] == "test" and splits.count("test") == 1
        if len(rs) >= 2:
            assert splits[-2] == "valid" and splits.count("valid") == 1
        positives: list[int] = []
        for r in rs:                                   # brute-force history
            assert r["history"] == positives[-20:], (u, r)
            if r["label"] == 1:
                positives.append(r["item_id"])
    avg_hist = sum(len(r["history"]) for r in rows) / len(rows)
    assert a["counts"]["avg_history"] == pytest.approx(avg_hist)
    assert a["counts"]["positive_rate"] == pytest.approx(
        sum(r["label"] for r in rows) / len(rows))

    items = pq.read_table(out / "items.parquet").to_pylist()
    assert [i["item_id"] for i in items] == list(range(1, 247))
    card = {f["name"]: f["cardinality"] for f in a["features"]}
    assert card == {"user_id": 575, "item_id": 247,
                    "store": max(i["store"] for i in items) + 1,
                    "categories": max(max(i["categories"]) for i in items) + 1}
    by_id = {i["item_id"]: i for i in items}
    for i in items:                                    # 1-2 distinct categories of its topic
        topic = int(i["text"].split("topic")[1].split()[0])
        assert 1 <= len(set(i["categories"])) == len(i["categories"]) <= 2
        assert all((c - 1) // 3 == topic for c in i["categories"])
        assert (i["store"] - 1) // 4 == topic
        assert i["text"].endswith(" ".join(f"cat{c}" for c in i["categories"]))
    for r in rows:
        assert r["store"] == by_id[r["item_id"]]["store"]
        assert r["categories"] == by_id[r["item_id"]]["categories"]
    users = pq.read_table(out / "users.parquet").to_pylist()
    assert users[0] == {"user_id": 1, "raw_id": "U00000001"} and len(users) == 574


def test_statistics_match_the_parameters() -> None:
    """An s = 1 catalogue and 40,000 users (≈ 368k interactions) against the analytic values:
    interactions per user 5 + 4.2, positive rate 0.3·0.25 + 0.7·0.85 = 0.67 (0.67 / 0.89
    after dropping rating 3, a third of the negatives; 9.2 · 0.89 samples per user), next
    item on the previous item's topic 0.7²·0.8 + (1 - 0.7²)/40 (the walk stays on its topic
    with probability 0.75 + 0.25/5 = 0.8), and per-topic popularity: share of rank r = r^-a / H_c, so
    the pooled rank-frequency slope is -a."""
    a = synthetic.POP_EXPONENT
    cat = synthetic.make_catalogue(24_588, seed=3)
    n_users = 40_000
    x = synthetic.make_users(1, n_users, cat, np.random.default_rng(5))
    n = x.user.size
    assert n / n_users == pytest.approx(5 + 4.2, abs=0.06)     # sd 3.67 / sqrt(40k) = 0.018
    pos = x.rating > 3
    assert pos.mean() == pytest.approx(0.3 * 0.25 + 0.7 * 0.85, abs=0.004)  # se 0.0008
    kept, label = apply_label_rule(x)
    assert label.mean() == pytest.approx(0.67 / (1 - 0.33 / 3), abs=0.004)
    assert kept.user.size / n_users == pytest.approx(9.2 * (1 - 0.33 / 3), abs=0.06)

    topic = cat.topic[x.item - 1]
    same_user = x.user[1:] == x.user[:-1]
    same_topic = (topic[1:] == topic[:-1])[same_user].mean()
    assert same_topic == pytest.approx(0.49 * 0.8 + 0.51 / 40, abs=0.004)  # se 0.0009

    # within-topic popularity rank of every item, from the catalogue's inverse-CDF order
    starts = cat.ends - cat.sizes
    rank = np.empty(cat.n_items, dtype=np.int64)
    rank[cat.order - 1] = np.arange(cat.n_items) - np.repeat(starts, cat.sizes) + 1
    counts = np.bincount(rank[x.item - 1], minlength=101)[1:101].astype(np.float64)
    harmonic = np.array([(np.arange(1, m + 1, dtype=np.float64) ** -a).sum()
                         for m in cat.sizes])
    assert counts[0] / n == pytest.approx(np.mean(1 / harmonic), rel=0.02)
    r = np.arange(1, 101)
    slope = np.polyfit(np.log(r), np.log(counts), 1)[0]
    assert slope == pytest.approx(-a, abs=0.05)
    assert np.bincount(x.item, minlength=cat.n_items + 1)[1:].astype(bool).mean() > 0.5


def test_inverse_cdf_draw_hand_computed() -> None:
    """Topic c's items in rank order have cumulative shares H_r / H_m; a uniform just below
    a boundary draws rank r, just above it rank r + 1; u → 1 still lands in the topic; an
    empty topic draws item 1."""
    a = synthetic.POP_EXPONENT
    cat = synthetic.make_catalogue(200, seed=1)
    assert cat.sizes[39] > 0                           # c + u rounds up to 40 for u → 1
    big = np.flatnonzero(cat.sizes >= 5)
    for c in sorted({int(big[0]), int(big[-1]), 39}):
        lo, hi = int(cat.ends[c] - cat.sizes[c]), int(cat.ends[c])
        w = np.arange(1, hi - lo + 1, dtype=np.float64) ** -a
        bounds = np.cumsum(w)[:-1] / w.sum()
        for r, b in enumerate(bounds[:4]):
            got = synthetic.draw_items(cat, np.array([c, c]), np.array([b - 1e-9, b + 1e-9]))
            assert got.tolist() == [cat.order[lo + r], cat.order[lo + r + 1]]
        edge = synthetic.draw_items(cat, np.array([c, c]), np.array([0.0, 1 - 2 ** -53]))
        assert edge.tolist() == [cat.order[lo], cat.order[hi - 1]]
        assert set(cat.topic[cat.order[lo:hi] - 1].tolist()) == {c}
    small = synthetic.make_catalogue(5, seed=1)
    empty = int(np.flatnonzero(small.sizes == 0)[0])
    assert synthetic.draw_items(small, np.array([empty]), np.array([0.5])).tolist() == [1]


def test_scale_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--scale 0 is refused with a clear message and writes nothing."""
    out = tmp_path / "s"
    assert main(["--dataset", "synthetic", "--scale", "0", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--scale must be > 0" in capsys.readouterr().err and not out.exists()
