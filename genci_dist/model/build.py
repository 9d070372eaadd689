"""Builds a train task from plain config objects (never from a dataset object): the feature
specs from the manifest and, for GenCI, the generation assets read from the dataset folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipes.schema import FeatureSpec
from genci_dist.model.config import ModelConfig
from genci_dist.model.task import BaselineTask, GenCITask, GenerationAssets
from genci_dist.tokenizer.cohorts import CohortIndex
from genci_dist.tokenizer.semantic_ids import load_semantic_ids
from genci_dist.tokenizer.trie import SemanticIdTrie


def load_generation_assets(dataset_dir: str | Path, manifest: dict[str, Any],
                           cfg: ModelConfig) -> GenerationAssets | None:
    """Semantic IDs (validated against the manifest), their trie and the cohort index."""
    if cfg.name != "genci":
        return None
    sids = load_semantic_ids(dataset_dir, expected=manifest)
    full = np.concatenate([sids.codes, sids.collision[:, None]], axis=1)
    widths = [sids.codebook_size] * sids.levels + [sids.n_collision]
    trie = SemanticIdTrie(full, sids.item_ids, widths)
    cohorts = CohortIndex.load(dataset_dir, expected_hash=sids.content_hash)
    indptr, members = cohorts.csr(cfg.cohort_mode)
    keys = cohorts.prefix_keys if cfg.cohort_mode == "prefix" else torch.zeros(0, dtype=torch.long)
    return GenerationAssets(sids.vocab, trie, indptr.numpy(), members.numpy(), keys.long(),
                            cohorts.num_cohorts(cfg.cohort_mode), sids.content_hash)


def batch_fields(cfg: ModelConfig) -> dict[str, bool]:
    """Which forms of the history a model reads, as build_loader's keyword arguments: GenCI
    its semantic-ID tokens (and its item ids when its SR teacher reads the mean-pooled
    history, model.sr_teacher_history), DIN its item ids (sequence KJT and width); DeepFM /
    DCNv2 neither. The reader builds nothing else (a GenCI batch without the ids: the
    data_pipes/bench_reader.py docstring)."""
    genci = cfg.name == "genci"
    return {"with_tokens": genci,
            "with_history_ids": cfg.name == "din" or (
                genci and cfg.use_sr and cfg.sr_teacher_history)}


def build_task(cfg: ModelConfig, features: list[FeatureSpec], assets: GenerationAssets | None,
               device: torch.device) -> nn.Module:
    """EBC/EC tables on `device` (use "meta" under DMP); dense layers on CPU (DMP moves them)."""
    if cfg.name == "genci":
        if assets is None:
            raise ValueError("GenCI needs generation assets (semantic IDs, cohorts)")
        return GenCITask(cfg, features, assets, device)
    return BaselineTask(cfg, features, device)
