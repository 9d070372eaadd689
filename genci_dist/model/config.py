"""The model section of a job config (SPEC §4; defaults = the official MovieLens setup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from genci_dist.config_loader import ConfigError, check_each, check_value


@dataclass(frozen=True)
class ModelConfig:
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "attention", "attention_block", "attention_keep_probs", "generator_chunk",
        "dedup_histories", "dedup_eval_histories", "absorb_cross_attention",
        "reuse_cross_kv"})
    """Fields that choose only how the same function is computed (kernel, blocks, slices,
    shared or absorbed work): a checkpoint resumes or evaluates under any setting of them,
    including fields a newer version added (genci_dist/runtime/checkpoint.py `fingerprint`)."""

    name: Literal["genci", "deepfm", "dcnv2", "din"] = "genci"
    embedding_dim: int = 16
    """e: width of every raw-feature embedding."""
    mlp: tuple[int, ...] = (256, 256, 256)
    """Prediction MLP (Eq. 10) hidden widths."""
    dropout: float = 0.1
    mlp_dropout: Literal["after", "before"] = "after"
    """Where the dropout of every prediction MLP sits (GenCI's Eq. 10 MLP and its SR teacher's
    deep part, the DeepFM / DCNv2 / DIN deep parts): "after" = Linear→ReLU→Dropout blocks (no
    dropout on the MLP's input); "before" = Dropout→Linear→ReLU blocks, as the official
    release's RecBole MLPLayers: input dropout on the MLP's whole input, GenCI's 2·d_model
    intent dims included. The final linear to the logit has no dropout in front of it in
    either."""
    init: Literal["default", "xavier_normal"] = "default"
    """Initialisation of the dense modules. "default": each module's own (prediction MLPs and
    heads Xavier-uniform with zero biases, transformers' T5 init, MultiheadAttention's).
    "xavier_normal": as the official release's `self.apply(_init_weights)`, every nn.Linear
    weight and every dense nn.Embedding (T5's token table and relative-position buckets) is
    re-drawn from N(0, 2/(fan_in+fan_out)), every Linear bias set to 0, after the model is
    built (MultiheadAttention's packed in_proj is not an nn.Linear there either and keeps
    its init; its out_proj is re-drawn). The TorchRec tables keep their own init (uniform in
    ±sqrt(1/rows)); the official code also draws its id tables with xavier_normal, which for
    a [rows, e] table is std sqrt(2/(rows+e)) — its token fields share one table, so rows is
    the sum of their cardinalities — matched in variance by an EmbeddingBagConfig with
    weight_init_min/max = ∓sqrt(6/(rows+e)) (TorchRec's fused kernels draw uniform only)."""
    # --- generator (T5) -----------------------------------------------------------------
    d_model: int = 64
    d_ff: int = 64
    num_encoder_layers: int = 2
    num_decoder_layers: int = 3
    num_heads: int = 8
    d_kv: int = 32
    t5_dropout: float = 0.0
    attention: Literal["genci_t5", "sdpa", "eager"] = "genci_t5"
    """T5 attention kernel: genci_t5 (model/t5_attention.py: same maths as eager, blocked over
    the batch; see attention_keep_probs), or transformers' sdpa / eager."""
    attention_block: int = 8
    """genci_t5: samples per attention block (0 = one block, scores materialised for all)."""
    attention_keep_probs: bool = True
    """genci_t5 blocked kernel: keep the attention probabilities for backward (B×H×S×S in the
    compute dtype: 655 MB per encoder layer at ML-1M, batch 1024, bf16) instead of
    recomputing them there (same numbers; 0.335 → 0.289 s per encoder layer forward+backward,
    batch 128, bf16, 1 thread). False saves the memory."""
    generator_chunk: int = 128
    """Run the generator (encoder, NTP decoder, generation) over slices of this many samples
    of a batch (0 = whole batch). Per-sample maths, so exact; large batches otherwise lose
    ~25 % per sample to cache misses on this CPU (1×1024 vs 4×256, history 50)."""
    dedup_histories: bool = False
    """Encode each distinct history of a batch once and share its encoder output (training
    too; a shuffled training batch almost never repeats a history, so off)."""
    dedup_eval_histories: bool = True
    """In eval mode, encode and generate once per distinct history of a batch (exact: both
    are per-sample functions of the history). A quarter of ML-1M's valid and test rows repeat
    the history of a row beside them (a user's consecutive non-clicks)."""
    absorb_cross_attention: bool = True
    """The decoder's cross-attention maps its few queries into the encoder's d_model space
    instead of projecting every encoder token to keys and values (model/t5_attention.py
    `AbsorbedCrossAttention`; same parameters and function, sums in another order)."""
    reuse_cross_kv: bool = False
    """Generation reuses the teacher-forced decoder's cross-attention keys/values (only with
    absorb_cross_attention = false: absorbed cross-attention has no keys/values). Exact, but
    measured no faster at beam 1 (genci-bench: 116 → 110 samples/s, ML-1M, batch 256): the
    cached decoder pass costs what the three generation steps save. Off by default."""
    beam_width: int = 1
    """Constrained beam search width (1 = greedy, the official setting)."""
    ntp_on: Literal["positive", "all"] = "positive"
    """L_NTP on clicked targets only (SPEC default) or on every sample (official code)."""
    # --- hierarchical intent (Eqs. 7-9) -------------------------------------------------
    cohort_mode: Literal["code", "prefix"] = "code"
    cohort_repr: Literal["member_mean", "table"] = "member_mean"
    cohort_member_cap: int = 256
    """member_mean: larger cohorts use an evenly spaced deterministic sample of this size."""
    attn_heads: int = 2
    attn_dropout: float = 0.2
    share_attention: bool = False
    """True reproduces the official code's single module for Eqs. 8 and 9."""
    # --- losses and ablations (Eq. 12, Table 4) ------------------------------------------
    mu: float = 1.0
    eta: float = 1.0
    sr_detach_teacher: bool = False
    """L_SR's soft target σ(t) is detached: the teacher learns from BCE(t, y) alone and is not
    pulled toward the student's logit z (undetached, ∂L_SR/∂t = σ(t)(1−σ(t))·(−z) + σ(t) − y
    per sample, η/B times)."""
    sr_teacher_history: bool = False
    """The SR teacher (DeepFM) reads one more field: the mean of the history's item-id
    embeddings (its own width-e table `t_sr_history`, MEAN-pooled over the real history items,
    zeros for an empty history), as the official teacher sees the RecBole `item_seq` token-
    sequence field. Needs the history's item ids in the batch (model.build.batch_fields asks
    the reader for them); no effect without model.use_sr or for the baselines."""
    use_st_intent: bool = True
    use_lt_intent: bool = True
    use_sr: bool = True
    use_ntp: bool = True
    # --- baselines ----------------------------------------------------------------------
    deepfm_mlp: tuple[int, ...] = (128, 128, 128)
    deepfm_dropout: float = 0.3
    dcn_cross_layers: int = 3
    din_attention_mlp: tuple[int, ...] = (64, 32)

    def __post_init__(self) -> None:
        """Ranges and combinations, as `ConfigError`s naming the key (a ValueError)."""
        for key in ("embedding_dim", "d_model", "d_ff", "num_encoder_layers",
                    "num_decoder_layers", "num_heads", "d_kv", "beam_width", "attn_heads"):
            check_value(f"model.{key}", getattr(self, key), ge=1)
        for key in ("attention_block", "generator_chunk", "dcn_cross_layers",
                    "cohort_member_cap"):  # 0 = off: one block, whole batch, none, no cap
            check_value(f"model.{key}", getattr(self, key), ge=0)
        for key in ("dropout", "t5_dropout", "attn_dropout", "deepfm_dropout"):
            check_value(f"model.{key}", getattr(self, key), ge=0, lt=1)
        for key in ("mu", "eta"):
            check_value(f"model.{key}", getattr(self, key), ge=0)
        for key in ("mlp", "deepfm_mlp", "din_attention_mlp"):
            check_each(f"model.{key}", getattr(self, key), ge=1)
        for key, allowed in (("mlp_dropout", ("after", "before")),
                             ("init", ("default", "xavier_normal"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key} must be one of {allowed}, got "
                                  f"{getattr(self, key)!r}")
        if self.d_model % self.attn_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by "
                              f"model.attn_heads ({self.attn_heads})")
        if self.reuse_cross_kv and self.absorb_cross_attention:
            raise ConfigError("model.reuse_cross_kv needs model.absorb_cross_attention = false "
                              "(absorbed cross-attention computes no keys/values to reuse)")
        if self.name == "genci" and not (self.use_st_intent or self.use_lt_intent):
            raise ConfigError("model.use_st_intent and model.use_lt_intent cannot both be "
                              "false")
