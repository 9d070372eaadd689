"""The one module that owns sharding: planner, DistributedModelParallel, optimizers, LR schedule.

CPU facts this module encodes (shared/notes/torchrec-on-cpu.md §3): TorchRec's sharders offer
ROW_WISE / TABLE_ROW_WISE only for CUDA, although both run on CPU, so `_AllTypes*Sharder`
re-open them; fbgemm's CPU kernels fuse only EXACT_SGD / EXACT_ADAGRAD /
EXACT_ROWWISE_ADAGRAD into backward (fused Adam asserts); a FUSED kernel with no optimizer
silently runs SGD at lr 0.01, so the optimizer is always passed explicitly.

Memory. The planner plans against the real per-rank memory: `sharding.memory_budget_gb` (0 =
host RAM / local ranks; on CUDA the device's memory) less RUNTIME_RESERVE_GB is each rank's
Topology capacity (on CPU TorchRec stores tables in `ddr`; its `hbm` is 0). Its storage
estimate gets the fused optimizer's state added (TorchRec counts none for fused_params), and
the per-rank total (tables + TorchRec's dense/input reservation + the runtime reserve) is
printed under the plan and saved in RUN/plan.txt; measured on DeepFM with a 10^8-row item
table on 2 ranks it is within 3 % of each rank's RSS (16 wide: 4.00 GB estimated, 3.91-3.96
GB measured; 32 wide: 7.20 vs 7.17). Planning runs on the meta-device model, so a model that
cannot fit fails on every rank (MemoryBudgetError, a ConfigError) before DMP allocates
anything, naming the tables, their sizes and the budget. `sharding.table_dtype = "fp16"`
halves the fused tables' weights. Tables of OWN_TBE_BYTES or more get a TBE of their own, so
checkpointing writes their shard without copying it (see there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_sharding import USE_ONE_TBE_PER_TABLE
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from genci_dist.config_loader import ConfigError
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.memory_plan import (  # noqa: F401 - re-exported
    GB,
    RUNTIME_RESERVE_GB,
    MemoryBudget,
    MemoryBudgetError,
    MemoryEstimate,
    PlannedSharding,
    TableSize,
    _budget_error,
    _plan,
    _StateAwareStorageEstimator,
    build_topology,
    memory_budget,
    table_sizes,
)
from genci_dist.runtime.sharding_config import (  # noqa: F401 - re-exported
    _CPU_FUSED,
    _TYPES,
    ShardingConfig,
    ShardingName,
)


class _AllTypesEBCSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t.value for t in _TYPES.values()]


# TorchRec 1.8's sharded EmbeddingCollection implements only these four (its
# create_embedding_sharding raises "Sharding not supported" for TWRW/TWCW/GRID).
_EC_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")


def ec_types(device_type: str) -> tuple[str, ...]:
    """The EmbeddingCollection sharding types that work on `device_type`. On CPU, not
    data_parallel: its kernel, fbgemm's dense TBE, pools each bag on CPU whatever the
    PoolingMode.NONE TorchRec asks for, so the lookup returns one row per bag instead of one
    per id (TorchRec then fails in split_with_sizes; tests/test_runtime_standin.py checks
    that this still holds)."""
    return tuple(t for t in _EC_TYPES if not (t == "data_parallel" and device_type == "cpu"))


class _AllTypesECSharder(EmbeddingCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [_TYPES[t].value for t in ec_types(compute_device_type)]


def fused_params(cfg: ShardingConfig) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kinds = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    if cfg.sparse_optimizer not in _CPU_FUSED:
        raise ValueError(f"sharding.sparse_optimizer {cfg.sparse_optimizer!r}: fbgemm's CPU "
                         f"kernels fuse only {_CPU_FUSED}")
    out: dict[str, Any] = {"optimizer": kinds[cfg.sparse_optimizer],
                           "learning_rate": cfg.sparse_lr}
    if cfg.sparse_optimizer != "sgd":
        out["eps"] = cfg.sparse_eps
    return out


def build_sharders(cfg: ShardingConfig) -> list[Any]:
    fp = fused_params(cfg)
    return [_AllTypesEBCSharder(fused_params=fp), _AllTypesECSharder(fused_params=fp)]


def table_names(model: torch.nn.Module, sequence_only: bool = False) -> list[str]:
    """Names of the tables of every EBC (unless sequence_only) and EC inside `model`."""
    names = []
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection) and not sequence_only:
            names += [c.name for c in m.embedding_bag_configs()]
        elif isinstance(m, EmbeddingCollection):
            names += [c.name for c in m.embedding_configs()]
    return names


def keep_sharding_types(cfg: ShardingConfig, saved: dict[str, str], model: torch.nn.Module
                        ) -> tuple[ShardingConfig, dict[str, str]]:
    """(cfg with the tables it leaves to the planner pinned to their `saved` sharding types,
    the pinned {table: type}). For a resumed run: the planner's choice depends on the world
    size (2 ranks made a tiny table data_parallel where 1 rank had it row_wise), and a table
    that moves between data_parallel (dense optimizer state) and a fused sharding (the
    fused optimizer's state) leaves optimizer state the checkpoint does not have. Tables the
    config names, or all of them under a default_type other than "auto", keep the config's
    choice; only tables of this model are pinned."""
    if cfg.default_type != "auto":
        return cfg, {}
    known = set(table_names(model))
    pinned = {t: kind for t, kind in saved.items()
              if t in known and t not in cfg.tables and kind in _TYPES}
    if not pinned:
        return cfg, {}
    return replace(cfg, tables={**cfg.tables, **pinned}), pinned


def build_constraints(model: torch.nn.Module, cfg: ShardingConfig, device_type: str = "cpu"
                      ) -> dict[str, Any]:
    """ParameterConstraints pinning each table to its configured sharding type."""
    out = {}
    sequence = set(table_names(model, sequence_only=True))
    for name in table_names(model):
        kind = cfg.tables.get(name, cfg.default_type)
        if kind == "auto" and cfg.table_dtype == "fp16":
            kinds = _EC_TYPES if name in sequence else tuple(_TYPES)
            out[name] = ParameterConstraints(
                sharding_types=[_TYPES[k].value for k in kinds if k != "data_parallel"],
                compute_kernels=["fused"], min_partition=cfg.min_partition)
            continue
        if kind == "auto":
            continue
        if kind not in _TYPES:
            raise ValueError(f"sharding: table {name!r}: unknown sharding type {kind!r}")
        if name in sequence and kind not in ec_types(device_type):
            where = (f"sharding.tables.{name}" if name in cfg.tables
                     else "sharding.default_type")
            why = (f"whose data_parallel lookup pools each bag on {device_type} (fbgemm's "
                   f"dense kernel)" if kind in _EC_TYPES else "which TorchRec shards only as "
                   f"{list(_EC_TYPES)}")
            raise ValueError(f"{where} = {kind!r}: table {name!r} belongs to an "
                             f"EmbeddingCollection, {why}; set sharding.tables.{name} to one "
                             f"of {list(ec_types(device_type))}")
        kernel = "dense" if kind == "data_parallel" else "fused"
        out[name] = ParameterConstraints(sharding_types=[_TYPES[kind].value],
                                         compute_kernels=[kernel],
                                         min_partition=cfg.min_partition)
    unknown = set(cfg.tables) - set(table_names(model))
    if unknown:
        raise ValueError(f"sharding.tables names unknown table(s) {sorted(unknown)}; the model "
                         f"has {table_names(model)}")
    return out


def _tables(model: torch.nn.Module) -> Iterator[tuple[Any, Any]]:
    """(table config, the module dict holding its weight) of every EBC/EC table of `model`."""
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            configs, modules = m._embedding_bag_configs, m.embedding_bags
        elif isinstance(m, EmbeddingCollection):
            configs, modules = m._embedding_configs, m.embeddings
        else:
            continue
        for c in configs:
            yield c, modules


def apply_table_dtype(model: torch.nn.Module, cfg: ShardingConfig) -> list[str]:
    """Under sharding.table_dtype = "fp16", re-declares every table of `model` that is not
    pinned data_parallel as fp16 (its EmbeddingBagConfig/EmbeddingConfig data_type, which the
    sharder passes to fbgemm as weights_precision, and its parameter, so the planner sizes it
    at 2 bytes per value). Cheap on the meta device; on CPU the values are rounded to fp16.
    Returns the converted table names."""
    if cfg.table_dtype not in ("fp32", "fp16"):
        raise ConfigError(f"sharding.table_dtype = {cfg.table_dtype!r}: expected 'fp32' or "
                          f"'fp16'")
    if cfg.table_dtype == "fp32":
        return []
    converted = []
    for c, modules in _tables(model):
        if (cfg.tables.get(c.name, cfg.default_type) == "data_parallel"
                or c.data_type == DataType.FP16):
            continue
        c.data_type = DataType.FP16
        w = modules[c.name].weight
        modules[c.name].weight = torch.nn.Parameter(w.detach().to(torch.float16),
                                                    requires_grad=w.requires_grad)
        converted.append(c.name)
    return converted


def build_planner(model: torch.nn.Module, cfg: ShardingConfig, topology: Topology
                  ) -> EmbeddingShardingPlanner:
    """The planner the trainer uses, on any topology (the trainer's real one, or a simulated
    cluster's in `genci_dist.bench.projection`): the config's per-table constraints, and a
    storage estimate that counts the fused optimizer's state."""
    constraints = build_constraints(model, cfg, topology.compute_device)
    enumerator = EmbeddingEnumerator(
        topology=topology, batch_size=BATCH_SIZE, constraints=constraints,
        estimator=[EmbeddingPerfEstimator(topology=topology, constraints=constraints),
                   _StateAwareStorageEstimator(topology, constraints, cfg.sparse_optimizer)])
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                    enumerator=enumerator, debug=False)


def plan_sharding(model: torch.nn.Module, env: DistEnv, cfg: ShardingConfig,
                  sharders: list[Any] | None = None) -> PlannedSharding:
    """Plans on rank 0 against the per-rank memory budget and shares the plan (or the failure)
    with every rank. Raises MemoryBudgetError on every rank when the tables cannot fit; only
    the meta-device model has been looked at by then. Applies sharding.table_dtype to the
    model's tables first (`apply_table_dtype`)."""
    sharders = sharders if sharders is not None else build_sharders(cfg)
    apply_table_dtype(model, cfg)
    budget = memory_budget(cfg, env)
    if budget.planner_bytes <= 0:
        raise MemoryBudgetError(_budget_error(model, cfg, env, budget,
                                              why="the budget is below the runtime reserve"))
    planner = build_planner(model, cfg, build_topology(env, budget))
    status, value = invoke_on_rank_and_broadcast_result(env.pg, 0, _plan, planner, model,
                                                        sharders, budget)
    if status == "error":
        reserved, reason = value
        raise MemoryBudgetError(_budget_error(model, cfg, env, budget, reserved,
                                              why=f"planner: {reason}"))
    plan, estimate = value
    return PlannedSharding(plan=plan.plan, memory=estimate)


# A table at least this large (its weights) gets a TBE of its own. Tables grouped in one fbgemm
# TBE share one flat weight buffer, so each table's shard in the state dict is a view into a
# larger storage, and DCP's FileSystemWriter clones every such view before torch.save (a view
# would drag the whole storage into the file): checkpointing copied the big table's shard in
# full (1-rank 2×10^7×16 table beside two small ones: +1.36 GB peak RSS during dcp.save). In
# a TBE of its own the shard is the whole storage and is written without a copy (+0.00 GB).
# Small tables stay grouped: fewer kernels per step, and their copies cost nothing.
OWN_TBE_BYTES = 64 * 10**6


def own_tbe_for_large_tables(model: torch.nn.Module, min_bytes: int | None = None
                             ) -> list[str]:
    """Marks every table of `model` with at least `min_bytes` (default OWN_TBE_BYTES) of
    weights to get its own TBE (TorchRec's per-table fused param `use_one_tbe_per_table`,
    read from the parameter's `_optimizer_kwargs` as apply_optimizer_in_backward sets them).
    Returns their names."""
    min_bytes = OWN_TBE_BYTES if min_bytes is None else min_bytes
    marked = []
    for c, modules in _tables(model):
        w = modules[c.name].weight
        if w.numel() * w.element_size() >= min_bytes:
            kwargs = getattr(w, "_optimizer_kwargs", [{}])
            w._optimizer_kwargs = [{**kwargs[0], USE_ONE_TBE_PER_TABLE: True}]
            marked.append(c.name)
    return marked


def build_dmp(model: torch.nn.Module, env: DistEnv, cfg: ShardingConfig
              ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans against the per-rank memory budget (`plan_sharding`, which fails before any
    allocation when the tables cannot fit) and wraps `model` (built on meta or CPU) in DMP:
    sharded tables with fused optimizers, the dense rest under DDP. The plan returned is a
    PlannedSharding carrying the planner's memory estimate."""
    if env.pg is None:
        raise RuntimeError("build_dmp needs a process group (DistEnv.init(require_pg=True))")
    sharders = build_sharders(cfg)
    plan = plan_sharding(model, env, cfg, sharders)
    own_tbe_for_large_tables(model)
    dmp = DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(env.pg), device=env.device, plan=plan,
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=cfg.static_graph, find_unused_parameters=cfg.find_unused_parameters))
    return dmp, plan


