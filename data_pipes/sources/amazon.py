"""Amazon Reviews 2023 source (SPEC §1.2): `<Category>.jsonl(.gz)` reviews plus the
`meta_<Category>.jsonl(.gz)` file next to it.

Protocol: the iterative 5-core filter runs on the raw interactions (every rating, before the
label rule, as the paper filters its raw logs), then the label rule drops rating 3, and users
and items that still interact get dense ids 1..n (0 = padding) in sorted raw-id order.
Timestamps are milliseconds in the files and seconds (floor) in the prepared data; ties are
broken by dense item id as for MovieLens. Duplicate reviews are kept as separate interactions.

Features: user_id; item_id, categories (bag of dense ids), store (dense id, 0 = missing).
Item text: "title; categories; description" (description cut to DESCRIPTION_CHARS).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_pipes.protocol import Interactions, dense_ids, five_core
from data_pipes.schema import DatasetError
from data_pipes.writer import SideTable, list_array, sha256_file

REVIEW_FIELDS = ("user_id", "parent_asin", "rating", "timestamp")
DESCRIPTION_CHARS = 300


def _open(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, parsed object) of every non-blank line; bad JSON names the line."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise DatasetError(f"{path}: line {lineno}: JSON nested too deeply") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"{path}: line {lineno}: expected a JSON object")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:  # truncated gzip, binary junk
        raise DatasetError(f"{path}: unreadable ({e})") from None


def meta_path(reviews: Path) -> Path:
    """`.../Musical_Instruments.jsonl.gz` → `.../meta_Musical_Instruments.jsonl.gz` (either
    compression of the meta file is accepted)."""
    name = reviews.name
    stem = name[:-len(".jsonl.gz")] if name.endswith(".jsonl.gz") else name[:-len(".jsonl")]
    for ext in (".jsonl", ".jsonl.gz"):
        cand = reviews.with_name(f"meta_{stem}{ext}")
        if cand.is_file():
            return cand
    raise DatasetError(f"{reviews}: no meta file meta_{stem}.jsonl(.gz) next to it")


def read_reviews(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw (user, asin, rating float64, timestamp seconds int64) columns of a reviews file."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    for lineno, r in _records(path):
        missing = [k for k in REVIEW_FIELDS if r.get(k) in (None, "")]
        if missing:
            raise DatasetError(f"{path}: line {lineno}: missing field(s) {missing}")
        try:
            rating = float(r["rating"])
            ts = int(r["timestamp"])
        except (TypeError, ValueError, OverflowError):   # OverflowError: int(Infinity)
            raise DatasetError(f"{path}: line {lineno}: rating {r['rating']!r} / timestamp "
                               f"{r['timestamp']!r} is not a number") from None
        if not -(2 ** 62) < ts < 2 ** 62:
            raise DatasetError(f"{path}: line {lineno}: timestamp {ts} is out of range")
        if not np.isfinite(rating):
            raise DatasetError(f"{path}: line {lineno}: rating {r['rating']!r} is not finite")
        users.append(str(r["user_id"]))
        items.append(str(r["parent_asin"]))
        ratings.append(rating)
        stamps.append(ts // 1000)
    if not users:
        raise DatasetError(f"{path}: no reviews")
    return (np.array(users, dtype=object), np.array(items, dtype=object),
            np.array(ratings, dtype=np.float64), np.array(stamps, dtype=np.int64))


def _str_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, list):
        return [str(x) for x in v if str(x).strip()]
    return [str(v)]


def read_meta(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """parent_asin → {title, categories, description, store} for the asins in `wanted`."""
    out: dict[str, dict[str, Any]] = {}
    for lineno, m in _records(path):
        asin = m.get("parent_asin")
        if asin in (None, ""):
            raise DatasetError(f"{path}: line {lineno}: missing field 'parent_asin'")
        if str(asin) not in wanted:
            continue
        store = m.get("store")
        out[str(asin)] = {"title": str(m.get("title") or "").strip(),
                          "categories": _str_list(m.get("categories")),
                          "description": " ".join(_str_list(m.get("description"))).strip(),
                          "store": str(store).strip() if store else ""}
    return out


def load_amazon(source: Path) -> tuple[tuple[Interactions, SideTable, SideTable],
                                       dict[str, Any]]:
    """Reviews file (+ its meta file) → (interactions, user table, item table), source info.

    Rating-3 rows are already gone here (as in movielens.to_tables) so that the tables hold
    only users/items with at least one sample; the caller's label rule then only labels.
    """
    source = Path(source)
    meta_file = meta_path(source)
    raw_u, raw_i, rating, ts = read_reviews(source)
    n_raw = len(raw_u)
    u0, _ = dense_ids(raw_u, numeric=False)
    i0, _ = dense_ids(raw_i, numeric=False)
    core = five_core(u0, i0, k=5)
    keep = core & (rating != 3)
    if not keep.any():
        raise DatasetError(f"{source}: no interactions left after the 5-core filter "
                           f"({int(core.sum())} rows) and dropping rating 3")
    u_dense, u_vocab = dense_ids(raw_u[keep], numeric=False)
    i_dense, i_vocab = dense_ids(raw_i[keep], numeric=False)
    inter = Interactions(u_dense, i_dense, rating[keep], ts[keep])

    meta = read_meta(meta_file, {str(a) for a in i_vocab})
    entries = [meta.get(str(a)) for a in i_vocab]
    no_meta = sum(e is None for e in entries)
    filled = [e or {"title": "", "categories": [], "description": "", "store": ""}
              for e in entries]
    cat_vocab = {c: k + 1 for k, c in enumerate(sorted({c for e in filled
                                                        for c in e["categories"]}))}
    store_vocab = {s: k + 1 for k, s in enumerate(sorted({e["store"] for e in filled
                                                          if e["store"]}))}
    lengths = np.array([0] + [len(e["categories"]) for e in filled], dtype=np.int64)
    offsets = np.cumsum(np.r_[0, lengths])
    values = np.array([cat_vocab[c] for e in filled for c in e["categories"]], dtype=np.int32)
    store = np.array([0] + [store_vocab.get(e["store"], 0) for e in filled], dtype=np.int32)
    text = ["; ".join([e["title"], " ".join(e["categories"]),
                       e["description"][:DESCRIPTION_CHARS]]) for e in filled]
    item = SideTable(i_vocab, {"store": store}, {"categories": list_array(offsets, values)},
                     text)
    user = SideTable(u_vocab, {}, {})
    info = {"reviews": source.name, "reviews_sha256": sha256_file(source), "meta": meta_file.name,
            "meta_sha256": sha256_file(meta_file), "raw_interactions": n_raw,
            "after_5core": int(core.sum()), "items_without_meta": int(no_meta)}
    return (inter, user, item), info
