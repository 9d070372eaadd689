"""Data-parallel parity with real gloo processes: training DIN (EBC + sequence EC + MLP) for K
steps on 2 ranks, each rank taking one half of every global batch, equals training it in one
process on the whole global batches — loss trajectory and every final weight — when both start
from the same weights and the updates are linear in the gradient (fused exact SGD for the
tables, torch SGD for the dense part). This is the notes §3 contract: DMP/DDP give each step
the gradient of the global-batch mean loss (the average of the ranks' mean-loss gradients)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from data_pipes.collate import build_batch
from data_pipes.schema import feature_specs, load_manifest
from data_pipes.sequences import read_split_samples
from genci_dist.config import JobConfig, load_config
from genci_dist.model.build import build_task
from genci_dist.runtime.checkpoint import load_model_only, load_model_sharded
from genci_dist.runtime.distributed import DistEnv

GLOBAL_BATCH = 32
STEPS = 6
SPARSE_LR = 0.5
DENSE_LR = 0.2
# float32 reductions run in another order on 2 ranks (per-rank means then an average, pooled
# sums split over row-wise shards). Measured after 6 steps: max |Δw| ≤ 6e-8 (a few ulps) in
# every tensor, while training moved every tensor by ≥ 2e-4; a semantic error (e.g. summed
# instead of averaged gradients, a rank training on the wrong half) changes weights by the
# order of that movement. 1e-6 sits between the two.
WEIGHT_TOL = 1e-6
LOSS_TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(data_dir: str, sharding: str) -> JobConfig:
    return load_config(None, [
        "--data.dir", data_dir, "--data.source", "none", "--data.max_history", "5",
        "--model.name", "din", "--model.mlp", "[16, 8]", "--model.din_attention_mlp", "[8]",
        "--model.dropout", "0.0", "--model.attn_dropout", "0.0", "--model.deepfm_dropout", "0.0",
        "--sharding.default_type", sharding, "--sharding.sparse_optimizer", "sgd",
        "--sharding.sparse_lr", str(SPARSE_LR)])


def _train_table(data_dir: Path) -> pa.Table:
    """The whole train split as sample rows, then a fixed row permutation (mixes users)."""
    table = read_split_samples(data_dir, "train").to_table()
    perm = np.random.default_rng(0).permutation(table.num_rows)
    return table.take(perm)


def _parity_worker(rank: int, world: int, port: int, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = DistEnv.init("cpu", require_pg=True)
    try:
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from genci_dist.runtime.sharding import build_dmp

        torch.manual_seed(0)
        cfg = _config(data_dir, "table_wise" if world == 1 else "row_wise")
        features = feature_specs(load_manifest(Path(data_dir)))
        task = build_task(cfg.model, features, None, device=torch.device("meta"))
        dmp, _plan = build_dmp(task, env, cfg.sharding)
        init = Path(out) / "init"
        if world == 1:  # the reference run fixes the start weights for both runs
            dcp.save({"model": dmp.state_dict()}, checkpoint_id=str(init))
        else:           # DCP reshards the one-rank table-wise weights into row-wise shards
            load_model_sharded(dmp, init)
        dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        dense_opt = torch.optim.SGD(dense, lr=DENSE_LR)
        table = _train_table(Path(data_dir))
        half = GLOBAL_BATCH // world
        losses = []
        for step in range(STEPS):
            start = step * GLOBAL_BATCH + rank * half
            rows = table.slice(start, half)
            batch = build_batch(rows, features, np.arange(start, start + half), None,
                                where="parity", max_history=5)
            loss, _parts, _logits, _labels = dmp(batch)
            dense_opt.zero_grad()
            loss.backward()          # fused SGD updates the table rows inside backward
            dense_opt.step()
            mean = env.all_reduce_sum(loss.detach().clone()) / world
            losses.append(float(mean))
        dcp.save({"model": dmp.state_dict()}, checkpoint_id=str(Path(out) / f"final_w{world}"))
        if rank == 0:
            torch.save({"losses": losses}, Path(out) / f"losses_w{world}.pt")
    finally:
        env.destroy()


def _plain(data_dir: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    cfg = _config(str(data_dir), "table_wise")
    model = build_task(cfg.model, feature_specs(load_manifest(data_dir)), None,
                       device=torch.device("cpu"))
    load_model_only(model, ckpt)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_ranks_on_half_batches_equal_one_rank_on_whole_batches(
        tiny_dataset: Path, tmp_path: Path) -> None:
    """Per-step global loss and all final weights (3 EBC tables, the DIN history EC, the
    attention and head MLPs) agree between 1 rank (TW) and 2 ranks (RW) within WEIGHT_TOL,
    while training moved them far more than that."""
    assert _train_table(tiny_dataset).num_rows >= STEPS * GLOBAL_BATCH
    for world in (1, 2):
        mp.spawn(_parity_worker, args=(world, _free_port(), str(tiny_dataset), str(tmp_path)),
                 nprocs=world, join=True)
    one = torch.load(tmp_path / "losses_w1.pt", weights_only=False)
    two = torch.load(tmp_path / "losses_w2.pt", weights_only=False)
    assert len(one["losses"]) == STEPS
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=LOSS_TOL)
    assert one["losses"][-1] != pytest.approx(one["losses"][0], abs=1e-3)  # it trained

    init = _plain(tiny_dataset, tmp_path / "init")
    w1 = _plain(tiny_dataset, tmp_path / "final_w1")
    w2 = _plain(tiny_dataset, tmp_path / "final_w2")
    assert set(w1) == set(w2) == set(init)
    tables = [k for k in w1 if "embedding" in k]
    assert len(tables) >= 4 and any("t_din_history" in k for k in tables)
    for name in w1:
        diff = (w1[name] - w2[name]).abs().max().item()
        assert diff <= WEIGHT_TOL, (name, diff)
        moved = (w1[name] - init[name]).abs().max().item()
        assert moved > 50 * WEIGHT_TOL, (name, moved)  # each tensor was really updated
