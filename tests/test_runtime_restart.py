"""A rank SIGKILLed after a checkpoint comes back: real `torchrun --max-restarts=1` with 2 gloo
ranks, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (as launchers/ and the TorchX component set it;
without it torchrun's restarted ranks die in init_process_group on the dead rank's address,
pytorch/pytorch#135712). Rank 1 kills itself after step 6 (checkpoint at step 4, test-only
hook GENCI_TEST_SIGKILL); torchrun restarts both ranks, they resume from step 4 and finish
with the uninterrupted run's weights, optimizer state, LR schedule, step losses and metrics,
bit for bit, every step (hence every sample) counted once in the logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(data: Path, run: Path, env_extra: dict[str, str]) -> str:
    args = ["--data.dir", str(data), "--data.source", "none", "--data.batch_size", "32",
            "--data.eval_batch_size", "64", "--data.num_workers", "0",
            "--data.max_history", "5", "--train.run_dir", str(run),
            "--train.progress_bar", "false", "--train.tensorboard", "false",
            "--train.log_every", "1000", "--train.seed", "3", "--train.epochs", "3",
            "--train.max_steps", "8", "--model.name", "deepfm", "--model.mlp", "[16]",
            "--model.deepfm_dropout", "0.2",  # dropout: the RNG state must come back too
            "--checkpoint.every_n_steps", "4", "--checkpoint.resume", "auto"]
    env = {k: v for k, v in os.environ.items() if k != "GENCI_TEST_SIGKILL"}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env_extra}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", "-m", "genci_dist.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    return log


def _state(run: Path, tmp: Path) -> dict[str, Any]:
    """The final checkpoint's every tensor and value (shards stitched), in one process."""
    out = tmp / f"{run.name}.pt"
    dcp_to_torch_save(run / "checkpoints" / "latest", out)
    return torch.load(out, weights_only=False)  # written by this test just now


def _equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_killed_rank_is_restarted_and_resumes_bit_identically(
        tiny_dataset: Path, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    _torchrun(tiny_dataset, full, {})
    marker = tmp_path / "killed.marker"
    log = _torchrun(tiny_dataset, killed, {"GENCI_TEST_SIGKILL": f"1:6:{marker}"})
    assert marker.is_file()                              # rank 1 really died (once)
    assert "[resume] step 4, epoch 0" in log, log[-3000:]  # ... and the restart resumed

    a, b = _state(full, tmp_path), _state(killed, tmp_path)
    assert {"model", "optim", "sched"} <= a.keys() and a["optim"]["state"], a.keys()
    _equal(a, b)                                          # weights, optimizer, LR schedule

    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["test"] == mb["test"] and ma["best_valid_auc"] == mb["best_valid_auc"]
    assert [(r["step"], r["train"], r["valid"]) for r in ma["history"]] == \
        [(r["step"], r["train"], r["valid"]) for r in mb["history"]]

    # steps.jsonl: the killed attempt's steps 5-6 (past its checkpoint) were run again and
    # are logged once; every logged step has the uninterrupted run's losses
    rows_a = [json.loads(x) for x in (full / "steps.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    assert rows_a == rows_b
