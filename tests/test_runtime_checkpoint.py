"""Checkpoints with real gloo ranks and the real Trainer (DIN: sharded EBC + sequence EC):
(a) a run stopped at step k and resumed in fresh processes logs the uninterrupted run's losses;
(b) a 2-rank table-wise checkpoint loads into the plain unsharded task in one process (no
process group) and into 2 row-wise ranks, with identical weights and evaluation metrics;
(c) a save that fails after dcp.save and before publishing leaves `latest` on the previous
checkpoint, which still loads; (d) a checkpoint of another model config is refused; (e) the
wall time of an epoch killed mid-way and resumed counts the killed process's part.

Two spawned 2-rank groups carry all of it: phase 1 trains run A (uninterrupted), run B (to
step k) and makes the interrupted save; phase 2 resumes B, reloads A's checkpoint row-wise and
tries to resume A with another model config. The parent checks the files they leave."""

from __future__ import annotations

import json
import os
import socket
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor

import genci_dist.runtime.checkpoint as ckpt_mod
from data_pipes.schema import feature_specs, load_manifest
from data_pipes.stream import build_loader
from genci_dist.config import ConfigError, JobConfig, load_config
from genci_dist.model.build import build_task
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.checkpoint import CheckpointManager, load_model_only
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.evaluation import evaluate_loader

K_STOP = 2        # run B stops here (a checkpoint every 2 steps)
SLOW_STEP_S = 1.0  # run K's interrupted steps (e)
TOTAL = 7         # 5 steps per epoch (270 rows, 2 × 32): the resumed part crosses an epoch end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(data: str, run: str, *extra: str) -> JobConfig:
    return load_config(None, [
        "--data.dir", data, "--data.source", "none", "--data.batch_size", "64",
        "--data.eval_batch_size", "64", "--data.num_workers", "0", "--data.max_history", "5",
        "--train.run_dir", run, "--train.progress_bar", "false", "--train.tensorboard", "false",
        "--train.log_every", "1000", "--train.seed", "3", "--train.epochs", "3",
        "--model.name", "din", "--model.mlp", "[16]", "--model.din_attention_mlp", "[8]",
        "--model.dropout", "0.2",  # dropout: the resumed run must also restore the RNG
        "--sharding.default_type", "table_wise", "--checkpoint.every_n_steps", str(K_STOP),
        *extra])


