"""The CSR trie answers every query exactly as the dense-table trie (the reference) on random
code sets, including absent paths, out-of-range codes and partial prefixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genci_dist.tokenizer.semantic_ids import collision_digits
from genci_dist.tokenizer.trie import DenseSemanticIdTrie, SemanticIdTrie


def _codes(seed: int, n: int, widths: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, w, n) for w in widths[:-1]], 1)
    full = np.concatenate([codes, collision_digits(codes)[:, None]], 1)
    return full


@pytest.mark.parametrize("seed,n,widths", [(0, 40, [4, 3, 5, 8]), (1, 300, [8, 8, 8, 6]),
                                           (2, 1, [3, 3, 2]), (3, 500, [2, 2, 2, 90])])
def test_csr_equals_dense_on_random_codes(seed: int, n: int, widths: list[int]) -> None:
    full = _codes(seed, n, widths)
    widths = list(widths[:-1]) + [max(widths[-1], int(full[:, -1].max()) + 1)]
    ids = np.random.default_rng(seed + 10).permutation(np.arange(1, n + 1))
    csr, dense = SemanticIdTrie(full, ids, widths), DenseSemanticIdTrie(full, ids, widths)
    assert csr.nodes_per_depth() == dense.nodes_per_depth()
    rng = np.random.default_rng(seed + 20)
    for d in range(len(widths)):
        n_d = csr.nodes_per_depth()[d]
        nodes = torch.from_numpy(rng.integers(0, n_d, 200))
        codes = torch.from_numpy(rng.integers(0, widths[d], 200))
        assert torch.equal(csr.allowed(d, nodes), dense.allowed(d, nodes))
        assert torch.equal(csr.child(d, nodes, codes), dense.child(d, nodes, codes))
        every = torch.arange(n_d)
        assert torch.equal(csr.allowed(d, every), dense.allowed(d, every))
        assert torch.equal(csr.children[d], dense.children[d])
    # every item's path leads to its own id; random and out-of-range paths agree
    node = torch.zeros(n, dtype=torch.long)
    for d in range(len(widths)):
        node = csr.child(d, node, torch.from_numpy(full[:, d]))
    assert torch.equal(node, torch.from_numpy(ids))
    for length in range(1, len(widths) + 1):
        q = np.stack([rng.integers(-1, w + 1, 300) for w in widths[:length]], 1)
        q = torch.from_numpy(np.concatenate([q, full[:50, :length]]))
        got = csr.contains(q)
        assert torch.equal(got, dense.contains(q))
        assert got[300:].all() and len(got) == 300 + min(n, 50)


def test_hand_case_and_errors() -> None:
    full = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0]])
    t = SemanticIdTrie(full, np.array([7, 8, 9]), [3, 2, 2])
    assert t.nodes_per_depth() == [1, 2, 2]
    assert t.allowed(0, torch.tensor([0])).tolist() == [[True, False, True]]
    assert t.child(0, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])).tolist() == [0, -1, 1]
    assert t.allowed(1, torch.tensor([1, 0])).tolist() == [[True, False], [False, True]]
    assert t.child(2, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])).tolist() == [7, 8, 9]
    assert t.contains(torch.tensor([[0, 1], [2, 1], [3, 0]])).tolist() == [True, False, False]
    # 3 + 2 + 2 edges, one int64 key + target each, plus row pointers (2 + 3 + 3)
    assert t.nbytes() == (7 * 2 + 8) * 8
    with pytest.raises(ValueError, match="share a full semantic ID"):
        SemanticIdTrie(np.array([[0, 1], [0, 1]]), np.array([1, 2]), [2, 2])
    with pytest.raises(ValueError, match="outside its level's range"):
        SemanticIdTrie(np.array([[0, 2]]), np.array([1]), [2, 2])
