"""Cohort index (paper §2.2.1): which items form each semantic cohort, as CSR arrays.

Two modes (the model chooses with ``cohort_mode``):

- ``code`` (paper): cohort (level n, code k) = all items whose n-th code is k; cohort id
  n*K + k, N*K cohorts (empty ones allowed). Arrays ``code_indptr`` int64 [N*K+1],
  ``code_members`` int32 item ids, ascending within each cohort.
- ``prefix`` (nested, coarse → fine): items sharing codes c_0..c_n. Key of that prefix
  n*K**N + sum_{i<=n} c_i*K**(N-1-i); ``prefix_keys`` int64 [C] ascending, ``prefix_indptr``
  int64 [C+1], ``prefix_members`` int32. The cohort id of a prefix is its row in prefix_keys.

``code_sizes`` / ``prefix_sizes`` hold the true sizes; with a member cap the member lists of
larger cohorts are a deterministic seeded sample (still ascending). Stored as cohorts.npz with
``levels``, ``codebook_size``, ``member_cap`` and the semantic IDs' ``content_hash``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data_pipes.schema import COHORTS, DatasetError

MODES = ("code", "prefix")


def prefix_keys(codes: np.ndarray | Tensor, codebook_size: int) -> np.ndarray | Tensor:
    """codes [B, N] → int64 keys [B, N]: column n = key of the prefix (c_0..c_n)."""
    n_levels = codes.shape[1]
    k = codebook_size
    if isinstance(codes, Tensor):
        c = codes.long()
        w = torch.tensor([k ** (n_levels - 1 - i) for i in range(n_levels)], device=c.device)
        base = torch.arange(n_levels, device=c.device) * k ** n_levels
        return torch.cumsum(c * w, dim=1) + base
    c = np.asarray(codes, dtype=np.int64)
    w = np.array([k ** (n_levels - 1 - i) for i in range(n_levels)], dtype=np.int64)
    return np.cumsum(c * w, axis=1) + np.arange(n_levels, dtype=np.int64) * k ** n_levels


def _csr(group: np.ndarray, item_ids: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(group, kind="stable")  # items arrive ascending → ascending in cohorts
    indptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group, minlength=n_groups), out=indptr[1:])
    return indptr, item_ids[order].astype(np.int32)


def _cap(indptr: np.ndarray, members: np.ndarray, cap: int,
         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keeps at most ``cap`` members per cohort: a seeded sample, per cohort (cohort c uses
    seed (seed, c)), sorted ascending."""
    sizes = np.diff(indptr)
    if cap <= 0 or sizes.max(initial=0) <= cap:
        return indptr, members
    parts = []
    for c, (a, b) in enumerate(zip(indptr[:-1], indptr[1:], strict=True)):
        seg = members[a:b]
        if len(seg) > cap:
            rng = np.random.default_rng([seed, c])
            seg = np.sort(rng.choice(seg, cap, replace=False))
        parts.append(seg)
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.minimum(sizes, cap), out=new_indptr[1:])
    return new_indptr, np.concatenate(parts).astype(np.int32)


