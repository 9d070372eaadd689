"""Memory of a sharding plan: the per-rank budget the planner plans against
(`sharding.memory_budget_gb`, 0 = host RAM / local ranks, less `RUNTIME_RESERVE_GB`), the
Topology built from it, a storage estimator that counts the fused optimizer's state (TorchRec
counts none for fused params), the per-rank estimate printed under the plan, and the early,
one-line failure when the tables cannot fit. `genci_dist.runtime.sharding` plans with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingStorageEstimator,
)
from torchrec.distributed.planner.types import PlannerError, Storage
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from genci_dist.config_loader import ConfigError
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding_config import ShardingConfig

# ---- memory: the planner's budget, its per-rank estimate, and the early failure ----------
# Process baseline a rank holds before any table: the interpreter with torch, torchrec,
# fbgemm and a gloo group measured 0.50 GB RSS on this host; the rest covers the reader's
# buffers and allocator slack. The dense model, its Adam state and DDP buckets (6 × its
# parameters) and the input KJTs are reserved by the planner itself (TorchRec's
# HeuristicalStorageReservation), so they are not in this figure.
RUNTIME_RESERVE_GB = 0.6
GB = 1e9

# Optimizer state fbgemm's fused CPU kernels keep per shard, as bytes per row (fp32):
# rowwise_adagrad one momentum per row, adagrad one per element, sgd none. TorchRec's
# storage estimator counts it only for tables whose parameters carry `_optimizer_classes`
# (apply_optimizer_in_backward), never for fused_params, so it is added here.
_STATE_PER_ROW = {"sgd": lambda cols: 0, "adagrad": lambda cols: 4 * cols,
                  "rowwise_adagrad": lambda cols: 4}
# A data_parallel table is a plain DDP parameter under the dense Adam: gradient, DDP bucket
# copy, exp_avg and exp_avg_sq beside the weights.
_DP_EXTRA = 4


class MemoryBudgetError(ConfigError):
    """The tables do not fit the per-rank memory budget (raised on every rank, before DMP
    allocates anything)."""


@dataclass(frozen=True)
class TableSize:
    name: str
    rows: int
    cols: int
    dtype: str
    weight_bytes: int
    state_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

    def describe(self) -> str:
        state = f" + {_gb(self.state_bytes)} state" if self.state_bytes >= 1e6 else ""
        return f"{self.name} {self.rows}×{self.cols} {self.dtype} = {_gb(self.weight_bytes)}{state}"


def _gb(n: float) -> str:
    """Bytes in decimal units, about three significant digits: 12.8 GB, 3.40 GB, 32.0 MB."""
    if n >= 9.995e9:
        return f"{n / GB:.1f} GB"
    if n >= 0.995e8:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 0.995e6 else f"{n / 1e3:.1f} KB"


def table_sizes(model: torch.nn.Module, cfg: ShardingConfig) -> list[TableSize]:
    """Every EBC/EC table of `model` with its weight bytes (from its declared dtype) and the
    fused optimizer's state, largest first."""
    out = []
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            configs: list[Any] = list(m.embedding_bag_configs())
        elif isinstance(m, EmbeddingCollection):
            configs = list(m.embedding_configs())
        else:
            continue
        for c in configs:
            dtype = data_type_to_dtype(c.data_type)
            size = dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty(
                0, dtype=dtype).element_size()
            out.append(TableSize(c.name, c.num_embeddings, c.embedding_dim,
                                 str(c.data_type.value).lower(),
                                 c.num_embeddings * c.embedding_dim * size,
                                 c.num_embeddings * _STATE_PER_ROW[cfg.sparse_optimizer](
                                     c.embedding_dim)))
    return sorted(out, key=lambda t: -t.bytes)


@dataclass(frozen=True)
class MemoryBudget:
    """Per-rank memory: the whole budget, where it came from, and what the planner gets."""

    total_bytes: int
    source: str
    """e.g. "auto: host RAM 25.3 GB / 2 local ranks" or "sharding.memory_budget_gb = 2"."""
    reserve_bytes: int

    @property
    def planner_bytes(self) -> int:
        return self.total_bytes - self.reserve_bytes