def _pieces(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's part of every state tensor: ("sharded", size, [(offsets, tensor)]) for a
    ShardedTensor, ("full", tensor) for a replicated one."""
    out: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, ShardedTensor):
            out[k] = ("sharded", tuple(v.size()),
                      [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                       for s in v.local_shards()])
        elif isinstance(v, torch.Tensor):
            out[k] = ("full", v.detach().clone())
        else:
            raise TypeError(f"{k}: unexpected state type {type(v)}")
    return out


def _assemble(per_rank: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full tensors from all ranks' pieces; every element covered exactly once, replicated
    (DDP) tensors identical on every rank."""
    full: dict[str, torch.Tensor] = {}
    for k, first in per_rank[0].items():
        if first[0] == "full":
            for other in per_rank[1:]:
                assert torch.equal(other[k][1], first[1]), f"{k} differs across ranks"
            full[k] = first[1]
            continue
        size = first[1]
        t = torch.zeros(size)
        hits = torch.zeros(size, dtype=torch.int64)
        for rank in per_rank:
            for off, shard in rank[k][2]:
                idx = tuple(slice(o, o + n) for o, n in zip(off, shard.shape, strict=True))
                t[idx] = shard
                hits[idx] += 1
        assert bool((hits == 1).all()), f"{k}: shards do not tile the table"
        full[k] = t
    return full


def _init(rank: int, world: int, port: int) -> DistEnv:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    return DistEnv.init("cpu", require_pg=True)


def _phase1(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    from genci_dist.runtime.trainer import Trainer

    env = _init(rank, world, port)
    out = Path(tmp)
    try:
        a = Trainer(_config(data, str(out / "A"), "--train.max_steps", str(TOTAL),
                            "--checkpoint.resume", "never"), env)
        a.fit()  # ends with A's best checkpoint loaded into the model
        torch.save(_pieces(a.dmp), out / f"A_best_pieces{rank}.pt")

        b = Trainer(_config(data, str(out / "B"), "--train.max_steps", str(K_STOP),
                            "--checkpoint.resume", "never"), env)
        b.fit()

        # (c) one good save, then one that dies after dcp.save, before publishing
        mgr = CheckpointManager(out / "C" / "checkpoints", env)
        kw = dict(model=b.dmp, optimizer=b.optimizer, scheduler=b.scheduler,
                  loader=b.train_loader, train_state=b._train_state(), config=b.cfg,
                  semantic_hash=b.semantic_hash, metric=None, plan=b.plan)
        mgr.save(step=1, **kw)
        torch.save(_pieces(b.dmp), out / f"C_pieces{rank}.pt")
        real = ckpt_mod.dcp

        def save_then_crash(*args: Any, **kwargs: Any) -> None:
            real.save(*args, **kwargs)
            raise RuntimeError("simulated crash after dcp.save")

        ckpt_mod.dcp = types.SimpleNamespace(save=save_then_crash, load=real.load)
        try:
            mgr.save(step=2, **kw)
            crashed = False
        except RuntimeError as e:
            crashed = "simulated crash" in str(e)
        finally:
            ckpt_mod.dcp = real
        torch.save({"crashed": crashed}, out / f"C_crash{rank}.pt")

        # (e) run K is killed mid-epoch, after its step-2 checkpoint: its steps take >= 1 s
        # each, and validation "kills" the process before anything else is recorded
        k = Trainer(_config(data, str(out / "K"), "--train.max_steps", "3",
                            "--checkpoint.resume", "never"), env)
        step = k.optimizer.step

        def slow_step(*args: Any, **kwargs: Any) -> Any:
            time.sleep(SLOW_STEP_S)
            return step(*args, **kwargs)

        def killed(split: str) -> dict[str, float]:
            raise KeyboardInterrupt("simulated kill")

        k.optimizer.step = slow_step  # type: ignore[method-assign]
        k.evaluate = killed  # type: ignore[method-assign]
        try:
            k.fit()
        except KeyboardInterrupt:
            pass
    finally:
        env.destroy()


def _phase2(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    from genci_dist.runtime.checkpoint import load_model_sharded
    from genci_dist.runtime.sharding import build_dmp
    from genci_dist.runtime.trainer import Trainer

    env = _init(rank, world, port)
    out = Path(tmp)
    try:
        # (a) fresh processes resume run B from its latest checkpoint (step K_STOP)
        Trainer(_config(data, str(out / "B"), "--train.max_steps", str(TOTAL),
                        "--checkpoint.resume", "auto"), env).fit()

        # (b) A's table-wise checkpoint into 2 row-wise ranks
        cfg = _config(data, str(out / "RW"), "--sharding.default_type", "row_wise")
        features = feature_specs(load_manifest(Path(data)))
        task = build_task(cfg.model, features, None, device=torch.device("meta"))
        dmp, plan = build_dmp(task, env, cfg.sharding)
        load_model_sharded(dmp, out / "A" / "checkpoints" / "best")
        loader = build_loader(data, "test", batch_size=32, rank=rank, world_size=world,
                              shuffle=False, with_tokens=False, max_history=5)
        metrics = evaluate_loader(dmp, loader, env)
        kinds = {ps.sharding_type for params in plan.plan.values()
                 for ps in params.values()}  # type: ignore[union-attr]
        torch.save({"pieces": _pieces(dmp), "metrics": metrics, "kinds": kinds},
                   out / f"RW{rank}.pt")

        # (d) resuming run A with another model config is refused
        try:
            Trainer(_config(data, str(out / "A"), "--model.embedding_dim", "8",
                            "--checkpoint.resume", "auto"), env)
            refused = ""
        except ConfigError as e:
            refused = str(e)
        torch.save({"refused": refused}, out / f"D{rank}.pt")

        # (e) run K resumes from its step-2 checkpoint, at full speed, to step 4
        Trainer(_config(data, str(out / "K"), "--train.max_steps", "4",
                        "--checkpoint.resume", "auto"), env).fit()
    finally:
        env.destroy()


def _spawn(fn: Any, data: Path, tmp: Path) -> None:
    mp.spawn(fn, args=(2, _free_port(), str(data), str(tmp)), nprocs=2, join=True)


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _steps(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _plain_model(data: Path) -> torch.nn.Module:
    cfg = _config(str(data), "unused")
    return build_task(cfg.model, feature_specs(load_manifest(data)), None,
                      device=torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    _spawn(_phase1, tiny_dataset, tmp)
    (tmp / "A" / "config.before.toml").write_text((tmp / "A" / "config.toml").read_text())
    _spawn(_phase2, tiny_dataset, tmp)
    return tmp


def test_resume_in_fresh_processes_continues_the_same_losses(runs: Path) -> None:
    """Run B, stopped at step 2 and resumed by new ranks, logs steps 3..7 with run A's
    losses (weights, fused/dense optimizer state, loader position and RNG restored)."""
    a, b = _steps(runs / "A"), _steps(runs / "B")
    assert sorted(a) == sorted(b) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # not trivially equal: a restart from scratch would repeat steps 1.. instead
    assert any(abs(a[s] - a[s - K_STOP]) > 1e-3 for s in range(K_STOP + 1, TOTAL + 1))
    meta = json.loads((runs / "B" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["step"] == TOTAL and meta["world_size"] == 2
    # the reported training time covers both processes' parts, not only the resumed one
    metrics = json.loads((runs / "B" / "metrics.json").read_text())
    parts = [r["epoch_s"] for r in metrics["history"]]
    assert len(parts) >= 2 and metrics["history"][0]["step"] == K_STOP  # [0]: first process
    assert metrics["train_wall_s"] == pytest.approx(sum(parts))
    assert metrics["process_wall_s"] >= sum(parts[1:]) and parts[0] > 0


def test_an_interrupted_epochs_time_is_carried_into_the_resumed_run(runs: Path) -> None:
    """Run K was killed after its step-2 checkpoint (2 steps of >= 1 s); the resumed process
    reports epoch 0's time including them: more than its own whole wall time."""
    state = _load(runs / "K" / "checkpoints" / "latest" / "train_state.pt")["train"]
    assert state["step"] == 4 and state["epoch_elapsed_s"] == 0.0  # recorded in history now
    metrics = json.loads((runs / "K" / "metrics.json").read_text())
    (epoch0,) = metrics["history"]
    assert epoch0["epoch"] == 0 and epoch0["step"] == 4
    assert epoch0["epoch_s"] >= 2 * SLOW_STEP_S
    assert epoch0["epoch_s"] > metrics["process_wall_s"]  # only the carry can make it so
    assert metrics["train_wall_s"] == pytest.approx(epoch0["epoch_s"])


def test_table_wise_checkpoint_loads_plain_and_row_wise(runs: Path, tiny_dataset: Path) -> None:
    """A's TW best checkpoint: the plain 1-process model (no process group) and 2 RW ranks
    hold bit-identical weights equal to the TW ranks' shards, and give the same test metrics
    as the training run (which evaluated on the TW ranks)."""
    tw = _assemble([_load(runs / f"A_best_pieces{r}.pt") for r in range(2)])
    rw_runs = [_load(runs / f"RW{r}.pt") for r in range(2)]
    assert rw_runs[0]["kinds"] == {"row_wise"}
    assert "table_wise" in (runs / "A" / "plan.txt").read_text()
    rw = _assemble([r["pieces"] for r in rw_runs])
    model = _plain_model(tiny_dataset)
    assert not torch.distributed.is_initialized()
    load_model_only(model, runs / "A" / "checkpoints" / "best")
    plain = model.state_dict()
    assert set(plain) == set(tw) == set(rw)
    assert any("t_din_history" in k for k in plain)
    for k in plain:
        assert torch.equal(plain[k], tw[k]), k
        assert torch.equal(rw[k], tw[k]), k

    loader = build_loader(tiny_dataset, "test", batch_size=64, shuffle=False,
                          with_tokens=False, max_history=5)
    got = evaluate_loader(model, loader, DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None))
    trained = json.loads((runs / "A" / "metrics.json").read_text())["test"]
    assert got["samples"] == trained["samples"] == rw_runs[0]["metrics"]["samples"] == 60
    for other in (trained, rw_runs[0]["metrics"], rw_runs[1]["metrics"]):
        for key in ("auc", "gauc", "logloss", "positive_rate"):
            assert got[key] == pytest.approx(other[key], abs=1e-6), key


def test_interrupted_save_keeps_latest_on_previous_checkpoint(
        runs: Path, tiny_dataset: Path) -> None:
    """The save of step 2 crashed after its shards were written: `latest` still names step 1,
    step 2 exists only as an unpublished .tmp, and `latest` loads step 1's weights."""
    root = runs / "C" / "checkpoints"
    assert all(_load(runs / f"C_crash{r}.pt")["crashed"] for r in range(2))
    assert os.readlink(root / "latest") == "step-0000001"
    assert (root / "step-0000002.tmp" / ".metadata").is_file()  # dcp.save had finished
    assert not (root / "step-0000002").exists()
    assert not (root / "step-0000002.tmp" / "meta.json").exists()
    expected = _assemble([_load(runs / f"C_pieces{r}.pt") for r in range(2)])
    model = _plain_model(tiny_dataset)
    load_model_only(model, root)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_checkpoint_of_another_model_config_is_refused(runs: Path, tiny_dataset: Path) -> None:
    """Resuming A with model.embedding_dim 8 fails on every rank with a ConfigError naming the
    cause (and leaves A's run folder as it was); so does a direct load_latest."""
    for r in range(2):
        msg = _load(runs / f"D{r}.pt")["refused"]
        assert "another model config" in msg and "embedding_dim" in msg, msg
    assert (runs / "A" / "config.toml").read_text() == \
        (runs / "A" / "config.before.toml").read_text()
    other = _config(str(tiny_dataset), str(runs / "A"), "--model.mlp", "[32]")
    mgr = CheckpointManager(runs / "A" / "checkpoints",
                            DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None))
    with pytest.raises(ConfigError, match="another model config"):
        mgr.load_latest(model=_plain_model(tiny_dataset), optimizer=None, scheduler=None,
                        loader=None, config=other, semantic_hash="")
    same = _config(str(tiny_dataset), str(runs / "A"), "--sharding.default_type", "row_wise")
    assert ckpt_mod.fingerprint(same) == json.loads(
        (runs / "A" / "checkpoints" / "latest" / "meta.json").read_text())["fingerprint"]


def test_execution_only_model_fields_do_not_block_a_resume(runs: Path, tiny_dataset: Path
                                                           ) -> None:
    """Another attention kernel, block, slice size or cross-attention form computes the same
    function: A's checkpoint loads under them, also when its stored fingerprint has fields a
    later version dropped from it or lacks fields a later version added."""
    meta_path = runs / "A" / "checkpoints" / "latest" / "meta.json"
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), None, None)
    mgr = CheckpointManager(runs / "A" / "checkpoints", env)
    other = _config(str(tiny_dataset), str(runs / "A"), "--model.attention", "eager",
                    "--model.attention_block", "2", "--model.generator_chunk", "3",
                    "--model.absorb_cross_attention", "false", "--model.reuse_cross_kv", "true")
    ckpt = ckpt_mod.resolve(runs / "A" / "checkpoints" / "latest")
    meta = json.loads(meta_path.read_text())
    assert mgr._check(ckpt, other, meta["semantic_hash"])
    stored = meta["fingerprint"]
    assert not ModelConfig.EXECUTION_FIELDS & stored["model"].keys()
    older = {**stored, "model": {**stored["model"], "attention": "sdpa",
                                 "reuse_cross_kv": False}}     # an older, fuller fingerprint
    assert ckpt_mod._identity(older) == ckpt_mod.fingerprint(other)
    changed = {**older, "model": {**older["model"], "d_model": 999}}
    assert ckpt_mod._identity(changed) != ckpt_mod.fingerprint(other)


def _early_stop_twice(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    from genci_dist.runtime.trainer import Trainer

    env = _init(rank, world, port)
    try:
        # lr 1e-30 (0 is refused): below every weight's float32 resolution, so valid AUC
        # never improves after epoch 0 and patience 1 stops after epoch 1
        args = ("--train.epochs", "5", "--train.patience", "1", "--train.lr", "1e-30",
                "--sharding.sparse_lr", "1e-30", "--model.dropout", "0.0",
                "--checkpoint.every_n_steps", "0")
        Trainer(_config(data, tmp, *args, "--checkpoint.resume", "never"), env).fit()
        (Path(tmp) / "steps.first").write_text((Path(tmp) / "steps.jsonl").read_text())
        Trainer(_config(data, tmp, *args, "--checkpoint.resume", "auto"), env).fit()
    finally:
        env.destroy()


def test_rerunning_an_early_stopped_run_trains_no_further(tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    """Re-running a finished run's command (reproduce.sh continues unfinished runs that way)
    resumes after early stopping and must not train another epoch."""
    mp.spawn(_early_stop_twice, args=(1, _free_port(), str(tiny_dataset), str(tmp_path)),
             nprocs=1, join=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [0, 1]
    assert metrics["best_epoch"] == 0
    assert (tmp_path / "steps.jsonl").read_text() == (tmp_path / "steps.first").read_text()