@dataclass(frozen=True)
class CohortIndex:
    levels: int
    codebook_size: int
    code_indptr: Tensor
    """int64 [N*K+1]."""
    code_members: Tensor
    """int32 item ids."""
    code_sizes: Tensor
    """int64 [N*K] true cohort sizes (before any member cap)."""
    prefix_keys: Tensor
    """int64 [C] ascending."""
    prefix_indptr: Tensor
    """int64 [C+1]."""
    prefix_members: Tensor
    """int32 item ids."""
    prefix_sizes: Tensor
    """int64 [C]."""
    member_cap: int = 0
    content_hash: str = ""

    @classmethod
    def build(cls, codes: np.ndarray, codebook_size: int, *, member_cap: int = 0,
              seed: int = 0, content_hash: str = "") -> CohortIndex:
        """codes [M, N] of items 1..M (row i = item i+1)."""
        codes = np.asarray(codes, dtype=np.int64)
        m, n_levels = codes.shape
        k = codebook_size
        item_ids = np.arange(1, m + 1, dtype=np.int32)
        all_items = np.tile(item_ids, n_levels)
        cid = (codes + np.arange(n_levels) * k).T.reshape(-1)  # level-major, items ascending
        c_ptr, c_mem = _csr(cid, all_items, n_levels * k)
        keys_all = prefix_keys(codes, k).T.reshape(-1)
        uniq, group = np.unique(keys_all, return_inverse=True)
        p_ptr, p_mem = _csr(group.reshape(-1), all_items, len(uniq))
        c_sizes, p_sizes = np.diff(c_ptr), np.diff(p_ptr)
        c_ptr, c_mem = _cap(c_ptr, c_mem, member_cap, seed)
        p_ptr, p_mem = _cap(p_ptr, p_mem, member_cap, seed + 1)
        t = torch.from_numpy
        return cls(n_levels, k, t(c_ptr), t(c_mem), t(c_sizes), t(uniq.astype(np.int64)),
                   t(p_ptr), t(p_mem), t(p_sizes), member_cap, content_hash)

    def num_cohorts(self, mode: str) -> int:
        return self.levels * self.codebook_size if mode == "code" else len(self.prefix_keys)

    def csr(self, mode: str) -> tuple[Tensor, Tensor]:
        """(indptr int64 [C+1], members int32) of the mode."""
        _check_mode(mode)
        if mode == "code":
            return self.code_indptr, self.code_members
        return self.prefix_indptr, self.prefix_members

    def cohort_ids(self, codes: Tensor, mode: str) -> Tensor:
        """codes LongTensor [B, N] → cohort ids LongTensor [B, N] (column n = the cohort at
        level n); -1 where a code is outside [0, K) or a prefix has no cohort."""
        _check_mode(mode)
        codes = codes.long()
        n_levels, k = self.levels, self.codebook_size
        if codes.dim() != 2 or codes.shape[1] != n_levels:
            raise ValueError(f"codes must be [B, {n_levels}], got {tuple(codes.shape)}")
        valid = (codes >= 0) & (codes < k)
        if mode == "code":
            ids = codes + torch.arange(n_levels, device=codes.device) * k
        else:
            # a bad code at level i invalidates every prefix that contains it
            valid = torch.cummin(valid.int(), dim=1).values.bool()
            keys = prefix_keys(codes.clamp(0, k - 1), k)
            table = self.prefix_keys.to(codes.device)
            pos = torch.searchsorted(table, keys).clamp(max=max(len(table) - 1, 0))
            found = table[pos] == keys if len(table) else torch.zeros_like(valid)
            ids = pos
            valid = valid & found
        return torch.where(valid, ids, torch.full_like(ids, -1))

    def size_histogram(self, mode: str) -> dict[str, dict[str, int]]:
        """Per level: number of cohorts by true size bucket (0, 1, 2-4, 5-16, ..., >1024)."""
        _check_mode(mode)
        edges = [0, 1, 2, 5, 17, 65, 257, 1025]
        labels = ["0", "1", "2-4", "5-16", "17-64", "65-256", "257-1024", ">1024"]
        out = {}
        for n in range(self.levels):
            if mode == "code":
                sizes = self.code_sizes[n * self.codebook_size:(n + 1) * self.codebook_size]
            else:
                lvl = torch.div(self.prefix_keys, self.codebook_size ** self.levels,
                                rounding_mode="floor")
                sizes = self.prefix_sizes[lvl == n]
            b = np.searchsorted(edges, sizes.numpy(), side="right") - 1
            counts = np.bincount(b, minlength=len(labels))
            out[f"level_{n}"] = {lab: int(c) for lab, c in zip(labels, counts, strict=True) if c}
        return out

    def save(self, dataset_dir: str | Path) -> Path:
        """Writes <dataset_dir>/cohorts.npz atomically."""
        path = Path(dataset_dir) / COHORTS
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        arrays = {f: getattr(self, f).numpy() for f in _ARRAYS}
        np.savez(tmp, levels=np.int64(self.levels), codebook_size=np.int64(self.codebook_size),
                 member_cap=np.int64(self.member_cap), content_hash=np.str_(self.content_hash),
                 **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, dataset_dir: str | Path, expected_hash: str | None = None) -> CohortIndex:
        """Reads cohorts.npz; with ``expected_hash`` (SemanticIds.content_hash) refuses an
        index built from other semantic IDs."""
        path = Path(dataset_dir) / COHORTS
        if not path.is_file():
            raise DatasetError(f"{path}: no cohort index; run genci-tokenize on {dataset_dir}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {name: z[name] for name in z.files}
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: unreadable cohort index ({e})") from e
        missing = [f for f in ("levels", "codebook_size", *_ARRAYS) if f not in data]
        if missing:
            raise DatasetError(f"{path}: arrays {missing} missing; rerun genci-tokenize")
        content = str(data.get("content_hash", ""))
        if expected_hash is not None and content != expected_hash:
            raise DatasetError(f"{path}: built for semantic IDs {content[:12] or 'unknown'}…, "
                               f"not the current ones ({expected_hash[:12]}…); rerun "
                               "genci-tokenize")
        t = {f: torch.from_numpy(np.ascontiguousarray(data[f])) for f in _ARRAYS}
        idx = cls(int(data["levels"]), int(data["codebook_size"]),
                  member_cap=int(data.get("member_cap", 0)), content_hash=content, **t)
        idx._validate(path)
        return idx

    def _validate(self, path: Path) -> None:
        n_code = self.levels * self.codebook_size
        for name, ptr, mem, n in (("code", self.code_indptr, self.code_members, n_code),
                                  ("prefix", self.prefix_indptr, self.prefix_members,
                                   len(self.prefix_keys))):
            if (len(ptr) != n + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != len(mem)
                    or bool((ptr[1:] < ptr[:-1]).any())):
                raise DatasetError(f"{path}: {name}_indptr inconsistent with {name}_members")


_ARRAYS = ("code_indptr", "code_members", "code_sizes", "prefix_keys", "prefix_indptr",
           "prefix_members", "prefix_sizes")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"cohort mode must be one of {MODES}, got {mode!r}")
