"""Prefix trie of every existing item's semantic ID, stored as arrays for batched queries.

Depth d holds the distinct prefixes of length d as node ids 0..n_d-1 (node 0 of depth 0 is
the root); at the last depth the "child" is the item id. Queries take a whole batch of nodes at
once, which is what a vectorised constrained beam search needs.

`SemanticIdTrie` stores each depth in CSR form: the edges (node, code) sorted by node then
code, as one sorted int64 key ``node * K_d + code`` per edge plus the edge's child id and a
row pointer per node. Memory is O(edges) = O(items × depth) whatever K is (a dense table costs
n_d × K_d entries: at 10^7 items and K = 256 that is ~20 GB at the second depth); ``child`` is
a binary search over the keys, ``allowed`` scatters each node's edge run into a bool row.
`DenseSemanticIdTrie` is the former dense-table layout, kept as the reference (tests compare
the two on random code sets) and for small tries where a gather is all one wants.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check(codes: np.ndarray, widths: list[int]) -> tuple[np.ndarray, int, int]:
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"trie: codes must be [n_items, depth], got shape {codes.shape}")
    n, depth = codes.shape
    if len(widths) != depth:
        raise ValueError(f"trie: {depth} digits but {len(widths)} widths")
    if n and ((codes < 0).any() or (codes >= np.asarray(widths)).any()):
        raise ValueError("trie: a code is outside its level's range")
    if n:
        _, counts = np.unique(codes, axis=0, return_counts=True)
        if counts.max() > 1:
            raise ValueError("trie: two items share a full semantic ID (collision digit "
                             "missing?)")
    return codes, n, depth


class SemanticIdTrie:
    """CSR trie: per depth d, ``keys[d]`` (sorted node * K_d + code), ``targets[d]`` (child
    node id, or item id at the last depth) and ``indptr[d]`` [n_d + 1] (edge run of each node)."""

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, widths: list[int]) -> None:
        """codes [n_items, D] int (digit d in [0, widths[d])), item_ids [n_items]."""
        codes, n, depth = _check(codes, widths)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        self.widths = list(widths)
        self.keys: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.indptr: list[Tensor] = []
        node = np.zeros(n, dtype=np.int64)
        n_nodes = 1
        for d in range(depth):
            k = widths[d]
            pair = node * k + codes[:, d]
            if d == depth - 1:
                order = np.argsort(pair, kind="stable")
                uniq, target = pair[order], item_ids[order]
            else:
                uniq, child = np.unique(pair, return_inverse=True)
                target = np.arange(uniq.size, dtype=np.int64)
                node_next = child.reshape(-1)
            indptr = np.searchsorted(uniq // k, np.arange(n_nodes + 1), side="left")
            self.keys.append(torch.from_numpy(np.ascontiguousarray(uniq)))
            self.targets.append(torch.from_numpy(np.ascontiguousarray(target)))
            self.indptr.append(torch.from_numpy(indptr.astype(np.int64)))
            if d < depth - 1:
                node, n_nodes = node_next, uniq.size
        self._dense: list[Tensor] | None = None

    @property
    def depth(self) -> int:
        return len(self.keys)

    def nodes_per_depth(self) -> list[int]:
        return [int(p.numel()) - 1 for p in self.indptr]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.targets, *self.indptr))

    def allowed(self, depth: int, nodes: Tensor) -> Tensor:
        """Bool [M, K_depth]: which next codes exist below each node."""
        ptr, keys, k = self.indptr[depth], self.keys[depth], self.widths[depth]
        nodes = nodes.reshape(-1).cpu()
        start, stop = ptr[nodes], ptr[nodes + 1]
        counts = stop - start
        out = torch.zeros(nodes.numel(), k, dtype=torch.bool)
        total = int(counts.sum())
        if total:
            row = torch.repeat_interleave(torch.arange(nodes.numel()), counts)
            first = torch.cumsum(counts, 0) - counts
            pos = torch.repeat_interleave(start - first, counts) + torch.arange(total)
            out[row, keys[pos] % k] = True
        return out

    def child(self, depth: int, nodes: Tensor, codes: Tensor) -> Tensor:
        """Child node ids (or item ids at the last depth); -1 where the path does not exist."""
        keys, k = self.keys[depth], self.widths[depth]
        shape = torch.broadcast_shapes(nodes.shape, codes.shape)
        q = (nodes.cpu().to(torch.int64) * k + codes.cpu().to(torch.int64)).expand(shape)
        q = q.reshape(-1)
        if keys.numel() == 0:
            return torch.full(shape, -1, dtype=torch.long)
        pos = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
        hit = keys[pos] == q
        return torch.where(hit, self.targets[depth][pos], torch.full_like(q, -1)).view(shape)

    def contains(self, codes: Tensor) -> Tensor:
        """Bool [M]: whether each full or partial code path [M, d] exists."""
        node = torch.zeros(codes.shape[0], dtype=torch.long)
        ok = torch.ones_like(node, dtype=torch.bool)
        codes = codes.cpu()
        for d in range(codes.shape[1]):
            c = codes[:, d]
            in_range = (c >= 0) & (c < self.widths[d])
            nxt = self.child(d, node.clamp(min=0), c.clamp(0, self.widths[d] - 1))
            ok &= in_range & (nxt >= 0)
            node = nxt
        return ok

    @property
    def children(self) -> list[Tensor]:
        """The dense per-depth tables [n_d, K_d] (-1 = no child), built on first use — for
        small tries and debugging tools only (O(n_d × K_d) memory)."""
        if self._dense is None:
            dense = []
            for d in range(self.depth):
                k, n_nodes = self.widths[d], self.nodes_per_depth()[d]
                table = torch.full((n_nodes * k,), -1, dtype=torch.long)
                table[self.keys[d]] = self.targets[d]
                dense.append(table.view(n_nodes, k))
            self._dense = dense
        return self._dense


class DenseSemanticIdTrie:
    """The dense layout: ``children[d]`` is an int64 table [n_d, K_d] giving the child node id
    at depth d+1 for each next code, or -1; at the last depth the "child" is the item id."""

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, widths: list[int]) -> None:
        codes, n, depth = _check(codes, widths)
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.children)

    def allowed(self, depth: int, nodes: Tensor) -> Tensor:
        """Bool [M, K_depth]: which next codes exist below each node."""
        return self.children[depth].to(nodes.device)[nodes] >= 0

    def child(self, depth: int, nodes: Tensor, codes: Tensor) -> Tensor:
        """Child node ids (or item ids at the last depth); -1 where the path does not exist."""
        return self.children[depth].to(nodes.device)[nodes, codes]

    # the same walk over child(): only child() differs between the two layouts
    contains = SemanticIdTrie.contains
