"""Under torchrun, the rank whose input is bad is the root cause the user reads last.

Real 2-rank `torchrun --standalone` runs of configs/debug.toml in which one rank (only) reads
a corrupt manifest (tests/_rank_failure_entry.py makes `load_manifest` raise the project's
DatasetError there) while the other enters the sharding planner's collectives. The failing
rank prints its one line; the other's broken collective prints no traceback, only the same
line (genci_dist/errors.py); torchrun's ChildFailedError summary names the failing rank as
the root cause with that line as its traceback, and that line is the summary's last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _line(rank: int) -> str:
    return (f"genci-train: error: rank {rank}: data/debug-tiny/manifest.json: line 1: not "
            f"valid JSON (injected on rank {rank} by the test)")


@pytest.mark.parametrize("fail_rank, own_store", [(1, False), (0, True)],
                         ids=["rank 1 fails, torchrun's store",
                              "rank 0 fails and takes the store (launchers' setting)"])
def test_failing_rank_line_is_the_root_cause_and_last(tmp_path: Path, fail_rank: int,
                                                      own_store: bool) -> None:
    """own_store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (as launchers/ and README run
    torchrun): rank 0 hosts the store, so when rank 0 fails the store goes with it and rank 1
    finds the line in rank 0's error file."""
    line, other = _line(fail_rank), 1 - fail_rank
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {k: v for k, v in os.environ.items()
           if k not in ("GENCI_DEBUG", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env["GENCI_TEST_FAIL_RANK"] = str(fail_rank)
    if own_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
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
    assert ours and set(ours) == {line}, err
    assert workers.count("Traceback (most recent call last)") == 1, err
    assert "genci_dist/" not in workers and "gloo" not in workers.lower(), err
    # the root cause is the failing rank, its traceback field is the line, then only "==="
    assert f"rank      : {fail_rank} (local_rank: {fail_rank})" in summary, err
    # exit code 2, or SIGTERM when the other rank exited first and torchrun stopped this one
    # during its interpreter shutdown (it has printed and recorded its line by then)
    assert "exitcode  : 2 " in summary or "exitcode  : -15 " in summary, err
    tail = [x for x in summary.strip().splitlines() if x.strip("=")]
    assert tail[-1] == f"  traceback : {line}", err
    # the other rank's entry (if torchrun recorded one) points at the failing rank's error
    entry = f"rank      : {other} (local_rank: {other})"
    if entry in workers:
        rest = workers.split(entry)[1]
        assert any(x in rest for x in ("stopped after another rank's error: " + line,
                                       "Signal 15 (SIGTERM)", "To enable traceback")), err
    assert not (tmp_path / "run" / "steps.jsonl").exists()
