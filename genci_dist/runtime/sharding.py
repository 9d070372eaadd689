"""The one module that owns sharding: planner, DistributedModelParallel, optimizers, LR schedule.

CPU facts this module encodes (shared/notes/torchrec-on-cpu.md §3): TorchRec's sharders offer
ROW_WISE / TABLE_ROW_WISE only for CUDA, although both run on CPU, so `_AllTypes*Sharder`
re-open them; fbgemm's CPU kernels fuse only EXACT_SGD / EXACT_ADAGRAD /
EXACT_ROWWISE_ADAGRAD into backward (fused Adam asserts); a FUSED kernel with no optimizer
silently runs SGD at lr 0.01, so the optimizer is always passed explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from genci_dist.runtime.distributed import DistEnv

ShardingName = Literal["auto", "table_wise", "row_wise", "column_wise", "table_row_wise",
                       "table_column_wise", "data_parallel"]
_TYPES = {"table_wise": ShardingType.TABLE_WISE, "row_wise": ShardingType.ROW_WISE,
          "column_wise": ShardingType.COLUMN_WISE, "table_row_wise": ShardingType.TABLE_ROW_WISE,
          "table_column_wise": ShardingType.TABLE_COLUMN_WISE,
          "data_parallel": ShardingType.DATA_PARALLEL}
_CPU_FUSED = ("sgd", "adagrad", "rowwise_adagrad")


@dataclass(frozen=True)
class ShardingConfig:
    """How embedding tables are sharded and optimised."""

    default_type: ShardingName = "auto"
    """Sharding type for every table without an override ("auto" = the planner's choice)."""
    tables: dict[str, str] = field(default_factory=dict)
    """Per-table overrides: {table name: sharding type}."""
    sparse_optimizer: Literal["sgd", "adagrad", "rowwise_adagrad"] = "rowwise_adagrad"
    """Fused into backward by fbgemm (the only three its CPU kernels offer)."""
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    static_graph: bool = True
    """DDP static_graph for the dense part (unused-parameter safe, see notes §4)."""
    find_unused_parameters: bool = False
    min_partition: int = 8
    """Column-wise shard width floor (lets 16-wide tables split across 2 ranks)."""

    def __post_init__(self) -> None:
        for name, kind in self.tables.items():
            if kind not in _TYPES:
                raise ValueError(f"sharding.tables.{name}: {kind!r} is not one of "
                                 f"{sorted(_TYPES)}")


class _AllTypesEBCSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t.value for t in _TYPES.values()]


# TorchRec 1.8's sharded EmbeddingCollection implements only these four (its
# create_embedding_sharding raises "Sharding not supported" for TWRW/TWCW/GRID).
_EC_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")


class _AllTypesECSharder(EmbeddingCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [_TYPES[t].value for t in _EC_TYPES]


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


def build_constraints(model: torch.nn.Module, cfg: ShardingConfig) -> dict[str, Any]:
    """ParameterConstraints pinning each table to its configured sharding type."""
    out = {}
    sequence = set(table_names(model, sequence_only=True))
    for name in table_names(model):
        kind = cfg.tables.get(name, cfg.default_type)
        if kind == "auto":
            continue
        if kind not in _TYPES:
            raise ValueError(f"sharding: table {name!r}: unknown sharding type {kind!r}")
        if name in sequence and kind not in _EC_TYPES:
            where = (f"sharding.tables.{name}" if name in cfg.tables
                     else "sharding.default_type")
            raise ValueError(f"{where} = {kind!r}: table {name!r} belongs to an "
                             f"EmbeddingCollection, which TorchRec shards only as "
                             f"{list(_EC_TYPES)}; set sharding.tables.{name} to one of them")
        kernel = "dense" if kind == "data_parallel" else "fused"
        out[name] = ParameterConstraints(sharding_types=[_TYPES[kind].value],
                                         compute_kernels=[kernel],
                                         min_partition=cfg.min_partition)
    unknown = set(cfg.tables) - set(table_names(model))
    if unknown:
        raise ValueError(f"sharding.tables names unknown table(s) {sorted(unknown)}; the model "
                         f"has {table_names(model)}")
    return out


def build_dmp(model: torch.nn.Module, env: DistEnv, cfg: ShardingConfig
              ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans on a Topology of the real world size/device and wraps `model` (built on meta or
    CPU) in DMP: sharded tables with fused optimizers, the dense rest under DDP."""
    if env.pg is None:
        raise RuntimeError("build_dmp needs a process group (DistEnv.init(require_pg=True))")
    sharders = build_sharders(cfg)
    topology = Topology(world_size=env.world_size, compute_device=env.device.type,
                        local_world_size=env.local_world_size)
    planner = EmbeddingShardingPlanner(topology=topology,
                                       constraints=build_constraints(model, cfg))
    plan = planner.collective_plan(model, sharders, env.pg)
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
    """A readable table: module, table, sharding type, kernel, ranks."""
    lines = [f"{'module':<28} {'table':<22} {'sharding':<16} {'kernel':<8} ranks"]
    for module, params in plan.plan.items():
        for table, ps in params.items():  # type: ignore[union-attr]
            lines.append(f"{module:<28} {table:<22} {ps.sharding_type:<16} "
                         f"{ps.compute_kernel:<8} {ps.ranks}")
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
