"""The official release's re-initialisation of a built model (ModelConfig.init)."""

from __future__ import annotations

from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection


def xavier_normal_dense_(model: nn.Module) -> None:
    """Re-draws every nn.Linear weight and every dense nn.Embedding of `model` from
    xavier_normal (N(0, 2/(fan_in+fan_out)); for an Embedding [rows, dim], fan_in = dim and
    fan_out = rows) and zeroes every Linear bias, as the official GenCI code's
    `self.apply(_init_weights)` does. TorchRec collections (EBC / EC) are left alone: their
    tables are declared on "meta" and DMP initialises them from their EmbeddingBagConfigs.
    A parameter shared by two modules (T5's tied token table and lm_head) is drawn twice,
    the last draw stays, as under `nn.Module.apply`."""
    skip: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, EmbeddingBagCollection | EmbeddingCollection):
            skip.append(name + ".")
            continue
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.xavier_normal_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
