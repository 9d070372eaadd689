"""Real multi-process runs (gloo, spawned ranks) of the trainer and evaluator: a checkpoint
written by 2 table-wise ranks reloads in 1 plain process and in 2 row-wise ranks with the same
metrics; a resumed run continues with exactly the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from genci_dist.evaluate import main as evaluate_main
from genci_dist.train import main as train_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, entry: str, args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      HF_HUB_OFFLINE="1")
    fn = train_main if entry == "train" else evaluate_main
    assert fn(args) == 0


def _spawn(world: int, entry: str, args: list[str]) -> None:
    mp.spawn(_worker, args=(world, _free_port(), entry, args), nprocs=world, join=True)


def _train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--data.dir", str(data), "--data.source", "none", "--data.batch_size", "32",
            "--data.eval_batch_size", "64", "--data.num_workers", "0", "--data.max_history", "5",
            "--train.run_dir", str(run), "--train.progress_bar", "false",
            "--train.tensorboard", "false", "--train.log_every", "1000", "--train.seed", "3",
            "--model.mlp", "[16]", "--model.dropout", "0.0", *extra]


def _metrics(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())


def test_two_rank_table_wise_checkpoint_reshards(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _spawn(2, "train", _train_args(tiny_dataset, run, "--model.name", "din",
                                   "--sharding.default_type", "table_wise",
                                   "--train.max_steps", "6", "--checkpoint.resume", "never"))
    trained = _metrics(run / "metrics.json")["test"]
    plan = (run / "plan.txt").read_text()
    assert "table_wise" in plan and "t_din_history" in plan
    best = run / "checkpoints" / "best"
    # (a) one process, plain unsharded modules, no process group
    assert evaluate_main(["--checkpoint", str(best), "--split", "test",
                          "--out", str(tmp_path / "plain.json")]) == 0
    plain = _metrics(tmp_path / "plain.json")
    # (b) two ranks with every table row-wise (DCP reshards TW → RW)
    _spawn(2, "evaluate", ["--checkpoint", str(best), "--split", "test", "--out",
                           str(tmp_path / "rw.json"), "--sharding.default_type", "row_wise"])
    rw = _metrics(tmp_path / "rw.json")
    for other in (plain, rw):
        assert other["samples"] == trained["samples"]
        assert other["auc"] == pytest.approx(trained["auc"], abs=1e-6)
        assert other["logloss"] == pytest.approx(trained["logloss"], abs=1e-6)
    # (c) the same checkpoint scored under bf16 autocast (as a bf16 run's validation is):
    # really applied (the scores move) and close to fp32
    assert evaluate_main(["--checkpoint", str(best), "--split", "test", "--out",
                          str(tmp_path / "bf16.json"), "--train.autocast_bf16", "true"]) == 0
    bf16 = _metrics(tmp_path / "bf16.json")
    assert bf16["autocast_bf16"] is True and plain["autocast_bf16"] is False
    assert bf16["logloss"] != plain["logloss"]
    assert bf16["logloss"] == pytest.approx(plain["logloss"], abs=1e-2)


def _steps(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_continues_with_the_same_losses(tiny_dataset: Path, tmp_path: Path) -> None:
    common = ("--model.name", "deepfm", "--model.deepfm_dropout", "0.2",  # dropout: RNG matters
              "--checkpoint.every_n_steps", "4", "--train.epochs", "3")
    full = tmp_path / "full"
    assert train_main(_train_args(tiny_dataset, full, *common, "--train.max_steps", "14",
                                  "--checkpoint.resume", "never")) == 0
    part = tmp_path / "part"
    assert train_main(_train_args(tiny_dataset, part, *common, "--train.max_steps", "6",
                                  "--checkpoint.resume", "never")) == 0
    # step 6 stops mid-epoch; the latest checkpoint is the one written at that stop
    assert train_main(_train_args(tiny_dataset, part, *common, "--train.max_steps", "14",
                                  "--checkpoint.resume", "auto")) == 0
    a, b = _steps(full), _steps(part)
    assert sorted(b) == list(range(1, 15))
    for step in range(7, 15):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def _plan_types(run: Path) -> dict[str, str]:
    table = (run / "plan.txt").read_text().split("\n\n")[0]  # the memory estimate follows
    rows = [line.split() for line in table.splitlines()[1:]]
    return {r[1]: r[2] for r in rows}


def test_resume_at_another_world_size_keeps_the_checkpoint_sharding(tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    """A run checkpointed by 1 rank resumes at 2 ranks and trains on to its last step. The
    planner's own choice differs with the world size (here, as in the ML-1M GenCI run, the
    2-rank planner makes a table data_parallel that 1 rank had row_wise: dense optimizer
    state the checkpoint does not have, and DCP refused the load with "Missing key ...
    optim.state.dense..."). Tables the config leaves to the planner keep the checkpoint's
    sharding types."""
    run = tmp_path / "run"
    common = ("--model.name", "deepfm", "--checkpoint.every_n_steps", "2", "--train.epochs", "3")
    assert train_main(_train_args(tiny_dataset, run, *common, "--train.max_steps", "4",
                                  "--checkpoint.resume", "never")) == 0
    first = _plan_types(run)
    _spawn(2, "train", _train_args(tiny_dataset, run, *common, "--train.max_steps", "8",
                                   "--checkpoint.resume", "auto"))
    assert _plan_types(run) == first
    assert "[0, 1]" in (run / "plan.txt").read_text()          # really 2 ranks
    assert sorted(_steps(run)) == list(range(1, 9))
