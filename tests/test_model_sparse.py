"""The sparse arch against direct table lookups: the intent EBC's cohort bags (Eq. 7 member
mean over the CSR members only), the deterministic member cap, and the feature EBC's pooling."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from data_pipes.schema import FeatureSpec
from genci_dist.model.sparse import FeatureEmbeddings, IntentEmbeddings, cap_members, cohort_kjt

CPU = torch.device("cpu")


def _random_csr(rng: np.random.Generator, n_cohorts: int, n_items: int, max_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    sizes = rng.integers(0, max_size + 1, n_cohorts)
    sizes[rng.integers(0, n_cohorts)] = 0  # at least one empty cohort
    indptr = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    members = rng.integers(1, n_items, indptr[-1]).astype(np.int64)
    return indptr, members


def _members_of(indptr: np.ndarray, members: np.ndarray, c: int) -> list[int]:
    return [] if c < 0 else members[indptr[c]:indptr[c + 1]].tolist()


def test_cohort_kjt_layout_is_target_then_member_bags() -> None:
    """Key "target_intent" holds the targets (one each), then "cohort_<n>" holds, per sample,
    exactly the CSR members of its level-n cohort; -1 and empty cohorts give empty bags."""
    indptr = torch.tensor([0, 2, 2, 5])              # cohort 1 is empty
    members = torch.tensor([7, 8, 1, 2, 3])
    cohorts = torch.tensor([[0, 2], [1, -1], [2, 0]])
    kjt = cohort_kjt(torch.tensor([4, 5, 6]), cohorts, indptr, members)
    assert kjt.keys() == ["target_intent", "cohort_0", "cohort_1"]
    assert kjt.stride() == 3
    d = kjt.to_dict()
    assert d["target_intent"].values().tolist() == [4, 5, 6]
    assert d["target_intent"].lengths().tolist() == [1, 1, 1]
    assert d["cohort_0"].lengths().tolist() == [2, 0, 3]
    assert d["cohort_0"].values().tolist() == [7, 8, 1, 2, 3]
    assert d["cohort_1"].lengths().tolist() == [3, 0, 2]
    assert d["cohort_1"].values().tolist() == [1, 2, 3, 7, 8]


def test_member_mean_equals_brute_force_over_csr_members() -> None:
    """E_C[b, n] = mean of the intent-table rows of cohort c_{b,n}'s members (float64 brute
    force; the denominator is the member count, no padding); empty / -1 cohorts → zeros; e_v
    is the target's row."""
    rng = np.random.default_rng(0)
    n_items, d, levels, n_cohorts = 50, 6, 3, 12
    indptr, members = _random_csr(rng, n_cohorts, n_items, max_size=9)
    torch.manual_seed(0)
    emb = IntentEmbeddings(n_items, d, levels, n_cohorts, use_table=False, device=CPU)
    assert emb.cohort_table is None
    table = emb.intent.embedding_bags["t_intent_item"].weight.detach().double()
    b = 16
    cohorts = torch.from_numpy(rng.integers(-1, n_cohorts, (b, levels)))
    cohorts[0] = -1
    cohorts[1, 0] = int(np.flatnonzero(np.diff(indptr) == 0)[0])  # an empty cohort
    target = torch.from_numpy(rng.integers(1, n_items, b))
    ptr, mem = cap_members(indptr, members, 0)
    e_v, e_c = emb(target, cohorts, ptr, mem)
    assert e_v.shape == (b, d) and e_c is not None and e_c.shape == (b, levels, d)
    assert torch.allclose(e_v.double(), table[target], atol=1e-6)
    n_empty = 0
    for i in range(b):
        for n in range(levels):
            ids = _members_of(indptr, members, int(cohorts[i, n]))
            if ids:
                ref = table[ids].sum(0) / len(ids)
            else:
                ref = torch.zeros(d, dtype=torch.float64)
                n_empty += 1
            assert torch.allclose(e_c[i, n].double(), ref, atol=1e-6), (i, n)
    assert n_empty >= levels + 1


def test_member_mean_gradient_reaches_only_member_rows() -> None:
    """d(sum E_C)/d table = (multiplicity / cohort size) per member row: the mean is exact and
    nothing but the members (and the target) is read."""
    indptr = np.array([0, 3, 4])
    members = np.array([1, 2, 2, 5])                 # item 2 twice in cohort 0
    emb = IntentEmbeddings(8, 4, 2, 2, use_table=False, device=CPU)
    ptr, mem = cap_members(indptr, members, 0)
    _, e_c = emb(torch.tensor([7]), torch.tensor([[0, 1]]), ptr, mem)
    assert e_c is not None
    e_c.sum().backward()
    grad = emb.intent.embedding_bags["t_intent_item"].weight.grad
    assert grad is not None
    expected = torch.zeros(8)
    expected[[1, 2, 5]] = torch.tensor([1 / 3, 2 / 3, 1.0])
    assert torch.allclose(grad.to_dense()[:, 0] if grad.is_sparse else grad[:, 0], expected)


