"""genci_dist.bench.scale: the growth-exponent fit on hand-computed numbers, and a real tiny run
(generate + read at two scales, each stage in its own subprocess) whose JSON lines carry the
figures of the datasets it wrote and per-child peak RSS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from genci_dist.bench.scale import dir_bytes, growth_exponent, main


def test_growth_exponent_hand_computed() -> None:
    """log-log least squares: an exact power law gives its exponent; points (0,0), (1,1),
    (2,3) on log axes give slope cov/var = 3/2."""
    x = [1e3, 1e4, 1e5, 1e6]
    assert growth_exponent(x, [2.5e-6 * v ** 1.2 for v in x]) == pytest.approx(1.2, abs=1e-12)
    e = math.e
    assert growth_exponent([1, e, e * e], [1, e, e ** 3]) == pytest.approx(1.5, abs=1e-12)


def test_tiny_run_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert main(["--stages", "generate,read", "--scales", "0.01,0.03", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(g["stage"], g.get("scale")) for g in lines] == [
        ("generate", 0.01), ("read", 0.01), ("generate", 0.03), ("read", 0.03),
        ("generate", None), ("read", None)]
    for k, scale in enumerate((0.01, 0.03)):
        gen, read = lines[2 * k], lines[2 * k + 1]
        data = out / f"synthetic-s{scale:g}"
        manifest = json.loads((data / "manifest.json").read_text())
        assert gen["interactions"] == read["interactions"] == \
            manifest["source"]["interactions"] > manifest["counts"]["samples"]
        assert gen["samples"] == manifest["counts"]["samples"]
        assert read["samples"] == manifest["counts"]["train"]["rows"] == sum(
            g[0] for rel, e in manifest["files"].items() if rel.startswith("sequences/")
            for g in e["groups"])
        assert read["batches"] == -(-read["samples"] // 1024)
        assert read["bytes"] == dir_bytes(data) >= gen["bytes"] > 0
        for g in (gen, read):
            assert 0 < g["stage_s"] <= g["wall_s"] and g["cpu_s"] > 0
        # per-child peak RSS: the reader's child imports torch, the generator's does not,
        # and the second generate line is not the running maximum over earlier children
        assert 0.02 < gen["peak_rss_gb"] < read["peak_rss_gb"]
    assert lines[2]["peak_rss_gb"] < lines[1]["peak_rss_gb"]
    for fit, stage in zip(lines[4:], ("generate", "read"), strict=True):
        pts = [g for g in lines[:4] if g["stage"] == stage]
        x = [g["interactions"] for g in pts]
        assert fit["points"] == 2
        assert fit["exponent_stage_s"] == pytest.approx(
            growth_exponent(x, [g["stage_s"] for g in pts]), abs=1e-3)
        assert fit["exponent_wall_s"] == pytest.approx(
            growth_exponent(x, [g["wall_s"] for g in pts]), abs=1e-3)
        assert fit["exponent_cpu_s"] == pytest.approx(
            growth_exponent(x, [g["cpu_s"] for g in pts]), abs=1e-3)


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown stage and non-positive scales: exit 2, one line naming the problem, nothing
    run."""
    assert main(["--stages", "generate,compress", "--out", str(tmp_path / "a")]) == 2
    assert "unknown stage(s) ['compress']" in capsys.readouterr().err
    assert main(["--scales", "1,0", "--out", str(tmp_path / "b")]) == 2
    assert "--scales must be > 0" in capsys.readouterr().err
    assert main(["--scales", "1,x", "--out", str(tmp_path / "c")]) == 2
    assert "is not a comma list" in capsys.readouterr().err
    assert main(["--repeat", "1,0", "--out", str(tmp_path / "d")]) == 2
    assert "--repeat '1,0' is not a comma list of integers >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "d").exists()


def test_repeated_raw_interactions_keep_users_and_items(tmp_path: Path) -> None:
    """repeat = 3: every interaction of repeat = 1 three times, copy c shifted by c times its
    chunk's last timestamp, same users and items; each user's sequence stays time-ordered."""
    import pyarrow.csv as pacsv

    from data_pipes.raw_inter import write_raw_synthetic

    def read(path: Path):
        t = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t"))
        return [t.column(k).to_numpy() for k in range(4)]

    n1 = write_raw_synthetic(tmp_path / "a" / "x.inter", 0.02, seed=5, chunk_users=300)
    n3 = write_raw_synthetic(tmp_path / "b" / "x.inter", 0.02, seed=5, chunk_users=300,
                             repeat=3)
    assert n3 == 3 * n1
    u1, i1, r1, t1 = read(tmp_path / "a" / "x.inter")
    u3, i3, r3, t3 = read(tmp_path / "b" / "x.inter")
    assert u1.size == n1 and u3.size == n3
    assert set(u3.tolist()) == set(u1.tolist()) and set(i3.tolist()) == set(i1.tolist())
    # the first chunk = the rows of the first 300 users to appear (rows are grouped by user)
    starts = np.sort(np.unique(u1, return_index=True)[1])
    assert starts.size > 300
    chunk = int(starts[300])
    shift = int(t1[chunk - 1])
    for c in range(3):
        sl = slice(c * chunk, (c + 1) * chunk)
        assert (u3[sl] == u1[:chunk]).all() and (i3[sl] == i1[:chunk]).all()
        assert (r3[sl] == r1[:chunk]).all() and (t3[sl] == t1[:chunk] + c * shift).all()
    for user in np.unique(u3)[:20]:
        assert (np.diff(t3[u3 == user]) > 0).all()


