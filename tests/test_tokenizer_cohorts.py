"""Cohort CSR index against brute-force grouping; cohort id lookup; save/load; member cap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipes.schema import DatasetError
from genci_dist.tokenizer.cohorts import CohortIndex


def _codes(m: int = 500, n: int = 3, k: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=(m, n))


def _members(indptr: torch.Tensor, members: torch.Tensor, c: int) -> list[int]:
    return members[int(indptr[c]):int(indptr[c + 1])].tolist()


def test_code_mode_equals_brute_force() -> None:
    codes, k = _codes(), 6
    idx = CohortIndex.build(codes, k)
    assert idx.code_indptr.dtype == torch.int64 and idx.code_members.dtype == torch.int32
    assert len(idx.code_indptr) == 3 * k + 1
    for n in range(3):
        for code in range(k):
            brute = [i + 1 for i in range(len(codes)) if codes[i, n] == code]
            assert _members(idx.code_indptr, idx.code_members, n * k + code) == brute
            assert int(idx.code_sizes[n * k + code]) == len(brute)


def test_prefix_mode_equals_brute_force() -> None:
    codes, k = _codes(k=4), 4
    idx = CohortIndex.build(codes, k)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(codes.tolist()):
        for n in range(3):
            key = n * k**3 + sum(c[j] * k ** (2 - j) for j in range(n + 1))
            groups.setdefault(key, []).append(i + 1)
    assert idx.prefix_keys.tolist() == sorted(groups)
    for row, key in enumerate(idx.prefix_keys.tolist()):
        assert _members(idx.prefix_indptr, idx.prefix_members, row) == groups[key]


def test_cohort_ids_both_modes() -> None:
    k = 4
    codes = np.array([[0, 1, 2], [0, 1, 3], [3, 0, 0]])
    idx = CohortIndex.build(codes, k)
    q = torch.tensor([[0, 1, 3], [3, 0, 1], [0, 2, 2], [3, 5, 0]])
    assert idx.cohort_ids(q, "code").tolist() == [[0, 5, 11], [3, 4, 9], [0, 6, 10],
                                                  [3, -1, 8]]
    pid = idx.cohort_ids(q, "prefix")
    keys = idx.prefix_keys.tolist()

    def row(n: int, c: list[int]) -> int:
        return keys.index(n * k**3 + sum(c[j] * k ** (2 - j) for j in range(n + 1)))

    assert pid[0].tolist() == [row(0, [0]), row(1, [0, 1]), row(2, [0, 1, 3])]
    assert pid[1].tolist() == [row(0, [3]), row(1, [3, 0]), -1]   # (3,0,1) is no item
    assert pid[2].tolist() == [row(0, [0]), -1, -1]               # (0,2) is no prefix
    assert pid[3].tolist() == [row(0, [3]), -1, -1]               # code 5 is out of range
    # every existing item's own prefixes resolve to cohorts that contain it
    own = idx.cohort_ids(torch.from_numpy(codes), "prefix")
    for i in range(3):
        for n in range(3):
            assert i + 1 in _members(idx.prefix_indptr, idx.prefix_members, int(own[i, n]))


def test_save_load_round_trip_and_hash_check(tmp_path: Path) -> None:
    idx = CohortIndex.build(_codes(), 6, content_hash="abc123")
    idx.save(tmp_path)
    back = CohortIndex.load(tmp_path, expected_hash="abc123")
    for f in ("code_indptr", "code_members", "prefix_keys", "prefix_indptr", "prefix_members"):
        assert torch.equal(getattr(idx, f), getattr(back, f)), f
    assert (back.levels, back.codebook_size) == (3, 6)
    with pytest.raises(DatasetError, match="not the current ones"):
        CohortIndex.load(tmp_path, expected_hash="other")
    with pytest.raises(DatasetError, match="no cohort index"):
        CohortIndex.load(tmp_path / "nowhere")


def test_member_cap_is_deterministic_sample_with_true_sizes() -> None:
    codes = _codes(m=400, k=3)
    full = CohortIndex.build(codes, 3)
    a = CohortIndex.build(codes, 3, member_cap=20, seed=5)
    b = CohortIndex.build(codes, 3, member_cap=20, seed=5)
    assert torch.equal(a.code_members, b.code_members)
    assert torch.equal(a.code_sizes, full.code_sizes)
    for c in range(9):
        got = _members(a.code_indptr, a.code_members, c)
        allm = set(_members(full.code_indptr, full.code_members, c))
        assert len(got) == min(20, len(allm)) and set(got) <= allm and got == sorted(got)


def test_size_histogram_counts_all_cohorts() -> None:
    idx = CohortIndex.build(np.array([[0, 0], [0, 1], [0, 1], [1, 1]]), 3)
    h = idx.size_histogram("code")
    assert h["level_0"] == {"0": 1, "1": 1, "2-4": 1}
    assert h["level_1"] == {"0": 1, "1": 1, "2-4": 1}
    assert idx.size_histogram("prefix")["level_1"] == {"1": 2, "2-4": 1}
