"""`genci-bench` on the tiny prepared dataset with a couple of steps: its JSON lines parse,
throughputs are positive, the per-step phase split of GenCI has every phase hooked and
measured and sums to at most the step time, variant names round-trip, and one world-size-2
run spawns real gloo ranks. Timings are only checked for consistency, never against a bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_pipes.collate import load_item_tokens
from genci_dist.bench.cli import main, parse_variant, summarize
from genci_dist.bench.measure import EVAL_PHASES, FORWARD_PHASES, TRAIN_PHASES

ROOT = Path(__file__).resolve().parents[1]
TOL_S = 2e-3  # perf_counter bookkeeping between the phases and the step's own clock


def _run(capsys: pytest.CaptureFixture[str], data: Path, *args: str) -> list[dict[str, Any]]:
    rc = main(["--configs", str(ROOT / "configs/debug.toml"), "--models", "genci",
               "--steps", "2", "--warmup", "1", "--eval-batches", "1", "--threads", "1",
               "--flops-reps", "1", "--matmul-size", "128", "--matmul-reps", "2", *args,
               "--data.dir", str(data), "--data.source", "none", "--data.max_history", "5",
               "--data.num_workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _check_split(line: dict[str, Any], phases: tuple[str, ...]) -> None:
    split = line["split_s"]
    assert set(split) == set(phases)
    assert all(v > 0 for v in split.values()), split  # GenCI runs every hooked part
    assert sum(split.values()) <= line["step_s"] * 1.01 + TOL_S
    assert all(line["hooked"][p] for p in FORWARD_PHASES)


def test_world_size_1_lines_and_variants(capsys: pytest.CaptureFixture[str],
                                         tiny_dataset: Path) -> None:
    lines = _run(capsys, tiny_dataset, "--world-sizes", "1", "--inprocess",
                 "--variant", "slow:--train.lr 0.001",
                 "--variant", "fast:--train.lr=0.002 --train.autocast_bf16 true")
    per_item = load_item_tokens(tiny_dataset)[0].shape[1]
    runs = [x for x in lines if x["repeat"] == 0]
    summaries = [x for x in lines if x["repeat"] == "median"]
    assert [(x["bench"], x["variant"]) for x in runs] == [
        (b, v) for v in ("slow", "fast") for b in ("train", "eval", "flops", "matmul")]
    assert {(x["bench"], x["variant"]) for x in summaries} == {(x["bench"], x["variant"])
                                                               for x in runs}
    for x in lines:
        assert x["world_size"] == 1 and x["model"] == "genci" and x["threads"] == 1
        assert x["peak_rss_mb"] > 0 and x["torch"]
    for x in runs:
        own = (["--train.lr", "0.001"] if x["variant"] == "slow"
               else ["--train.lr=0.002", "--train.autocast_bf16", "true"])
        dtype = "float32" if x["variant"] == "slow" else "bfloat16"
        assert x["overrides"][-len(own):] == own
        if x["bench"] == "train":
            assert x["batch_size"] == 64 and x["steps"] == 2 and x["samples"] == 128
            assert x["samples_per_s"] > 0
            _check_split(x, TRAIN_PHASES)
        elif x["bench"] == "eval":
            assert x["samples_per_s"] > 0
            _check_split(x, EVAL_PHASES)
        elif x["bench"] == "flops":
            assert x["gflop_per_sample"] > x["generation_gflop_per_sample"] > 0
            assert x["achieved_gflops"] > 0 and x["matmul_gflops"] > 0
            assert x["ratio"] == pytest.approx(x["achieved_gflops"] / x["matmul_gflops"])
            # full-width histories (max_history 5 items × tokens per item), under the
            # variant's autocast
            assert x["history_tokens"] == 5 * per_item and x["dtype"] == dtype
        else:
            assert x["bench"] == "matmul" and x["matmul_gflops"] > 0
            assert x["matmul_dtype"] == dtype
    first = next(x for x in summaries if x["bench"] == "train" and x["variant"] == "slow")
    assert first["speedup"] == 1.0 and first["repeats"] == 1


def test_world_size_2_spawns_gloo_ranks(capsys: pytest.CaptureFixture[str],
                                        tiny_dataset: Path) -> None:
    lines = _run(capsys, tiny_dataset, "--world-sizes", "2", "--only", "train",
                 "--variant", "two:--train.lr 0.001")
    assert len(lines) == 1
    (x,) = lines
    assert (x["bench"], x["variant"], x["world_size"], x["threads"]) == ("train", "two", 2, 1)
    assert x["samples"] == 2 * 64 and x["samples_per_s"] > 0 and x["peak_rss_mb"] > 0
    _check_split(x, TRAIN_PHASES)


def test_variant_parsing_and_summary() -> None:
    assert parse_variant('base:--model.name din --train.lr "0.1"') == (
        "base", ["--model.name", "din", "--train.lr", "0.1"])
    assert parse_variant("empty:") == ("empty", [])
    with pytest.raises(Exception, match="NAME:OVERRIDES"):
        parse_variant("--train.lr 0.1")
    rows = [{"bench": "train", "variant": v, "repeat": r, "samples_per_s": s, "step_s": 1 / s,
             "split_s": {"data": 1 / s}}
            for r, pairs in enumerate([[("a", 10.0), ("b", 30.0)], [("a", 20.0), ("b", 50.0)],
                                       [("a", 30.0), ("b", 40.0)]]) for v, s in pairs]
    a, b = summarize(rows)
    assert (a["variant"], a["samples_per_s"], a["best_samples_per_s"]) == ("a", 20.0, 30.0)
    assert (b["samples_per_s"], b["best_step_s"], b["speedup"]) == (40.0, 1 / 50.0, 2.0)
    assert b["split_s"] == {"data": 1 / 40.0} and b["repeat"] == "median"


def test_reader_bench_counts_every_row_in_every_batch_layout(
        capsys: pytest.CaptureFixture[str], tiny_dataset: Path) -> None:
    """`python -m data_pipes.bench_reader`: the raw scans and the reader in each batch layout
    (history as tokens and/or item ids) all count the split's rows from the Parquet metadata."""
    from data_pipes import bench_reader
    from data_pipes.stream import list_row_groups

    rows = sum(g.rows for g in list_row_groups(tiny_dataset, "train"))
    assert bench_reader.main(["--data", str(tiny_dataset), "--workers", "0",
                              "--batch-size", "16", "--repeats", "1",
                              "--keep-freed-memory", "false"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(x["bench"], x.get("layout"), x.get("read_ahead")) for x in lines] == [
        ("raw_pyarrow_scan", None, None), ("raw_pyarrow_scan_open_once", None, None),
        ("raw_pyarrow_read_table", None, None), ("raw_pyarrow_iter_batches", None, None),
        *(("write_floor", layout, None) for layout in ("full", "genci", "din", "fields")),
        *(("reader_stages", layout, None) for layout in ("full", "genci", "din", "fields")),
        *(("reader_with_batches", layout, ahead) for layout in ("full", "genci", "din", "fields")
          for ahead in (False, True))]
    assert all(x["rows"] == rows for x in lines) and rows > 0
    # the floor writes each layout's batches: fields < din (+ history ids), full = all of it
    floor = {x["layout"]: x["bytes"] for x in lines[4:8]}
    assert 0 < floor["fields"] < floor["din"] < floor["full"]
    assert floor["fields"] < floor["genci"] < floor["full"]
    strictest = min(x["seconds"] for x in lines[:4])
    for x in lines[8:12]:   # each stage timed; the bounds: the strictest scan over half the work
        cpu = {k: x[f"{k}_cpu_seconds"] for k in ("read", "decode", "assemble", "compiled")}
        assert all(v > 0 for v in cpu.values())
        assert x["strictest_scan_seconds"] == pytest.approx(strictest, abs=1e-3)   # 3 vs 4 places
        scan = x["strictest_scan_seconds"]
        assert x["ratio_bound_two_threads"] == pytest.approx(
            scan / ((cpu["read"] + cpu["decode"] + cpu["assemble"]) / 2), abs=2e-3)
        assert x["ratio_bound_compiled_two_threads"] == pytest.approx(
            scan / ((cpu["read"] + cpu["decode"] + cpu["compiled"]) / 2), abs=2e-3)
    for x in lines[12:]:    # a ratio against each of the four scans; the strictest is their min
        by_scan = x["ratio_paired_median_by_scan"]
        assert list(by_scan) == [y["bench"] for y in lines[:4]]
        assert x["ratio_paired_median_strictest"] == min(by_scan.values())
        assert by_scan["raw_pyarrow_scan"] == x["ratio_to_raw_paired_median"]
    with pytest.raises(SystemExit):
        bench_reader.main(["--data", str(tiny_dataset), "--layouts", "genci,bogus"])
    with pytest.raises(SystemExit):
        bench_reader.main(["--data", str(tiny_dataset), "--read-ahead", "yes"])
