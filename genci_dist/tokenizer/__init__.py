"""Item tokenizer (paper §2.2.1): item text → sentence-transformers embeddings → RQ-VAE →
semantic IDs (N codes + a collision digit) → cohort index. Entry point: `genci-tokenize`
(`genci_dist.tokenizer.cli:main`). Submodules are imported lazily by their users: this package
must stay cheap to import (the job config imports `tokenizer.config`).
"""
