"""DistEnv without torchrun: a world of 1 with no process group, helpers that are no-ops,
threads = cores // local ranks, and a clear refusal of an impossible device."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from genci_dist.runtime.distributed import DistEnv

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def test_world_of_one_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """No torchrun variables → rank 0 of 1 on the CPU, no process group; gather/broadcast/
    all-reduce return their input; LOCAL_WORLD_SIZE=2 halves this process's threads."""
    for k in _TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        env = DistEnv.init("cpu")
        assert (env.rank, env.world_size, env.local_rank, env.pg, env.backend) == (
            0, 1, 0, None, None)
        assert env.device == torch.device("cpu") and not env.distributed
        assert torch.get_num_threads() == cores
        assert env.all_gather_object({"a": 1}) == [{"a": 1}]
        assert env.broadcast_object([3, 4]) == [3, 4]
        t = torch.tensor([1.5, 2.0])
        assert env.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
        env.barrier()
        env.destroy()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        DistEnv.init("auto" if not torch.cuda.is_available() else "cpu").destroy()
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")   # an explicit setting caps the threads
        DistEnv.init("cpu").destroy()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_impossible_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda'"):
        DistEnv.init("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA device"):
            DistEnv.init("cuda")
    torch.set_num_threads(before)


_FAULTS_SCRIPT = """
import resource, sys
import torch
from genci_dist.runtime.distributed import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def fill_faults(mib):   # minor page faults of allocating and writing `mib` MiB, then freeing it
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mib << 18, dtype=torch.float32)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
fill_faults(64)
print(applied, fill_faults(48))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux's")
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in() -> None:
    """A 48 MiB tensor after a 64 MiB one was freed: by default glibc maps it afresh and every
    page faults in again (12,288 pages of 4 KiB); after keep_freed_memory() it is carved out
    of the freed block, whose pages are already there. (Smaller than the first: a block of
    the same size may not fit back into the freed one with the allocator's alignment.) Each
    case in its own process (mallopt is process-wide)."""
    out = {}
    for mode in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], check=True,
                             capture_output=True, text=True)
        applied, faults = res.stdout.split()
        out[mode] = (applied, int(faults))
    assert out["keep"][0] == "True"
    assert out["default"][1] > 6000, out        # ~one fault per 4 KiB page
    assert out["keep"][1] < 600, out


def test_restart_with_shared_rendezvous_store_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that torchrun restarted while sharing its rendezvous store fails in gloo's
    connect; the error says which launch setting fixes it. Without a restart, gloo's own
    error passes through unchanged."""
    from genci_dist.config_loader import ConfigError
    from genci_dist.runtime import distributed

    def refuse(**_: object) -> None:
        raise RuntimeError("Gloo connectFullMesh failed with ... Connection refused")

    monkeypatch.setattr(distributed.dist, "init_process_group", refuse)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed._init_torchrun_group("gloo", timedelta(seconds=1))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(RuntimeError, match="connectFullMesh") as e:
        distributed._init_torchrun_group("gloo", timedelta(seconds=1))
    assert not isinstance(e.value, ConfigError)