def memory_budget(cfg: ShardingConfig, env: DistEnv) -> MemoryBudget:
    """sharding.memory_budget_gb, or (0) host RAM / local ranks — on CUDA the device's memory
    (torch.cuda.mem_get_info's total) — each less RUNTIME_RESERVE_GB for the process."""
    gb = cfg.memory_budget_gb
    if not (isinstance(gb, (int, float)) and math.isfinite(gb) and gb >= 0):
        raise ConfigError(f"sharding.memory_budget_gb = {gb!r}: expected a number of GB ≥ 0 "
                          f"(0 = host RAM / local ranks)")
    if gb > 0:
        total, source = int(gb * GB), f"sharding.memory_budget_gb = {gb:g}"
    elif env.device.type == "cuda":
        total = torch.cuda.mem_get_info(env.device)[1]
        source = f"auto: {env.device} memory {_gb(total)}"
    else:
        import psutil

        ram = psutil.virtual_memory().total
        total = ram // max(1, env.local_world_size)
        source = (f"sharding.memory_budget_gb = 0 (auto: host RAM {_gb(ram)} / "
                  f"{env.local_world_size} local rank{'s' * (env.local_world_size > 1)})")
    return MemoryBudget(total, source, int(RUNTIME_RESERVE_GB * GB))


def build_topology(env: DistEnv, budget: MemoryBudget) -> Topology:
    """The planner's Topology with the budget as each rank's storage: on CPU TorchRec places
    tables (and its dense/KJT reservation) in `ddr` and gives the CPU no `hbm` at all; on
    CUDA in `hbm`, with the host's share as `ddr` (for UVM kernels)."""
    cap = max(0, budget.planner_bytes)
    if env.device.type == "cuda":
        import psutil

        host = psutil.virtual_memory().total // max(1, env.local_world_size)
        return Topology(world_size=env.world_size, compute_device="cuda", hbm_cap=cap,
                        ddr_cap=host, local_world_size=env.local_world_size)
    return Topology(world_size=env.world_size, compute_device=env.device.type, ddr_cap=cap,
                    local_world_size=env.local_world_size)


class _StateAwareStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimate plus the fused optimizer's state (see _STATE_PER_ROW) and,
    for data_parallel tables, the dense optimizer's (see _DP_EXTRA)."""

    def __init__(self, topology: Topology, constraints: Any, optimizer: str) -> None:
        super().__init__(topology=topology, constraints=constraints)
        self._per_row = _STATE_PER_ROW[optimizer]

    def estimate(self, sharding_options: list[Any], sharder_data_map: Any = None) -> None:
        super().estimate(sharding_options, sharder_data_map)
        hbm = self._topology.compute_device in ("cuda", "mtia")
        for so in sharding_options:
            dp = so.sharding_type == ShardingType.DATA_PARALLEL.value
            for shard in so.shards:
                rows, cols = shard.size[0], shard.size[1]
                extra = (_DP_EXTRA * rows * cols * so.tensor.element_size() if dp
                         else rows * self._per_row(cols))
                st = shard.storage
                shard.storage = Storage(hbm=st.hbm + extra * hbm, ddr=st.ddr + extra * (not hbm),
                                        ssd=st.ssd)


