"""The initialisation the sharded tables really get: tables are declared on the meta device and
DMP materialises them with each EmbeddingBagConfig's init (TorchRec's default, uniform in
±sqrt(1/num_embeddings)); dense layers keep their own (Xavier) initialisation through DMP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_pipes.schema import feature_specs, load_manifest
from genci_dist.model.build import build_task, load_generation_assets
from genci_dist.model.config import ModelConfig
from genci_dist.runtime.distributed import DistEnv
from genci_dist.runtime.sharding import ShardingConfig, build_dmp


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_dmp_materialises_the_intended_initialisation(tiny_dataset: Path, kind: str) -> None:
    env = DistEnv.init("cpu", require_pg=True)
    try:
        cfg = ModelConfig(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                          num_heads=2, d_kv=8, attn_heads=2, mlp=(32,))
        m = load_manifest(tiny_dataset)
        torch.manual_seed(0)
        task = build_task(cfg, feature_specs(m), load_generation_assets(tiny_dataset, m, cfg),
                          torch.device("meta"))
        mlp_before = task.mlp[0].weight.detach().clone()
        dmp, _ = build_dmp(task, env, ShardingConfig(default_type=kind))
        sd = dmp.state_dict()
        tables = {k: v for k, v in sd.items() if "embedding_bags" in k}
        assert tables, "no sharded tables found"
        for name, st in tables.items():
            w = torch.cat([s.tensor for s in st.local_shards()]) if hasattr(
                st, "local_shards") else st
            n = st.size(0)
            bound = math.sqrt(1.0 / n)
            assert w.abs().max() <= bound + 1e-7, name
            # uniform(-a, a) has std a/sqrt(3); a table of ≥ 40 values must be near it
            if w.numel() >= 40:
                assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.35), name
        assert torch.equal(sd["mlp.0.weight"], mlp_before)   # dense init survives DMP
    finally:
        env.destroy()
