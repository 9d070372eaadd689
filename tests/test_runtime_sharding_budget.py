"""The planner plans against the real per-rank memory: `sharding.memory_budget_gb` (0 = host RAM
/ local ranks) minus the runtime reserve becomes the Topology's ddr_cap; its per-rank estimate
counts each shard's weights and the fused optimizer's state; a model that cannot fit fails on
every rank with one line naming the tables, their sizes and the budget, before DMP allocates
anything. Tables are declared on the meta device, so 10^8-row tables cost nothing here."""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

import genci_dist.runtime.sharding as sharding
from genci_dist.config_loader import ConfigError
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import (
    GB,
    RUNTIME_RESERVE_GB,
    MemoryBudgetError,
    ShardingConfig,
    build_dmp,
    build_topology,
    describe_plan,
    memory_budget,
    plan_sharding,
)

ROOT = Path(__file__).resolve().parents[1]


class TwoTables(torch.nn.Module):
    """A big item table and a small user table on the meta device, plus a dense layer."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_item_id", embedding_dim=dim, num_embeddings=rows,
                               feature_names=["item_id"]),
            EmbeddingBagConfig(name="t_user_id", embedding_dim=dim, num_embeddings=1000,
                               feature_names=["user_id"])], device=torch.device("meta"))
        self.mlp = torch.nn.Linear(2 * dim, 1)


def _env(local_world: int = 1) -> DistEnv:
    return DistEnv(0, local_world, 0, local_world, torch.device("cpu"), None, None)


class _NoDMP:
    """Stands in for DistributedModelParallel: reaching it means the check came too late."""

    def __init__(self, *a: object, **k: object) -> None:
        raise AssertionError("DistributedModelParallel was reached: tables would be allocated")


def test_auto_budget_is_host_ram_over_local_ranks() -> None:
    ram = psutil.virtual_memory().total
    b = memory_budget(ShardingConfig(), _env(local_world=2))
    assert b.total_bytes == ram // 2
    assert b.planner_bytes == ram // 2 - int(RUNTIME_RESERVE_GB * GB)
    assert "host RAM" in b.source and "2 local ranks" in b.source
    topo = build_topology(_env(2), b)
    # on CPU TorchRec stores tables in ddr and gives the device no hbm at all
    assert [d.storage.ddr for d in topo.devices] == [b.planner_bytes] * 2
    assert [d.storage.hbm for d in topo.devices] == [0, 0]
    explicit = memory_budget(ShardingConfig(memory_budget_gb=3.5), _env(2))
    assert explicit.total_bytes == 3_500_000_000
    assert explicit.source == "sharding.memory_budget_gb = 3.5"


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_budget_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="sharding.memory_budget_gb"):
        memory_budget(ShardingConfig(memory_budget_gb=bad), _env())


@pytest.mark.parametrize("optimizer,state_per_row", [("sgd", 0), ("rowwise_adagrad", 4),
                                                      ("adagrad", 4 * 16)])
def test_estimate_counts_weights_and_fused_optimizer_state(optimizer: str,
                                                           state_per_row: int) -> None:
    """10^6 × 16 fp32 = 64 MB of weights; fbgemm's state is 4 B per row (rowwise_adagrad),
    4 B per element (adagrad) or nothing (sgd). TorchRec's own estimator adds only the
    shard's input/output buffers (batch 512: well under 1 MB)."""
    env = DistEnv.init("cpu", require_pg=True)
    try:
        cfg = ShardingConfig(default_type="row_wise", memory_budget_gb=5,
                             sparse_optimizer=optimizer)  # type: ignore[arg-type]
        plan = plan_sharding(TwoTables(10**6, 16), env, cfg)
        est = plan.memory
        assert est is not None
        kind, got = est.per_rank[0]["t_item_id"]
        assert kind == "row_wise"
        want = 10**6 * 16 * 4 + 10**6 * state_per_row
        assert want <= got <= want + 1_000_000
        assert est.rank_bytes(0) == (int(RUNTIME_RESERVE_GB * GB) + est.reserved_bytes
                                     + got + est.per_rank[0]["t_user_id"][1])
        text = describe_plan(plan)
        assert "of 5.00 GB budget (t_item_id row_wise" in text
        assert f"rank 0: {est.rank_bytes(0) / GB:.2f} GB" in text
    finally:
        env.destroy()


@pytest.mark.parametrize("budget,why", [(0.001, "below the runtime reserve"),
                                        (RUNTIME_RESERVE_GB + 1e-4, "planner:")])
