"""The distributed partitioned prepare: a real TorchX job (launchers/components.py:prepare,
local_cwd, 2 ranks on this host, each taking partitions and buckets rank::2) writes exactly the
files of the one-process partitioned prepare (same sha256 for every shard, same manifest), and
a bad input under torchrun ends both ranks with one error line, leaving nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from data_pipes.partitioned import prepare_partitioned
from tests.test_prepare_partitioned import ml_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"     # torchx's local_cwd runs torchrun
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_torchx_2x1_equals_one_process(tmp_path: Path) -> None:
    src = ml_folder(tmp_path / "raw")
    one, two = tmp_path / "one", tmp_path / "two"
    opts = ["--row-group-size", "16", "--shard-rows", "48", "--seed", "7"]
    prepare_partitioned(src, one, shape="ml", partitions=5, seed=7, row_group_size=16,
                        shard_rows=48)
    r = subprocess.run([str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg",
                        f"log_dir={tmp_path / 'logs'}", "launchers/components.py:prepare",
                        "--nproc_per_node", "2", "--rdzv_port", str(free_port()), "--",
                        "--dataset", "recbole", "--source", str(src), "--partitions", "5",
                        "--out", str(two), "--no-progress", *opts],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"ranks": 2' in r.stdout + r.stderr
    m1 = json.loads((one / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert m2 == m1 and m1["source"]["partitions"] == 5
    assert len([f for f in m1["files"] if f.startswith("sequences/")]) >= 5
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not (tmp_path / ".two.partitioned").exists()


def test_torchrun_bad_input_one_line_on_every_rank(tmp_path: Path) -> None:
    src = ml_folder(tmp_path / "raw", n=40)
    (src / "mini.inter").write_text((src / "mini.inter").read_text() + "7\t3\t4\tlate\n")
    out = tmp_path / "out"
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                        "data_pipes.partitioned_job", "--dataset", "recbole", "--source", str(src),
                        "--partitions", "2", "--out", str(out), "--no-progress"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    line = (f"genci-prepare: error: {src / 'mini.inter'}: data row 41: field 'timestamp' = "
            "'late' is not a number")
    assert r.returncode != 0
    assert [x for x in r.stderr.splitlines() if "genci-prepare: error" in x] == [line]
    assert not out.exists() and not (tmp_path / ".out.partitioned").exists()
