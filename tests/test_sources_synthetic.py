"""Synthetic Instrument-shaped data: deterministic per seed, leave-one-out, histories of
earlier positives only, chunked (bounded-memory) writing, manifest cardinalities."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import data_pipes.sources.synthetic as synthetic
from data_pipes.prepare import main


def _run(out: Path, *extra: str) -> dict:
    assert main(["--dataset", "synthetic", "--scale", "0.01", "--out", str(out),
                 "--no-progress", "--seed", "7", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_deterministic_chunked_leave_one_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs with one seed give byte-identical files; 100-user chunks give one row group
    per chunk (ceil(574 / 100) = 6); every user has one test row and at most one valid row,
    the last ones in time; histories = the user's earlier positives, last 20."""
    monkeypatch.setattr(synthetic, "CHUNK_USERS", 100)
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    capsys.readouterr()
    assert {k: v["sha256"] for k, v in a["files"].items()} == \
        {k: v["sha256"] for k, v in b["files"].items()}
    c = _run(tmp_path / "c", "--seed", "8")
    assert c["files"]["train/part-00000.parquet"]["sha256"] != \
        a["files"]["train/part-00000.parquet"]["sha256"]
    n_users = round(57_440 * 0.01)
    assert a["counts"]["users"] == n_users == 574 and a["counts"]["items"] == 246
    out = tmp_path / "a"
    for split in ("train", "valid", "test"):
        assert a["files"][f"{split}/part-00000.parquet"]["row_groups"] == 6

    rows = [dict(r, split=s) for s in ("train", "valid", "test")
            for r in pq.read_table(out / s).to_pylist()]
    assert len(rows) == a["counts"]["samples"]
    per_user: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        per_user[r["user_id"]].append(r)
    for u, rs in per_user.items():
        rs.sort(key=lambda r: r["timestamp"])
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
    assert 3.0 < avg_hist < 15.0                       # Instrument: 8.91
    assert 0.4 < a["counts"]["positive_rate"] < 0.9

    items = pq.read_table(out / "items.parquet").to_pylist()
    card = {f["name"]: f["cardinality"] for f in a["features"]}
    assert card == {"user_id": 575, "item_id": 247,
                    "store": max(i["store"] for i in items) + 1,
                    "categories": max(max(i["categories"]) for i in items) + 1}
    by_id = {i["item_id"]: i for i in items}
    assert all(i["text"] and i["categories"] for i in items)
    for r in rows[:500]:
        assert r["store"] == by_id[r["item_id"]]["store"]
        assert r["categories"] == by_id[r["item_id"]]["categories"]


def test_scale_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--scale 0 is refused with a clear message and writes nothing."""
    out = tmp_path / "s"
    assert main(["--dataset", "synthetic", "--scale", "0", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--scale must be > 0" in capsys.readouterr().err and not out.exists()
