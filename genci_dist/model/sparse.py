"""The sparse arch: TorchRec EmbeddingBagCollections that DMP shards.

- ``features``: one table ``t_<feature>`` (width e) per manifest feature; single-valued ids
  SUM-pooled (a bag of 0 or 1 id), multi-valued bags (genres, categories) MEAN-pooled.
- ``intent``: the item-ID table ``t_intent_item`` of width d_model, read by the target id
  (e_v of Eq. 9) and by one bag per cohort level (MEAN pooling = Eq. 7's exact member mean:
  the KJT holds only real members, no padding).
- ``cohort_table``: for cohort_repr = "table", a learned table keyed by cohort id.
- ``sr_history``: for model.sr_teacher_history, the width-e table ``t_sr_history`` read by the
  history's item ids (MEAN pooling over the real items: the KJT holds no padding).

Tables are declared from the manifest's cardinalities only; build them on device "meta" and
DMP materialises (and initialises) the shards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from data_pipes.schema import HISTORY_FEATURE, FeatureSpec


class FeatureEmbeddings(nn.Module):
    def __init__(self, features: list[FeatureSpec], dim: int, device: torch.device) -> None:
        super().__init__()
        self.features = features
        self.dim = dim
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim,
                               num_embeddings=f.cardinality, feature_names=[f.name],
                               pooling=PoolingType.MEAN if f.multi else PoolingType.SUM)
            for f in features], device=device)
        self.user_keys = [f.name for f in features if f.side == "user"]
        self.item_keys = [f.name for f in features if f.side == "item"]

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[Tensor, Tensor, Tensor]:
        """→ (fields [B, F, e] in manifest order, E_u [B, F_u*e], E_v [B, F_v*e])."""
        kt = self.ebc(kjt).to_dict()
        fields = torch.stack([kt[f.name] for f in self.features], dim=1)
        e_u = torch.cat([kt[k] for k in self.user_keys], dim=1)
        e_v = torch.cat([kt[k] for k in self.item_keys], dim=1)
        return fields, e_u, e_v


def cap_members(indptr: np.ndarray, members: np.ndarray, cap: int) -> tuple[Tensor, Tensor]:
    """Caps every cohort at `cap` members with an evenly spaced (deterministic) sample."""
    sizes = np.diff(indptr)
    if cap <= 0 or sizes.max(initial=0) <= cap:
        return torch.from_numpy(indptr.astype(np.int64)), torch.from_numpy(
            members.astype(np.int64))
    new_sizes = np.minimum(sizes, cap)
    new_ptr = np.r_[0, np.cumsum(new_sizes)]
    # position j of cohort c takes member floor(j * size / new_size) of the original list
    c = np.repeat(np.arange(sizes.size), new_sizes)
    j = np.arange(new_ptr[-1]) - new_ptr[c]
    src = indptr[c] + (j * sizes[c]) // new_sizes[c]
    return torch.from_numpy(new_ptr.astype(np.int64)), torch.from_numpy(
        members[src].astype(np.int64))


def cohort_kjt(target: Tensor, cohort_ids: Tensor, indptr: Tensor, members: Tensor
               ) -> KeyedJaggedTensor:
    """KJT for the intent EBC: key "target_intent" (the target item) then "cohort_<n>" bags
    holding the member items of each sample's cohort at level n (-1 = no cohort → empty)."""
    b, n = cohort_ids.shape
    ids = cohort_ids.t().reshape(-1)                         # key-major: level, then sample
    valid = ids >= 0
    safe = ids.clamp(min=0)
    starts = indptr[safe]
    lens = torch.where(valid, indptr[safe + 1] - starts, torch.zeros_like(starts))
    excl = torch.cumsum(lens, 0) - lens
    total = int(lens.sum())
    gather = torch.repeat_interleave(starts - excl, lens, output_size=total) + torch.arange(
        total, device=ids.device)
    values = torch.cat([target, members[gather]])
    lengths = torch.cat([torch.ones_like(target), lens])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["target_intent"] + [f"cohort_{i}" for i in range(n)], values=values,
        lengths=lengths)


class IntentEmbeddings(nn.Module):
    """The d_model-wide item table (EBC `intent`) and, optionally, the cohort table."""

    def __init__(self, n_items: int, d_model: int, levels: int, n_cohorts: int,
                 use_table: bool, device: torch.device) -> None:
        super().__init__()
        self.levels = levels
        names = ["target_intent"] + ([] if use_table else [f"cohort_{i}" for i in range(levels)])
        self.intent = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_intent_item", embedding_dim=d_model, num_embeddings=n_items,
            feature_names=names, pooling=PoolingType.MEAN)], device=device)
        self.cohort_table = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_cohort", embedding_dim=d_model, num_embeddings=n_cohorts,
            feature_names=[f"cohort_id_{i}" for i in range(levels)],
            pooling=PoolingType.SUM)], device=device) if use_table else None

    def forward(self, target: Tensor, cohort_ids: Tensor | None, indptr: Tensor | None,
                members: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """→ (e_v [B, d], E_C [B, N, d] or None when cohort_ids is None)."""
        if self.cohort_table is None and cohort_ids is not None:
            kt = self.intent(cohort_kjt(target, cohort_ids, indptr, members)).to_dict()
            e_c = torch.stack([kt[f"cohort_{i}"] for i in range(self.levels)], dim=1)
            return kt["target_intent"], e_c
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["target_intent"], values=target,
                                                  lengths=torch.ones_like(target))
        e_v = self.intent(kjt).to_dict()["target_intent"]
        if cohort_ids is None or self.cohort_table is None:
            return e_v, None
        ids = cohort_ids.t().reshape(-1)
        ckjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"cohort_id_{i}" for i in range(self.levels)], values=ids[ids >= 0],
            lengths=(ids >= 0).long())
        kt = self.cohort_table(ckjt).to_dict()
        return e_v, torch.stack([kt[f"cohort_id_{i}"] for i in range(self.levels)], dim=1)


class HistoryMeanEmbedding(nn.Module):
    """Mean of the history's item-id embeddings, one [B, e] field for the SR teacher."""

    def __init__(self, n_items: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_sr_history", embedding_dim=dim, num_embeddings=n_items,
            feature_names=[HISTORY_FEATURE], pooling=PoolingType.MEAN)], device=device)

    def forward(self, sequence_features: KeyedJaggedTensor) -> Tensor:
        """The batch's history KJT → [B, e]; an empty history pools to zeros."""
        if HISTORY_FEATURE not in sequence_features.keys():
            raise ValueError("model.sr_teacher_history reads the history's item ids: build "
                             "the loader with with_history_ids=True (model.build.batch_fields)")
        return self.ebc(sequence_features)[HISTORY_FEATURE]