def test_cohort_table_mode_reads_the_cohort_id_row() -> None:
    """cohort_repr = "table": E_C[b, n] = cohort table row c_{b,n}; -1 → zeros."""
    torch.manual_seed(0)
    emb = IntentEmbeddings(10, 4, 2, 5, use_table=True, device=CPU)
    assert emb.cohort_table is not None
    w = emb.cohort_table.embedding_bags["t_cohort"].weight.detach()
    cohorts = torch.tensor([[0, 4], [-1, 2]])
    _, e_c = emb(torch.tensor([1, 2]), cohorts, None, None)
    assert e_c is not None
    assert torch.allclose(e_c[0], w[[0, 4]])
    assert torch.equal(e_c[1, 0], torch.zeros(4)) and torch.allclose(e_c[1, 1], w[2])


def _cap_brute_force(indptr: np.ndarray, members: np.ndarray, cap: int
                     ) -> tuple[list[int], list[int]]:
    ptr, out = [0], []
    for c in range(len(indptr) - 1):
        ids = members[indptr[c]:indptr[c + 1]].tolist()
        if len(ids) > cap:
            ids = [ids[(j * len(ids)) // cap] for j in range(cap)]
        out += ids
        ptr.append(len(out))
    return ptr, out


def test_cap_members_evenly_spaced_deterministic_and_small_cohorts_untouched() -> None:
    """Cohorts above the cap keep members floor(j*size/cap), j < cap (first member kept, gaps
    differ by at most one); cohorts at or below the cap are copied unchanged; same input →
    same output; no cohort above the cap → the arrays unchanged."""
    rng = np.random.default_rng(1)
    indptr, members = _random_csr(rng, 20, 1000, max_size=30)
    members = rng.permutation(1000)[:indptr[-1]]   # distinct ids: positions are recoverable
    cap = 7
    ptr, mem = cap_members(indptr, members, cap)
    ref_ptr, ref_mem = _cap_brute_force(indptr, members, cap)
    assert ptr.tolist() == ref_ptr and mem.tolist() == ref_mem
    assert ptr.dtype == mem.dtype == torch.int64
    sizes = np.diff(indptr)
    assert (sizes > cap).sum() >= 3 and (sizes <= cap).sum() >= 3
    for c, s in enumerate(sizes):
        orig = members[indptr[c]:indptr[c + 1]].tolist()
        kept = mem[ptr[c]:ptr[c + 1]].tolist()
        if s <= cap:
            assert kept == orig
        else:
            pos = [orig.index(x) for x in kept]
            gaps = np.diff(pos)
            assert pos[0] == 0 and len(pos) == cap
            assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1   # evenly spaced
    ptr2, mem2 = cap_members(indptr, members, cap)
    assert torch.equal(ptr, ptr2) and torch.equal(mem, mem2)
    for big_cap in (int(sizes.max()), 0):               # nothing to cap / cap disabled
        p, m = cap_members(indptr, members, big_cap)
        assert p.tolist() == indptr.tolist() and m.tolist() == members.tolist()


def test_feature_embeddings_pool_sum_single_and_mean_multi() -> None:
    """fields[b, f] = table_f[id] for single-valued features (SUM of a bag of 0/1 ids: empty →
    zeros), mean of the bag's rows for multi-valued ones (empty → zeros); E_u / E_v are the
    user / item fields concatenated in manifest order."""
    feats = [FeatureSpec("user_id", "user", False, 9), FeatureSpec("item_id", "item", False, 11),
             FeatureSpec("tags", "item", True, 6), FeatureSpec("age", "user", False, 4)]
    torch.manual_seed(0)
    fe = FeatureEmbeddings(feats, 5, CPU)
    bags: dict[str, list[list[int]]] = {
        "user_id": [[3], [8], [], [1]],
        "item_id": [[10], [2], [2], [5]],
        "tags": [[1, 2, 2], [], [5], [4, 1]],
        "age": [[0], [3], [1], [2]],
    }
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in feats],
        values=torch.tensor([v for f in feats for bag in bags[f.name] for v in bag]),
        lengths=torch.tensor([len(bag) for f in feats for bag in bags[f.name]]))
    fields, e_u, e_v = fe(kjt)
    assert fields.shape == (4, 4, 5)

    def ref(f: FeatureSpec, bag: list[int]) -> Tensor:
        w = fe.ebc.embedding_bags[f"t_{f.name}"].weight.detach().double()
        if not bag:
            return torch.zeros(5, dtype=torch.float64)
        return w[bag].mean(0) if f.multi else w[bag].sum(0)

    for b in range(4):
        for j, f in enumerate(feats):
            assert torch.allclose(fields[b, j].double(), ref(f, bags[f.name][b]), atol=1e-6)
    assert torch.equal(e_u, torch.cat([fields[:, 0], fields[:, 3]], 1))
    assert torch.equal(e_v, torch.cat([fields[:, 1], fields[:, 2]], 1))