def test_genci_bench_scale_subcommand_dispatches(capsys) -> None:
    """`genci-bench scale ...` is this benchmark (its own arguments, its own errors)."""
    from genci_dist.bench.cli import main as bench_main

    assert bench_main(["scale", "--stages", "bogus", "--scales", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown stage" in err[0] and "bogus" in err[0]


def test_peak_rss_is_the_stage_s_not_the_launching_process_s(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """Linux carries a forking parent's RSS high-water mark across exec into the child's
    ru_maxrss; the stage's figure must not be the launcher's (here a 0.6 GB one)."""
    big = np.ones(600 * 2**20 // 8)  # resident: 0.6 GB in this process
    assert main(["--stages", "generate", "--scales", "0.01", "--out", str(tmp_path)]) == 0
    gen = json.loads(capsys.readouterr().out.splitlines()[0])
    assert big.sum() > 0 and 0.02 < gen["peak_rss_gb"] < 0.4


def test_rank_figures_hand_computed() -> None:
    """Peak and drift per rank from (t, steps, {rank: rss KiB}, workers KiB) samples: the
    drift runs from the first sample at >= 25 % of the steps to the last one before the last
    step; zero readings (a process exiting) are ignored."""
    from genci_dist.bench.scale_jobs import rank_figures

    mib = 1024
    samples = [(0.0, 0, {0: 100 * mib}, 0), (1.0, 2, {0: 300 * mib, 1: 200 * mib}, 50 * mib),
               (2.0, 5, {0: 310 * mib, 1: 220 * mib}, 60 * mib),
               (3.0, 9, {0: 330 * mib, 1: 0}, 0), (4.0, 10, {0: 900 * mib}, 0)]
    got = rank_figures(samples, total_steps=10)
    assert got == {"rank0_peak_rss_gb": round(900 / 1024, 3),
                   "rank0_rss_drift_gb": round(30 / 1024, 3),      # 330 - 300 (steps 2..9)
                   "rank1_peak_rss_gb": round(220 / 1024, 3),
                   "rank1_rss_drift_gb": round(20 / 1024, 3),      # 220 - 200, 0 skipped
                   "workers_peak_rss_gb": round(60 / 1024, 3)}
    assert rank_figures(samples[:2], total_steps=10)["rank0_rss_drift_gb"] is None


def test_tokenize_train_evaluate_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    """The model stages on a tiny scale, for real: genci-tokenize writes the semantic IDs,
    a 2-rank torchrun trains DeepFM for 4 steps without validating (both ranks sampled),
    and genci-evaluate of its checkpoint scores every train row."""
    out = tmp_path / "bench"
    assert main(["--stages", "generate,tokenize,train,evaluate", "--scales", "0.01",
                 "--out", str(out), "--train-steps", "4", "--batch-size", "256",
                 "--tokenizer-steps", "20"]) == 0
    gen, tok, train, ev = (json.loads(x) for x in capsys.readouterr().out.splitlines()[:4])
    data = out / "synthetic-s0.01"
    manifest = json.loads((data / "manifest.json").read_text())
    assert tok["stage"] == "tokenize" and tok["samples"] == tok["n_items"] \
        == manifest["counts"]["items"] and tok["train_steps"] == 20
    assert (data / "semantic_ids.parquet").is_file()
    assert train["samples"] == 4 * 256 and train["world_size"] == 2
    for r in (0, 1):
        assert 0.1 < train[f"rank{r}_peak_rss_gb"] < 4 and 0.1 < ev[f"rank{r}_peak_rss_gb"] < 4
    run = out / "run-s0.01-deepfm"
    assert [json.loads(x)["step"] for x in (run / "steps.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]
    written = json.loads((run / "scale_eval_train.json").read_text())
    assert ev["samples"] == manifest["counts"]["train"]["rows"] == written["samples"]
    assert ev["auc"] == written["auc"] and 0 < ev["auc"] < 1 and ev["gauc"] == written["gauc"]