@dataclass(frozen=True)
class MemoryEstimate:
    """The planner's per-rank storage: {table: (sharding type, bytes)} for each rank, its
    dense + input reservation, the runtime reserve, and the budget."""

    budget: MemoryBudget
    reserved_bytes: int
    per_rank: list[dict[str, tuple[str, int]]]

    def rank_bytes(self, rank: int) -> int:
        return (self.budget.reserve_bytes + self.reserved_bytes
                + sum(b for _, b in self.per_rank[rank].values()))

    def describe(self) -> str:
        lines = [f"memory per rank ({self.budget.source}; estimate = tables + "
                 f"{_gb(self.reserved_bytes)} dense/inputs + {_gb(self.budget.reserve_bytes)} "
                 f"runtime)"]
        for r, tables in enumerate(self.per_rank):
            ranked = sorted(tables.items(), key=lambda kv: -kv[1][1])
            parts = ", ".join(f"{t} {kind} {_gb(b)}" for t, (kind, b) in ranked[:3])
            if len(ranked) > 3:
                parts += (f", {len(ranked) - 3} more "
                          f"{_gb(sum(b for _, (_, b) in ranked[3:]))}")
            lines.append(f"rank {r}: {_gb(self.rank_bytes(r))} of "
                         f"{_gb(self.budget.total_bytes)} budget ({parts or 'no tables'})")
        return "\n".join(lines)


@dataclass
class PlannedSharding(ShardingPlan):
    """A ShardingPlan carrying the planner's memory estimate (describe_plan prints it)."""

    memory: MemoryEstimate | None = None


def _budget_error(model: torch.nn.Module, cfg: ShardingConfig, env: DistEnv,
                  budget: MemoryBudget, reserved: int = 0, why: str = "") -> str:
    sizes = table_sizes(model, cfg)
    total = sum(t.bytes for t in sizes)
    shown = ", ".join(t.describe() for t in sizes[:4])
    if len(sizes) > 4:
        shown += f", {len(sizes) - 4} more = {_gb(sum(t.bytes for t in sizes[4:]))}"
    free = max(0, budget.planner_bytes - reserved)
    state = f" with {cfg.sparse_optimizer} state" if cfg.sparse_optimizer != "sgd" else ""
    pinned = sorted({k for k in [cfg.default_type, *cfg.tables.values()]
                     if k not in ("auto", "row_wise", "table_row_wise")})
    hint = (f"raise the budget, add ranks or use row_wise (the config pins {pinned})" if pinned
            else "raise the budget or add ranks")
    return (f"{budget.source}: tables need {_gb(total)}{state} ({shown}) over "
            f"{env.world_size} rank{'s' * (env.world_size > 1)}, which have "
            f"{_gb(free)} each for tables after {_gb(budget.reserve_bytes)} runtime"
            f"{f' and {_gb(reserved)} dense/input' if reserved else ''} reserve"
            f"{f' ({why})' if why else ''}; {hint}")


def _plan(planner: EmbeddingShardingPlanner, model: torch.nn.Module, sharders: list[Any],
          budget: MemoryBudget) -> tuple[str, Any]:
    """("ok", (plan, estimate)) or ("error", (reserved bytes, reason)); run on rank 0."""
    reservation = planner._storage_reservation
    try:
        plan = planner.plan(model, sharders)
    except PlannerError as e:
        dense = getattr(reservation, "_dense_storage", None)
        kjt = getattr(reservation, "_kjt_storage", None)
        reserved = sum(_device_bytes(s, planner._topology) for s in (dense, kjt) if s)
        text = str(e).strip()
        reason = text.splitlines()[0][:160].strip() if text else type(e).__name__
        return "error", (reserved, reason)
    dense = getattr(reservation, "_dense_storage", None)
    kjt = getattr(reservation, "_kjt_storage", None)
    reserved = sum(_device_bytes(s, planner._topology) for s in (dense, kjt) if s)
    per_rank: list[dict[str, tuple[str, int]]] = [{} for _ in range(planner._topology.world_size)]
    for so in planner._best_plan or []:
        for shard in so.shards:
            kind, b = per_rank[shard.rank].get(so.name, (so.sharding_type, 0))
            per_rank[shard.rank][so.name] = (kind, b + _device_bytes(shard.storage,
                                                                     planner._topology))
    return "ok", (plan, MemoryEstimate(budget, reserved, per_rank))


def _device_bytes(storage: Any, topology: Topology) -> int:
    return int(storage.hbm if topology.compute_device in ("cuda", "mtia") else storage.ddr)
