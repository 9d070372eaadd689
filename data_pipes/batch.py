"""The typed model input. Everything that turns rows into tensors happens before this point
(id mapping, semantic-code lookup, padding, the KeyedJaggedTensors), so the sharded model never
rewrites its input and TorchRec's train pipeline can overlap it.

Layout for a batch of B samples whose longest history has L items, T tokens per item:

- ``sparse_features``  KJT, stride B, keys = manifest feature names in manifest order
  (user_id, ..., item_id, ..., multi-valued features with their list lengths). Pooled by EBCs.
- ``sequence_features`` KJT, stride B, one key ``history_item_id``: the history item ids,
  lengths = history lengths (may be 0). For EmbeddingCollections (per-position embeddings).
- ``history``          (B, L) int64 item ids, oldest first, left-aligned, 0-padded on the right.
  These two only when the reader is asked for the history's item ids (`with_history_ids`,
  which DIN needs); otherwise the KJT has no key and ``history`` is (B, 0). GenCI reads its
  history as tokens: leaving the ids out takes ~15 % off the reader's CPU (the data_pipes/bench_reader.py docstring).
- ``history_lengths``  (B,) int64.
- ``history_tokens``   (B, L*T) int32 semantic-ID tokens of the history (TokenVocab ids),
  0-padded; empty (B, 0) when the dataset has no semantic IDs yet. int32, not int64: half
  the bytes per batch, and embeddings take int32 indices (losses cast targets to long).
- ``target_tokens``    (B, T) int32 tokens of the target item (B, 0 without semantic IDs).
- ``labels``           (B,) float32 in {0, 1}.
- ``user_ids``, ``item_ids`` (B,) int64 dense ids (GAUC groups, predictions file).
- ``row_ids``          (B,) int64 the sample's global row index within its split (exactly-once
  checks, per-sample predictions).

KJT values and lengths are int64. The reader builds all of a batch's tensors as views of one
storage (`alloc_storage` below), so a DataLoader worker ships a batch in one shared-memory piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    sparse_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    history: torch.Tensor
    history_lengths: torch.Tensor
    history_tokens: torch.Tensor
    target_tokens: torch.Tensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    row_ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device=device, non_blocking=non_blocking)
                        for f in fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:  # CUDA pipelining only
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


# numpy dtype of a batch array → the torch dtype of its tensor view
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32}


def alloc_storage(specs: list[tuple[tuple[int, ...], np.dtype]]
                  ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Arrays of the given (shape, dtype) carved out of one new storage (each start 64-byte
    aligned), as numpy (to fill) and torch (same memory). A worker hands a Batch to the main
    process through shared memory one storage at a time, so one storage instead of ~12 makes
    num_workers > 0 much cheaper. (Plain Python arithmetic: this runs once per batch.)"""
    starts, end = storage_places(specs)
    buf = np.empty(end, dtype=np.uint8)
    flat = torch.from_numpy(buf)
    typed = {d: flat.view(t) for d, t in _TORCH_DTYPES.items()}  # end % 64 == 0: all fit
    views, tensors = [], []
    for a, (shape, dtype) in zip(starts, specs, strict=True):
        views.append(np.ndarray(shape, dtype, buf, a))
        strides = (shape[1], 1) if len(shape) == 2 else (1,)  # 1-D and 2-D only
        tensors.append(typed[dtype].as_strided(shape, strides, a // dtype.itemsize))
    return views, tensors


def storage_places(specs: list[tuple[tuple[int, ...], np.dtype]]) -> tuple[list[int], int]:
    """(byte offset of each array, total bytes) of `alloc_storage`'s storage: each start 64-byte
    aligned, the total a multiple of 64."""
    starts, end = [], 0
    for shape, dtype in specs:
        starts.append(end)
        end += -(math.prod(shape) * dtype.itemsize // -64) * 64
    return starts, end

