"""The one module that owns the distributed environment: process group, rank, world size,
device and threads. Library code receives a `DistEnv` and never reads environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# lives with the reader, whose worker processes call it too; re-exported for the trainer
from data_pipes.memory import keep_freed_memory
from genci_dist.config_loader import ConfigError
from genci_dist.runtime.console import quiet_known_warnings

__all__ = ["DistEnv", "keep_freed_memory", "set_threads"]


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    pg: Any | None

    @classmethod
    def init(cls, device: str = "auto", require_pg: bool = False,
             timeout_s: int = 1800, keep_freed: bool = False) -> DistEnv:
        """From torchrun's variables when present (RANK, WORLD_SIZE, LOCAL_RANK, ...), else a
        world of 1: without a process group, or (require_pg, for DMP) with a one-rank gloo
        group on an in-memory store. gloo on CPU, nccl on CUDA. keep_freed: see
        `keep_freed_memory` (train.keep_freed_memory)."""
        quiet_known_warnings()
        if keep_freed:
            keep_freed_memory()
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device = {device!r}: expected 'auto', 'cpu' or 'cuda'")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device = 'cuda' but this machine has no usable CUDA device "
                             "(use 'auto' or 'cpu')")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        set_threads(local_world)
        backend = pg = None
        if world > 1 or "TORCHELASTIC_RUN_ID" in env:
            backend = "nccl" if use_cuda else "gloo"
            if not dist.is_initialized():
                _init_torchrun_group(backend, timedelta(seconds=timeout_s))
            pg = dist.group.WORLD
        elif require_pg:
            backend = "nccl" if use_cuda else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                        world_size=1)
            pg = dist.group.WORLD
        return cls(rank, world, local_rank, local_world, dev, backend, pg)

    @classmethod
    def from_process_group(cls, device: torch.device | None = None) -> DistEnv:
        """For tests that already called init_process_group."""
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, rank, world, device or torch.device("cpu"),
                   dist.get_backend(), dist.group.WORLD)

    @property
    def distributed(self) -> bool:
        return self.pg is not None

    def barrier(self) -> None:
        if self.pg is not None:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.pg is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.pg is not None:
            dist.all_reduce(t)
        return t

    def destroy(self) -> None:
        if self.pg is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.pg = None


def _init_torchrun_group(backend: str, timeout: timedelta) -> None:
    """init_process_group from torchrun's variables, with the one launch mistake that makes a
    restarted rank fail named: torchrun (2.13) shares its rendezvous TCP store with the ranks
    unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, and after a restart gloo then connects to the
    dead ranks' old addresses ("Gloo connectFullMesh failed", pytorch/pytorch#135712)."""
    env = os.environ
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as e:
        restarted = env.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
        shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        if restarted and shared:
            raise ConfigError(
                "this rank was restarted by torchrun, whose shared rendezvous store points "
                "the new ranks at the dead ones' addresses (pytorch/pytorch#135712): launch "
                "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the project's launchers "
                f"and TorchX component set it); gloo said: {str(e).splitlines()[0][:200]}"
            ) from e
        raise


def set_threads(local_world_size: int) -> int:
    """ranks × threads ≤ cores: each local rank gets cores // local ranks intra-op threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, local_world_size))
    # An explicit OMP_NUM_THREADS (torchrun sets 1; several jobs sharing a machine) wins.
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        threads = min(threads, int(explicit))
    torch.set_num_threads(threads)
    return threads
