"""The reader's semantic-ID token table: tokens[item] with the TokenVocab offsets applied,
computed from semantic_ids.parquet and shared by every process on a host as one
memory-mapped file (`load_item_tokens`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_pipes.schema import ITEM, ITEM_TOKENS_STEM, SEMANTIC_IDS, DatasetError, TokenVocab

# Semantic-ID tokens are int32: TokenVocab ids are small, torch embeddings take int32 (or
# int64) indices, and half the bytes of int64 is what a worker ships per batch. (int16 would
# fit small vocabularies too, but nn.Embedding rejects int16 indices.)
TOKEN_DTYPE = np.int32


def _token_vocab(path: Path, meta: dict[bytes, bytes]) -> TokenVocab:
    try:
        vocab = TokenVocab(int(meta[b"levels"]), int(meta[b"codebook_size"]),
                           int(meta[b"n_collision"]))
    except KeyError as e:
        raise DatasetError(f"{path}: schema metadata lacks {e.args[0]!r}") from None
    if vocab.size > np.iinfo(TOKEN_DTYPE).max:
        raise DatasetError(f"{path}: token vocabulary of {vocab.size} does not fit int32")
    return vocab


def build_item_tokens(path: Path) -> tuple[np.ndarray, TokenVocab]:
    """The token table computed from semantic_ids.parquet, in memory."""
    table = pq.read_table(path)
    vocab = _token_vocab(path, table.schema.metadata or {})
    item = table.column(ITEM).to_numpy()
    codes = [table.column(f"code_{n}").to_numpy() for n in range(vocab.levels)]
    codes.append(table.column("collision").to_numpy())
    tokens = np.zeros((int(item.max(initial=0)) + 1, vocab.levels + 1), dtype=TOKEN_DTYPE)
    for pos, (col, off) in enumerate(zip(codes, vocab.offsets(), strict=True)):
        tokens[item, pos] = col.astype(np.int64) + off
    return tokens, vocab


def item_tokens_file(dataset_dir: Path, meta: dict[bytes, bytes]) -> Path | None:
    """Where the memory-mapped token table of this semantic_ids.parquet lives: named by the
    file's content hash and vocabulary, so a re-tokenised dataset never reads a stale table;
    None when the file carries no content hash (hand-written tables: built in memory)."""
    if b"content_hash" not in meta:
        return None
    key = b"|".join(meta.get(k, b"") for k in
                    (b"content_hash", b"levels", b"codebook_size", b"n_collision"))
    return dataset_dir / f"{ITEM_TOKENS_STEM}-{hashlib.sha256(key).hexdigest()[:16]}.npy"


def load_item_tokens(dataset_dir: str | Path, mmap: bool = True) -> tuple[np.ndarray, TokenVocab]:
    """(tokens[n_items+1, T] int32 with TokenVocab offsets applied, vocab); row 0 = padding.

    mmap=True: the table is a read-only memory map of ``item_tokens-<hash>.npy`` beside
    semantic_ids.parquet (written atomically by the first process that needs it), so every rank
    and every reader worker on a host shares one copy in the page cache instead of each holding
    its own (10^7 items x 4 tokens = 160 MB per process otherwise). A dataset folder that cannot
    be written falls back to the in-memory table."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / SEMANTIC_IDS
    if not path.is_file():
        raise DatasetError(f"{path}: no semantic IDs; run genci-tokenize first")
    meta = pq.read_schema(path).metadata or {}
    vocab = _token_vocab(path, meta)
    cache = item_tokens_file(dataset_dir, meta) if mmap else None
    if cache is not None and cache.is_file():
        tokens = np.load(cache, mmap_mode="r")
        if tokens.dtype == TOKEN_DTYPE and tokens.ndim == 2 \
                and tokens.shape[1] == vocab.tokens_per_item:
            return tokens, vocab
    tokens, vocab = build_item_tokens(path)
    if cache is None:
        return tokens, vocab
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, tokens)
        tmp.replace(cache)      # atomic: concurrent ranks each publish the same bytes
        for old in dataset_dir.glob(f"{ITEM_TOKENS_STEM}-*.npy"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError:
        tmp.unlink(missing_ok=True)
        return tokens, vocab
    return np.load(cache, mmap_mode="r"), vocab
