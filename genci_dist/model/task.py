"""Train tasks: each model family as one module `forward(batch) -> (loss, parts, logits,
labels)`, so one trainer runs them all and DMP wraps them whole (EBCs sharded, the rest DDP).

GenCI (paper Eqs. 5-12):
    H_enc, mask = T5 encoder(history tokens)             H_LTI = H_enc[last valid]
    L_NTP = CE(T5 decoder(target tokens | H_enc))        (positives only by default)
    codes = constrained beam search(H_enc) over the trie (no gradient)
    E_C = cohort representations of the generated codes  e_v = intent table[target item]
    H_STI = Attn(e_v, Attn(E_C, H_enc))
    logit = MLP([H_LTI; H_STI; E_u; E_v]);  teacher = DeepFM(fields)
    L = BCE(logit, y) + μ L_NTP + η [BCE(logit, σ(teacher)) + BCE(teacher, y)]
An ablated branch is not built at all, so DDP never sees a parameter without a gradient
(except the T5 decoder under w/o NTP, which generation still uses without gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig

from data_pipes.batch import Batch
from data_pipes.schema import HISTORY_FEATURE, ITEM, FeatureSpec, TokenVocab
from genci_dist.model.config import ModelConfig
from genci_dist.model.generator import Generator, distinct_rows
from genci_dist.model.heads import DCNv2, DeepFM, DINAttention, mlp
from genci_dist.model.init import xavier_normal_dense_
from genci_dist.model.intent import CohortIntent
from genci_dist.model.sparse import (
    FeatureEmbeddings,
    HistoryMeanEmbedding,
    IntentEmbeddings,
    cap_members,
)
from genci_dist.tokenizer.cohorts import prefix_keys
from genci_dist.tokenizer.trie import SemanticIdTrie

TaskOutput = tuple[Tensor, dict[str, Tensor], Tensor, Tensor]


@dataclass
class GenerationAssets:
    """What GenCI needs besides the features: token vocab, trie, cohort CSR arrays."""

    vocab: TokenVocab
    trie: SemanticIdTrie
    cohort_indptr: object   # numpy int64 [C+1] of the configured cohort mode
    cohort_members: object  # numpy int member item ids
    prefix_keys: Tensor     # int64 sorted (prefix mode), empty in code mode
    n_cohorts: int
    content_hash: str


def _bce(logit: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logit, target)


class GenCITask(nn.Module):
    def __init__(self, cfg: ModelConfig, features: list[FeatureSpec], assets: GenerationAssets,
                 device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = assets.vocab.levels
        self.k = assets.vocab.codebook_size
        self.trie = assets.trie
        self.sparse = FeatureEmbeddings(features, cfg.embedding_dim, device)
        self.generator = Generator(cfg, assets.vocab)
        n_items = next(f.cardinality for f in features if f.name == ITEM)
        rep = 0
        if cfg.use_st_intent:
            self.intent_emb = IntentEmbeddings(n_items, cfg.d_model, self.levels,
                                               assets.n_cohorts, cfg.cohort_repr == "table",
                                               device)
            self.cohort_attn = CohortIntent(cfg.d_model, cfg.attn_heads, cfg.attn_dropout,
                                            cfg.share_attention)
            indptr, members = cap_members(assets.cohort_indptr, assets.cohort_members,
                                          cfg.cohort_member_cap)
            self.register_buffer("cohort_indptr", indptr, persistent=False)
            self.register_buffer("cohort_members", members, persistent=False)
            self.register_buffer("prefix_keys", assets.prefix_keys, persistent=False)
            rep += cfg.d_model
        if cfg.use_lt_intent:
            rep += cfg.d_model
        n_u = sum(f.side == "user" for f in features)
        n_v = len(features) - n_u
        self.mlp = mlp(rep + (n_u + n_v) * cfg.embedding_dim, cfg.mlp, cfg.dropout,
                       dropout_at=cfg.mlp_dropout)
        # model.sr_teacher_history: the teacher's fields + the mean-pooled history item ids
        self.sr_history = HistoryMeanEmbedding(n_items, cfg.embedding_dim, device) if (
            cfg.use_sr and cfg.sr_teacher_history) else None
        self.teacher = DeepFM(len(features) + (self.sr_history is not None),
                              cfg.embedding_dim, cfg.deepfm_mlp, cfg.deepfm_dropout,
                              dropout_at=cfg.mlp_dropout) if cfg.use_sr else None
        if cfg.init == "xavier_normal":
            xavier_normal_dense_(self)

    def cohort_ids(self, codes: Tensor) -> Tensor:
        """Generated codes [B, N] → cohort ids [B, N] (-1 = no such cohort)."""
        if self.cfg.cohort_mode == "code":
            return codes + torch.arange(self.levels, device=codes.device) * self.k
        keys = prefix_keys(codes, self.k)
        pos = torch.searchsorted(self.prefix_keys, keys).clamp(max=len(self.prefix_keys) - 1)
        return torch.where(self.prefix_keys[pos] == keys, pos, torch.full_like(pos, -1))

    def generate(self, enc: Tensor, mask: Tensor,
                 cross_kv: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Top beam's N codes [B, N] (the collision digit does not pick cohorts)."""
        codes, _ = self.generator.beam_search(enc.detach(), mask, self.trie,
                                              self.cfg.beam_width, steps=self.levels,
                                              cross_kv=cross_kv)
        return codes[:, 0]

    def _generator_pass(self, tokens: Tensor, targets: Tensor | None, need_ntp: bool
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(H_enc, mask, NTP logits or None, generated codes or None) for every sample, over
        slices of `generator_chunk` samples (all slices keep the batch's padded width; every
        step is per-sample, so this is exact).

        In eval mode with model.dedup_eval_histories, the encoder and generation (functions
        of the history alone) run once per distinct history of the batch and their outputs
        are indexed back; only the teacher-forced decoder, which reads each sample's target,
        runs per sample. Evaluation rows come in each user's time order, so a user's
        consecutive non-clicks share a history: 24-26 % of ML-1M's valid and test rows."""
        rows = (distinct_rows(tokens) if self.cfg.dedup_eval_histories and not self.training
                else None)
        if rows is None:
            return self._sliced_pass(tokens, targets, need_ntp)
        uniq, inverse = rows
        enc, mask, _, codes = self._sliced_pass(uniq, None, need_ntp=False)
        enc, mask = enc[inverse], mask[inverse]
        logits = None
        if need_ntp:
            assert targets is not None
            step = self._step(tokens.shape[0])
            logits = torch.cat([
                self.generator.ntp_logits(enc[i:i + step], mask[i:i + step], targets[i:i + step])
                for i in range(0, tokens.shape[0], step)])
        return enc, mask, logits, None if codes is None else codes[inverse]

    def _step(self, n: int) -> int:
        chunk = self.cfg.generator_chunk
        return chunk if 0 < chunk < n else max(n, 1)

    def _sliced_pass(self, tokens: Tensor, targets: Tensor | None, need_ntp: bool
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """`_generator_pass` over slices of `generator_chunk` samples, every sample."""
        cfg = self.cfg
        n = tokens.shape[0]
        step = self._step(n)
        encs, masks, logits, codes = [], [], [], []
        for i in range(0, n, step):
            enc, mask = self.generator.encode(tokens[i:i + step])
            kv = None
            if need_ntp:
                assert targets is not None
                lg, kv = self.generator.ntp_logits_and_cross_kv(
                    enc, mask, targets[i:i + step], keep=cfg.reuse_cross_kv and cfg.use_st_intent)
                logits.append(lg)
            if cfg.use_st_intent:
                codes.append(self.generate(enc, mask, kv))
            encs.append(enc)
            masks.append(mask)
        if len(encs) == 1:
            enc, mask = encs[0], masks[0]
        else:
            enc, mask = torch.cat(encs), torch.cat(masks)
        return (enc, mask, torch.cat(logits) if logits else None,
                torch.cat(codes) if codes else None)

    def _intents(self, batch: Batch, enc: Tensor, mask: Tensor,
                 codes: Tensor | None) -> dict[str, Tensor]:
        """{"lt": H_LTI, "st": H_STI, "item": e_v} for the enabled branches."""
        out: dict[str, Tensor] = {}
        if self.cfg.use_lt_intent:
            out["lt"] = self.generator.last_valid(enc, mask)
        if self.cfg.use_st_intent:
            assert codes is not None
            e_v, e_c = self.intent_emb(batch.item_ids, self.cohort_ids(codes),
                                       self.cohort_indptr, self.cohort_members)
            out["st"] = self.cohort_attn(e_c, enc, mask, e_v)
            out["item"] = e_v
        return out

    @torch.no_grad()
    def intents(self, batch: Batch) -> dict[str, Tensor]:
        """Long-term intent H_LTI, short-term intent H_STI and the target item's intent-space
        embedding e_v (all [B, d_model]) for analysis (paper Fig. 4)."""
        enc, mask, _, codes = self._generator_pass(batch.history_tokens, batch.target_tokens,
                                                   need_ntp=False)
        return {k: v.detach() for k, v in self._intents(batch, enc, mask, codes).items()}

    def forward(self, batch: Batch) -> TaskOutput:
        cfg = self.cfg
        y = batch.labels
        fields, e_u, e_v_feat = self.sparse(batch.sparse_features)
        # The teacher-forced decoder pass runs before generation so that generation can reuse
        # its cross-attention keys/values when model.reuse_cross_kv is set.
        enc, mask, ntp_logits, codes = self._generator_pass(
            batch.history_tokens, batch.target_tokens, need_ntp=cfg.use_ntp)
        intents = self._intents(batch, enc, mask, codes)
        reps = [intents[k] for k in ("lt", "st") if k in intents]
        parts: dict[str, Tensor] = {}
        logit = self.mlp(torch.cat([*reps, e_u, e_v_feat], dim=1)).squeeze(-1)
        loss = parts["ctr"] = _bce(logit, y)
        if ntp_logits is not None:
            w = y if cfg.ntp_on == "positive" else torch.ones_like(y)
            parts["ntp"] = self.generator.ntp_loss(ntp_logits, batch.target_tokens, w)
            loss = loss + cfg.mu * parts["ntp"]
        if self.teacher is not None:
            if self.sr_history is not None:
                pooled = self.sr_history(batch.sequence_features)
                fields = torch.cat([fields, pooled[:, None, :]], dim=1)
            t_logit = self.teacher(fields)
            soft = torch.sigmoid(t_logit.detach() if cfg.sr_detach_teacher else t_logit)
            parts["sr"] = _bce(logit, soft) + _bce(t_logit, y)
            loss = loss + cfg.eta * parts["sr"]
        return loss, {k: v.detach() for k, v in parts.items()}, logit.detach(), y


class BaselineTask(nn.Module):
    """DeepFM / DCNv2 / DIN on the same sparse arch and batches."""

    def __init__(self, cfg: ModelConfig, features: list[FeatureSpec],
                 device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.embedding_dim
        self.sparse = FeatureEmbeddings(features, e, device)
        n = len(features)
        if cfg.name == "deepfm":
            self.head = DeepFM(n, e, cfg.deepfm_mlp, cfg.deepfm_dropout,
                               dropout_at=cfg.mlp_dropout)
        elif cfg.name == "dcnv2":
            self.head = DCNv2(n, e, cfg.dcn_cross_layers, cfg.mlp, cfg.dropout,
                              dropout_at=cfg.mlp_dropout)
        elif cfg.name == "din":
            n_items = next(f.cardinality for f in features if f.name == ITEM)
            self.history = EmbeddingCollection(tables=[EmbeddingConfig(
                name="t_din_history", embedding_dim=e, num_embeddings=n_items,
                feature_names=[HISTORY_FEATURE])], device=device)
            self.attention = DINAttention(e, cfg.din_attention_mlp)
            self.item_index = [f.name for f in features].index(ITEM)
            self.head = mlp((n + 1) * e, cfg.mlp, cfg.dropout, dropout_at=cfg.mlp_dropout)
        else:
            raise ValueError(f"model.name {cfg.name!r} is not a baseline")
        if cfg.init == "xavier_normal":
            xavier_normal_dense_(self)

    def forward(self, batch: Batch) -> TaskOutput:
        fields, _, _ = self.sparse(batch.sparse_features)
        if self.cfg.name == "din":
            if HISTORY_FEATURE not in batch.sequence_features.keys():
                raise ValueError("DIN reads the history's item ids: build its loader with "
                                 "with_history_ids=True (model.build.batch_fields)")
            jt = self.history(batch.sequence_features)[HISTORY_FEATURE]
            width = max(batch.history.shape[1], 1)
            hist = jt.to_padded_dense(desired_length=width)                # [B, L, e]
            valid = torch.arange(width, device=hist.device)[None, :] < \
                batch.history_lengths[:, None]
            interest = self.attention(hist, valid, fields[:, self.item_index])
            logit = self.head(torch.cat([fields.flatten(1), interest], dim=1)).squeeze(-1)
        else:
            logit = self.head(fields)
        loss = _bce(logit, batch.labels)
        return loss, {"ctr": loss.detach()}, logit.detach(), batch.labels
