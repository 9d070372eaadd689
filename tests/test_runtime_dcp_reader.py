"""NoCopyReader loads a DMP checkpoint exactly as DCP's own reader does, reading whole table
shards straight into the destination tensors (and the rest through DCP's path)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from genci_dist.runtime.dcp_reader import NoCopyReader
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import ShardingConfig, build_dmp, build_optimizer


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=r, feature_names=[n])
            for n, r in (("t_a", 5000), ("t_b", 300))], device=torch.device("meta"))
        self.lin = torch.nn.Linear(32, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(kjt).to_dict()
        return self.lin(torch.cat([kt["t_a"], kt["t_b"]], 1)).squeeze(-1)


def _local(v: object) -> torch.Tensor:
    return v.local_shards()[0].tensor if hasattr(v, "local_shards") else v  # type: ignore


def test_no_copy_reader_restores_what_dcp_saved(tmp_path: Path) -> None:
    env = DistEnv.init("cpu", require_pg=True)
    try:
        torch.manual_seed(0)
        dmp, _ = build_dmp(_Model(), env, ShardingConfig(default_type="row_wise"))
        opt = build_optimizer(dmp, 1e-2)
        kjt = KeyedJaggedTensor.from_lengths_sync(["t_a", "t_b"], torch.arange(32) % 300,
                                                  torch.ones(32, dtype=torch.long))
        dmp(kjt).sum().backward()
        opt.step()
        dcp.save({"model": dmp.state_dict(), "optim": opt.state_dict(),
                  "extra": {"step": 7}}, checkpoint_id=str(tmp_path))
        saved = {k: _local(v).clone() for k, v in dmp.state_dict().items()}
        state = {"model": dmp.state_dict(), "optim": opt.state_dict(), "extra": {"step": 0}}
        for v in state["model"].values():
            _local(v).zero_()
        reader = NoCopyReader(str(tmp_path))
        dcp.load(state, checkpoint_id=str(tmp_path), storage_reader=reader)
        dmp.load_state_dict(state["model"])
        for k, v in dmp.state_dict().items():
            assert torch.equal(_local(v), saved[k]), k
        assert state["extra"] == {"step": 7}      # a bytes item, through DCP's own path
        # both tables' shards, the dense layer's two tensors and the rowwise momenta at least
        assert reader.direct_items >= 6
    finally:
        env.destroy()