def build_optimizer(dmp: DistributedModelParallel, lr: float, weight_decay: float = 0.0
                    ) -> CombinedOptimizer:
    """Fused sparse optimizer (already in backward) + dense Adam, as one KeyedOptimizer."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense_opt = KeyedOptimizerWrapper(
        dense, lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense_opt)])


def build_lr_scheduler(optimizer: CombinedOptimizer, warmup_steps: int, total_steps: int,
                       kind: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """Scales the dense learning rate: linear warmup, then constant or cosine to 0."""
    dense = dict(optimizer.optimizers)["dense"]

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "cosine" and total_steps > warmup_steps:
            t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(dense, factor)


def describe_plan(plan: ShardingPlan) -> str:
    """A readable table: module, table, sharding type, kernel, ranks; then, for a plan from
    `plan_sharding`, the planner's memory estimate per rank against the budget."""
    lines = [f"{'module':<28} {'table':<22} {'sharding':<16} {'kernel':<8} ranks"]
    for module, params in plan.plan.items():
        for table, ps in params.items():  # type: ignore[union-attr]
            lines.append(f"{module:<28} {table:<22} {ps.sharding_type:<16} "
                         f"{ps.compute_kernel:<8} {ps.ranks}")
    memory = getattr(plan, "memory", None)
    if memory is not None:  # after a blank line: the table above stays one row per table
        lines += ["", memory.describe()]
    return "\n".join(lines)


def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """The plan as JSON-able data: {module: {table: {sharding_type, compute_kernel, ranks,
    shards: [{offsets, sizes, placement}]}}} (saved in every checkpoint's meta.json)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for module, params in plan.plan.items():
        out[module] = {}
        for table, ps in params.items():  # type: ignore[union-attr]
            spec = ps.sharding_spec
            shards = [] if spec is None else [
                {"offsets": list(sh.shard_offsets), "sizes": list(sh.shard_sizes),
                 "placement": str(sh.placement)} for sh in spec.shards]  # type: ignore[union-attr]
            out[module][table] = {"sharding_type": ps.sharding_type,
                                  "compute_kernel": ps.compute_kernel,
                                  "ranks": list(ps.ranks or []), "shards": shards}
    return out
