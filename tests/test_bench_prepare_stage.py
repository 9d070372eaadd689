"""genci_dist.bench.scale's prepare stages on a tiny run: the raw synthetic .inter they read
(row count, header, ids), and the JSON lines of the partitioned and in-memory prepare of the
same raw file (same samples, interactions = raw rows, partitions in the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from data_pipes.raw_inter import write_raw_synthetic
from genci_dist.bench.scale import main


def test_raw_synthetic_file(tmp_path: Path) -> None:
    path = tmp_path / "r" / "x.inter"
    n = write_raw_synthetic(path, 0.01, seed=3, chunk_users=100)   # 574 users, 6 chunks
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    assert len(lines) == n + 1
    t = pacsv.read_csv(path, read_options=pacsv.ReadOptions(skip_rows=1, column_names=list(
        "uirt")), parse_options=pacsv.ParseOptions(delimiter="\t")).to_pydict()
    assert sorted(set(t["u"])) == list(range(1, 575))           # every user, ids 1..574
    assert min(t["i"]) >= 1 and max(t["i"]) <= 246 and set(t["r"]) == {1, 2, 3, 4, 5}
    per_user: dict[int, list[int]] = {}
    for u, ts in zip(t["u"], t["t"], strict=True):
        per_user.setdefault(u, []).append(ts)
    assert min(len(v) for v in per_user.values()) >= 5
    assert 8.0 < n / 574 < 10.5                                  # mean 9.2 per user
    assert write_raw_synthetic(tmp_path / "again.inter", 0.01, seed=3, chunk_users=100) == n
    assert (tmp_path / "again.inter").read_bytes() == path.read_bytes()


def test_prepare_stage_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert main(["--stages", "prepare,prepare_mem", "--scales", "0.01,0.03",
                 "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(g["stage"], g.get("scale")) for g in lines] == [
        ("prepare", 0.01), ("prepare_mem", 0.01), ("prepare", 0.03), ("prepare_mem", 0.03),
        ("prepare", None), ("prepare_mem", None)]
    for k, scale in enumerate((0.01, 0.03)):
        part, mem = lines[2 * k], lines[2 * k + 1]
        raw = out / f"raw-s{scale:g}" / "synth.inter"
        body = raw.read_text().splitlines()[1:]
        rows = len(body)
        kept = sum(line.split("\t")[2] != "3" for line in body)   # drop-band:3-3
        assert part["interactions"] == mem["interactions"] == rows
        assert part["samples"] == mem["samples"] == kept
        manifest = json.loads((out / f"synthetic-s{scale:g}" / "manifest.json").read_text())
        assert manifest["source"]["raw_interactions"] == rows      # the last stage's dataset
        for g in (part, mem):
            assert 0 < g["stage_s"] <= g["wall_s"] and g["cpu_s"] > 0 and g["peak_rss_gb"] > 0
    assert lines[4]["points"] == lines[5]["points"] == 2
