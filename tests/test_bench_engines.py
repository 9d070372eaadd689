"""data_pipes.bench_engines: the pyarrow engine's per-user sequences equal a plain-Python
reference of the job (label rule, order by (timestamp, item)), across several partitions, and
the checksum the engines are compared by is that of the sequences."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipes.bench_engines import checksum, main, run_pyarrow
from data_pipes.raw_inter import write_raw_synthetic


def _reference(inter: Path) -> dict[int, list[tuple[int, int, int]]]:
    seqs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for line in inter.read_text().splitlines()[1:]:
        u, i, r, t = line.split("\t")
        if float(r) != 3:
            seqs[int(u)].append((int(t), int(i), int(float(r) > 3)))
    return {u: sorted(s) for u, s in seqs.items()}


@pytest.mark.parametrize("partitions", [1, 3])
def test_pyarrow_engine_equals_reference(tmp_path: Path, partitions: int) -> None:
    inter = tmp_path / "raw" / "synth.inter"
    write_raw_synthetic(inter, 0.01, seed=3)
    out = tmp_path / "seq.parquet"
    (tmp_path / "work").mkdir()
    run_pyarrow(inter, out, tmp_path / "work", partitions)
    got = {r["user"]: sorted(zip(r["timestamps"], r["items"], r["labels"], strict=True))
           for r in pq.read_table(out).to_pylist()}
    want = _reference(inter)
    assert got == want and len(want) > 100
    rows = pq.read_table(out).to_pylist()
    for r in rows:   # stored in (timestamp, item) order, not just as a set
        assert list(zip(r["timestamps"], r["items"], strict=True)) == sorted(
            zip(r["timestamps"], r["items"], strict=True))
    c = checksum(out)
    assert c["users"] == len(want) and c["interactions"] == sum(map(len, want.values()))


def test_checksum_sees_order_and_labels(tmp_path: Path) -> None:
    import pyarrow as pa

    def write(items: list[int], labels: list[int]) -> Path:
        path = tmp_path / f"{items}{labels}.parquet"
        pq.write_table(pa.table({"user": [5], "items": [items], "labels": [labels],
                                 "timestamps": [[1, 2]]}), path)
        return path

    base = checksum(write([1, 2], [0, 1]))["checksum"]
    assert checksum(write([2, 1], [0, 1]))["checksum"] != base
    assert checksum(write([1, 2], [1, 1]))["checksum"] != base


def test_every_engine_line_agrees_or_says_it_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each engine in its own subprocess: the pyarrow line carries the reference's counts;
    duckdb / polars (not project dependencies) either agree on the checksum or are reported
    as not installed; an unknown engine is refused."""
    inter = tmp_path / "raw" / "synth.inter"
    write_raw_synthetic(inter, 0.005, seed=1)
    assert main(["--inter", str(inter), "--engines", "pyarrow,duckdb,polars"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["engine"] for x in lines] == ["pyarrow", "duckdb", "polars"]
    want = _reference(inter)
    assert lines[0]["users"] == len(want)
    assert lines[0]["interactions"] == sum(map(len, want.values()))
    for x in lines[1:]:
        assert x.get("error") == "not installed" or x["checksum"] == lines[0]["checksum"]
    assert main(["--inter", str(inter), "--engines", "spark"]) == 2
    assert "unknown engine" in capsys.readouterr().err
