"""Prefix trie of every existing item's semantic ID, stored as arrays for batched queries.

Depth d holds the distinct prefixes of length d as node ids 0..n_d-1 (node 0 of depth 0 is
the root). ``children[d]`` is a dense int64 table [n_d, K_d] giving the child node id at depth
d+1 for each next code, or -1 when no item continues that way; at the last depth the "child"
is the item id. Queries take a whole batch of nodes at once (one gather), which is what a
vectorised constrained beam search needs. Dense tables cost n_d × K_d entries: for 3 × 256
codes over a few hundred thousand items that is fine; a CSR variant would be the step toward
10^7 items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class SemanticIdTrie:
    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, widths: list[int]) -> None:
        """codes [n_items, D] int (digit d in [0, widths[d])), item_ids [n_items]."""
        codes = np.asarray(codes, dtype=np.int64)
        n, depth = codes.shape
        if len(widths) != depth:
            raise ValueError(f"trie: {depth} digits but {len(widths)} widths")
        if n and ((codes < 0).any() or (codes >= np.asarray(widths)).any()):
            raise ValueError("trie: a code is outside its level's range")
        keys = np.unique(codes, axis=0, return_counts=True)
        if n and keys[1].max() > 1:
            raise ValueError("trie: two items share a full semantic ID (collision digit "
                             "missing?)")
        self.widths = list(widths)
        self.children: list[Tensor] = []
        node = np.zeros(n, dtype=np.int64)            # node id of each item's prefix so far
        n_nodes = 1
        for d in range(depth):
            table = np.full((n_nodes, widths[d]), -1, dtype=np.int64)
            if d == depth - 1:
                table[node, codes[:, d]] = item_ids
            else:
                pair = node * widths[d] + codes[:, d]
                uniq, child = np.unique(pair, return_inverse=True)
                table[uniq // widths[d], uniq % widths[d]] = np.arange(uniq.size)
                node, n_nodes = child.reshape(-1), uniq.size
            self.children.append(torch.from_numpy(table))

    @property
    def depth(self) -> int:
        return len(self.children)

    def nodes_per_depth(self) -> list[int]:
        return [int(c.shape[0]) for c in self.children]

    def allowed(self, depth: int, nodes: Tensor) -> Tensor:
        """Bool [M, K_depth]: which next codes exist below each node."""
        return self.children[depth].to(nodes.device)[nodes] >= 0

    def child(self, depth: int, nodes: Tensor, codes: Tensor) -> Tensor:
        """Child node ids (or item ids at the last depth); -1 where the path does not exist."""
        return self.children[depth].to(nodes.device)[nodes, codes]

    def contains(self, codes: Tensor) -> Tensor:
        """Bool [M]: whether each full or partial code path [M, d] exists."""
        node = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        ok = torch.ones_like(node, dtype=torch.bool)
        for d in range(codes.shape[1]):
            c = codes[:, d]
            in_range = (c >= 0) & (c < self.widths[d])
            nxt = self.child(d, node.clamp(min=0), c.clamp(0, self.widths[d] - 1))
            ok &= in_range & (nxt >= 0)
            node = nxt
        return ok
