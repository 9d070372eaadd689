"""Under torchrun, the rank whose input is bad is the root cause the user reads last.

A real 2-rank `torchrun --standalone` run of configs/debug.toml in which rank 1 (only) reads
a corrupt manifest (tests/_rank_failure_entry.py makes `load_manifest` raise the project's
DatasetError on rank 1) while rank 0 enters the sharding planner's collectives. Rank 1
prints its one line; rank 0's broken collective prints no traceback, only the same line
(genci_dist/errors.py); torchrun's ChildFailedError summary names rank 1 as the root cause
with that line as its traceback, and that line is the summary's last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = ("genci-train: error: rank 1: data/debug-tiny/manifest.json: line 1: not valid JSON "
        "(injected on rank 1 by the test)")


def test_failing_rank_line_is_the_root_cause_and_last(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {k: v for k, v in os.environ.items() if k != "GENCI_DEBUG"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "_rank_failure_entry.py"),
                        "--config", "configs/debug.toml", "--train.run_dir",
                        str(tmp_path / "run"), "--train.max_steps", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    err = r.stderr
    assert r.returncode != 0, err
    workers, sep, summary = err.partition("Root Cause (first observed failure):")
    assert sep, err
    # the ranks printed the root cause's line and no traceback of their own (the only one is
    # torchrun's, which raises ChildFailedError; no gloo error, no frame of the project)
    ours = [x for x in workers.splitlines() if x.startswith("genci-train:")]
    assert ours and set(ours) == {LINE}, err
    assert workers.count("Traceback (most recent call last)") == 1, err
    assert "genci_dist/" not in workers and "gloo" not in workers.lower(), err
    # the root cause is rank 1, its traceback field is the line, and nothing follows but "==="
    assert "rank      : 1 (local_rank: 1)" in summary and "exitcode  : 2" in summary, err
    tail = [x for x in summary.strip().splitlines() if x.strip("=")]
    assert tail[-1] == f"  traceback : {LINE}", err
    # rank 0's entry (if torchrun recorded it before stopping it) points at rank 1's error
    if "rank      : 0 (local_rank: 0)" in workers:
        rank0 = workers.split("rank      : 0 (local_rank: 0)")[1]
        assert "traceback : " in rank0
        assert any(x in rank0 for x in ("stopped after another rank's error: " + LINE,
                                         "Signal 15 (SIGTERM)", "To enable traceback"))
    assert not (tmp_path / "run" / "steps.jsonl").exists()
