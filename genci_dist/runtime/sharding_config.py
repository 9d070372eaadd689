"""`[sharding]`: how embedding tables are sharded, optimised and budgeted (the config section;
the planner and DMP that use it are `genci_dist.runtime.sharding`, the memory plan
`genci_dist.runtime.memory_plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from torchrec.distributed.types import ShardingType

from genci_dist.config_loader import ConfigError

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
    memory_budget_gb: float = 0.0
    """Memory one rank may use, in GB (10^9 bytes); 0 = auto: host RAM / local ranks (on CUDA
    the device's memory). The planner places tables in it after RUNTIME_RESERVE_GB and its
    own dense + input reservation; a model that cannot fit fails before any allocation."""
    table_dtype: Literal["fp32", "fp16"] = "fp32"
    """Storage precision of the fused (sharded) tables: "fp16" halves their memory (fbgemm's
    CPU kernels update fp16 rows in place; pooled outputs stay fp32, optimizer state fp32).
    data_parallel tables stay fp32 (dense Adam), so under fp16 the planner is not offered
    data_parallel for the tables it chooses for."""

    def __post_init__(self) -> None:
        for name, kind in self.tables.items():
            if kind not in _TYPES:
                raise ValueError(f"sharding.tables.{name}: {kind!r} is not one of "
                                 f"{sorted(_TYPES)}")
        for key in ("sparse_lr", "sparse_eps"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"sharding.{key} must be > 0, got {value!r}")
        if self.min_partition < 1:
            raise ConfigError(f"sharding.min_partition must be >= 1, got {self.min_partition!r}")
