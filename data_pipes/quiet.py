"""Library warnings known to be harmless in this project, silenced once per process: by the
trainer, evaluator and benchmarks at start-up (`genci_dist.runtime.distributed.DistEnv.init`)
and by the reader's worker processes (`data_pipes.stream`, which start from a fork server and
build TorchRec inputs too). Every other warning stays visible. Lives in data_pipes, the lowest
layer, so both kinds of process share one list.

Each silenced message, and why it is harmless in this project:

- `fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered`
  (torch, on every backward through a data_parallel table): fbgemm's CPU dense lookup is a
  composite of differentiable ops; the gradient that reaches the table is the exact analytic
  one (tests/test_model_sparse.py checks data_parallel tables against nn.EmbeddingBag).
- `'set_vital' is deprecated` (torchdata's StatefulDataLoader calling a torch API that became
  a no-op): nothing to do on our side.
- `broadcast_buffers is deprecated` (TorchRec's DMP and sharded EBC pass DDP the old
  keyword): the behaviour asked for is unchanged in torch 2.13.
- `torch.distributed.reduce_scatter_tensor / all_gather_into_tensor is deprecated` (TorchRec's
  row-wise sharding calls the old names): same collectives under new names.
- `HeuristicalStorageReservation is known to cause issues ... dry run` and `known issue with
  TorchRec's dense tensor size calculation in dry run` (planner): we never plan in dry-run
  mode; the reservation only shrinks the per-rank budget the planner may use.
- `The topology was constructed directly rather than via TopologyFactory` (planner): the
  factory only fills hardware defaults for CUDA hosts; `runtime/sharding.py` gives the
  Topology its world size, device and memory explicitly.
- `Sharding Type is data_parallel, caching params will be ignored` (TorchRec): data_parallel
  tables have no cache to configure; the fused params apply to the sharded tables.
- `Sharding spec not found for <module>.<param>` (planner plan validation): data_parallel
  tables carry no sharding spec by design.
- `is_fx_tracing will return true for both fx.symbolic_trace and torch.export` (torch, when
  TorchRec's KJT regrouping asks whether it is being traced): a deprecation notice about the
  function's meaning under torch.export, which this project does not use.
- `Please use DTensor instead and we are deprecating ShardedTensor` (DCP, saving or loading
  TorchRec's sharded tables): TorchRec 1.8 shards tables as ShardedTensor; DCP still saves and
  reshards them (tests/test_runtime_checkpoint.py).
- `torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load
  in a single process` (DCP, `genci-evaluate` in one plain process): that is the intent — the
  checkpoint is resharded into one unsharded model.
"""

from __future__ import annotations

import logging
import re
import warnings

_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel", UserWarning),
    (r"'set_vital' is deprecated", UserWarning),
    (r"`broadcast_buffers` is deprecated", FutureWarning),
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", FutureWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"HeuristicalStorageReservation is known to cause issues", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is "
     r"to load in a single process", UserWarning),
)

_LOG_MESSAGES: tuple[str, ...] = (
    r"The topology was constructed directly rather than via TopologyFactory",
    r"There is a known issue with TorchRec's dense tensor size calculation in dry run",
    r"Sharding Type is data_parallel, caching params will be ignored",
    r"Sharding spec not found for ",
    r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export",
)


class _DropKnown(logging.Filter):
    """Drops the log records listed in `_LOG_MESSAGES`; passes everything else."""

    _pattern = re.compile("|".join(_LOG_MESSAGES))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.search(record.getMessage())


_installed = False


def quiet_known_warnings() -> None:
    """Installs the filters above (idempotent). Called once per process by `DistEnv.init`."""
    global _installed
    if _installed:
        return
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    drop = _DropKnown()
    # The records come from torchrec's module loggers and from the root logger (planner's
    # `logging.warning`); a filter on a logger applies only to records it creates, so it is
    # put on the root logger's handlers' path via each logger that emits them.
    for name in ("", "torchrec.distributed.planner.types", "torchrec.distributed.utils",
                 "torchrec.distributed.planner.storage_reservations",
                 "torchrec.distributed.planner.planners", "torch.fx._symbolic_trace"):
        logging.getLogger(name).addFilter(drop)
    _installed = True