def test_debug_model_with_tiny_budget_fails_before_dmp(tiny_dataset: Path, budget: float,
                                                       why: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The debug config's GenCI on a tiny dataset: a budget below the runtime reserve fails
    at once; one just above it (0.1 MB for the planner) fails in the planner, translated."""
    from data_pipes.schema import feature_specs, load_manifest
    from genci_dist.config import load_config
    from genci_dist.model.build import build_task, load_generation_assets

    monkeypatch.setattr(sharding, "DistributedModelParallel", _NoDMP)
    cfg = load_config(ROOT / "configs/debug.toml", [])
    m = load_manifest(tiny_dataset)
    task = build_task(cfg.model, feature_specs(m), load_generation_assets(tiny_dataset, m,
                                                                          cfg.model),
                      torch.device("meta"))
    names = sharding.table_names(task)
    env = DistEnv.init("cpu", require_pg=True)
    try:
        with pytest.raises(MemoryBudgetError) as err:
            build_dmp(task, env, ShardingConfig(memory_budget_gb=budget))
    finally:
        env.destroy()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"sharding.memory_budget_gb = {budget:g}: tables need ")
    assert why in msg and "over 1 rank" in msg and "raise the budget" in msg
    # the four largest tables are named with their shapes; the rest are counted
    sizes = sharding.table_sizes(task, ShardingConfig())
    assert {t.name for t in sizes} == set(names)
    for t in sizes[:4]:
        assert f"{t.name} {t.rows}×{t.cols} fp32" in msg
    if len(sizes) > 4:
        assert f"{len(sizes) - 4} more" in msg


def test_huge_table_fails_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """10^9 × 64 fp32 (256 GB) under the auto budget of this host: refused by the planner on
    the meta model; the process did not grow (nothing was materialised)."""
    monkeypatch.setattr(sharding, "DistributedModelParallel", _NoDMP)
    env = DistEnv.init("cpu", require_pg=True)
    try:
        model = TwoTables(10**9, 64)
        rss0 = psutil.Process().memory_info().rss
        with pytest.raises(MemoryBudgetError, match=r"tables need 260\.0 GB with rowwise_adagrad "
                                                    r"state \(t_item_id 1000000000×64 fp32 = "
                                                    r"256\.0 GB \+ 4\.00 GB state"):
            build_dmp(model, env, ShardingConfig())
        assert psutil.Process().memory_info().rss - rss0 < 200e6
    finally:
        env.destroy()


# ---- two real gloo ranks ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    env = DistEnv.init("cpu", require_pg=True)
    lines = []
    try:
        # 10^8 × 32 fp32 = 12.8 GB (+0.4 GB rowwise state) with 8 GB per rank: no single rank
        # holds it, so the planner must split it; pinned table_wise it cannot fit at all.
        plan = plan_sharding(TwoTables(10**8, 32), env, ShardingConfig(memory_budget_gb=8))
        ps = plan.plan["ebc"]["t_item_id"]  # type: ignore[index]
        est = plan.memory
        assert est is not None
        lines.append(f"auto {ps.sharding_type} {sorted(ps.ranks)} "
                     f"{est.per_rank[0]['t_item_id'][1]} {est.per_rank[1]['t_item_id'][1]}")
        try:
            plan_sharding(TwoTables(10**8, 32), env,
                          ShardingConfig(memory_budget_gb=8, tables={"t_item_id": "table_wise"}))
            lines.append("table_wise planned")
        except MemoryBudgetError as e:
            lines.append(f"error {e}")
        env.barrier()   # both ranks leave together (no rank tears gloo down under the other)
    finally:
        env.destroy()
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))


def test_two_ranks_split_a_table_no_rank_can_hold_and_both_fail_together(
        tmp_path: Path) -> None:
    mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    got = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert got[0] == got[1]  # the plan and the failure reach both ranks identically
    fields = got[0][0].split()
    kind, ranks = fields[1], " ".join(fields[2:-2])
    est0, est1 = int(fields[-2]), int(fields[-1])
    assert kind in ("row_wise", "table_row_wise") and ranks == "[0, 1]"
    half = 10**8 // 2 * (32 * 4 + 4)   # 6.6 GB: half the rows with their rowwise state
    for est in (est0, est1):
        assert half <= est <= half * 1.01
    err = got[0][1]
    assert err.startswith("error sharding.memory_budget_gb = 8: tables need 13.2 GB with "
                          "rowwise_adagrad state (t_item_id 100000000×32 fp32 = 12.8 GB + "
                          "0.40 GB state, t_user_id 1000×32 fp32 = 128.0 KB) over 2 ranks")
    assert "use row_wise (the config pins ['table_wise'])" in err


# ---- fp16 tables -----------------------------------------------------------------------------
def test_fp16_tables_halve_the_weights_in_the_estimate_and_the_shards() -> None:
    """10^6 × 16 at 2 bytes = 32 MB plus the rowwise state (4 MB, fp32 either way); the
    materialised shard is fp16."""
    env = DistEnv.init("cpu", require_pg=True)
    try:
        cfg = ShardingConfig(default_type="row_wise", table_dtype="fp16")
        plan = plan_sharding(TwoTables(10**6, 16), env, cfg)
        assert plan.memory is not None
        got = plan.memory.per_rank[0]["t_item_id"][1]
        assert 10**6 * (16 * 2 + 4) <= got <= 10**6 * (16 * 2 + 4) + 1_000_000
        with pytest.raises(MemoryBudgetError, match=re.escape("t_item_id 1000000×16 fp16 = 32.0 MB + 4.0 MB state")):
            plan_sharding(TwoTables(10**6, 16), env,
                          ShardingConfig(table_dtype="fp16", memory_budget_gb=0.5))
        small = TwoTables(1000, 16)
        dmp, _ = build_dmp(small, env, ShardingConfig(table_dtype="fp16"))
        weights = {k: v for k, v in dmp.state_dict().items() if "embedding_bags" in k}
        assert set(weights) == {"ebc.embedding_bags.t_item_id.weight",
                                "ebc.embedding_bags.t_user_id.weight"}
        assert {v.dtype for v in weights.values()} == {torch.float16}
    finally:
        env.destroy()


def test_fp16_keeps_pinned_data_parallel_tables_fp32() -> None:
    model = TwoTables(1000, 16)
    cfg = ShardingConfig(tables={"t_user_id": "data_parallel"}, table_dtype="fp16")
    assert sharding.apply_table_dtype(model, cfg) == ["t_item_id"]
    bags = model.ebc.embedding_bags
    assert bags["t_item_id"].weight.dtype == torch.float16
    assert bags["t_user_id"].weight.dtype == torch.float32
    # the tables left to the planner are not offered data_parallel under fp16
    cons = sharding.build_constraints(model, cfg)
    assert "data_parallel" not in cons["t_item_id"].sharding_types
    assert cons["t_user_id"].sharding_types == ["data_parallel"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_debug_genci_trains_with_fp16_tables(tiny_dataset: Path, dtype: str) -> None:
    """The debug config's GenCI, its tables fp16 (fp32 as the reference): 3 epochs over the
    tiny dataset lower the loss by about as much as fp32 does."""
    from data_pipes.schema import feature_specs, load_manifest
    from data_pipes.stream import build_loader
    from genci_dist.config import load_config
    from genci_dist.model.build import batch_fields, build_task, load_generation_assets
    from genci_dist.runtime.sharding import build_optimizer

    cfg = load_config(ROOT / "configs/debug.toml", [])
    m = load_manifest(tiny_dataset)
    torch.manual_seed(0)
    task = build_task(cfg.model, feature_specs(m), load_generation_assets(tiny_dataset, m,
                                                                          cfg.model),
                      torch.device("meta"))
    env = DistEnv.init("cpu", require_pg=True)
    try:
        dmp, plan = build_dmp(task, env, ShardingConfig(table_dtype=dtype))  # type: ignore
        assert plan.memory is not None
        opt = build_optimizer(dmp, 3e-3)
        epochs: list[float] = []
        for epoch in range(3):
            loader = build_loader(tiny_dataset, "train", batch_size=32, seed=epoch,
                                  **batch_fields(cfg.model))
            losses = []
            for batch in loader:
                loss, _parts, _logits, _labels = dmp(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            epochs.append(sum(losses) / len(losses))
        tables = [v for k, v in dmp.state_dict().items() if "embedding" in k
                  and hasattr(v, "local_shards")]
        assert tables and all(t.dtype == getattr(torch, {"fp32": "float32",
                                                        "fp16": "float16"}[dtype])
                               for t in tables)
    finally:
        env.destroy()
    assert epochs[-1] < epochs[0] * 0.95, epochs


# ---- checkpoint memory -------------------------------------------------------------------------
@pytest.mark.parametrize("own", [False, True])
def test_large_tables_get_their_own_tbe_so_dcp_writes_their_shard_without_a_copy(
        own: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP's FileSystemWriter clones a tensor whose storage is larger than itself (a view)
    before torch.save; tables grouped in one TBE are views into its shared buffer. A table
    over OWN_TBE_BYTES gets its own TBE: its shard and its optimizer state are whole
    storages. (10^4 × 16 fp32 = 640 KB against a threshold of 100 KB, or of 1 TB.)"""
    monkeypatch.setattr(sharding, "OWN_TBE_BYTES", 100_000 if own else 10**12)
    env = DistEnv.init("cpu", require_pg=True)
    try:
        dmp, _ = build_dmp(TwoTables(10**4, 16), env, ShardingConfig(default_type="row_wise"))
        opt = sharding.build_optimizer(dmp, 1e-3)
        w = dmp.state_dict()["ebc.embedding_bags.t_item_id.weight"].local_shards()[0].tensor
        m = opt.state_dict()["state"]["sparse.ebc.embedding_bags.t_item_id.weight"][
            "t_item_id.momentum1"]
        m = m.local_shards()[0].tensor if hasattr(m, "local_shards") else m
    finally:
        env.destroy()
    assert w.shape == (10**4, 16) and m.shape == (10**4,)
    # grouped, t_item_id's rows and rowwise momenta share buffers with t_user_id's (1000 rows)
    assert w.untyped_storage().size() == (10**4 * 16 * 4 if own else 11_000 * 16 * 4)
    assert m.untyped_storage().size() == (10**4 * 4 if own else 11_000 * 4)
