"""Partitioned, out-of-core prepare of RecBole atomic interactions (`genci-prepare --dataset
recbole ... --partitions P`): peak memory set by the partition size plus the O(users + items)
vocabularies and side tables, never by the number of interactions.

Passes (pyarrow's streaming CSV reader and Parquet files; numpy for the protocol):

1. vocabulary: one streaming pass over the `.inter` keeps the distinct raw user / item ids of
   the rows the label rule keeps; `protocol.dense_ids` over those distinct ids gives exactly
   the in-memory path's dense ids (1..n in sorted raw order, numeric when every id is an
   integer) and vocabularies, so the side tables are the in-memory ones.
2. partition: a second streaming pass maps raw ids to dense ids (a hash lookup per batch) and
   appends each kept row to one of P Parquet files by dense user range
   (partition = (user - 1) * P // n_users), preserving file order inside a user.
3. protocol: each partition runs the in-memory protocol (`protocol.build_samples`, which is
   per user) and writes its users' sequences (data_pipes/sequences.py, users in a seeded order)
   as shards `sequences/part-PPPPP-KKKKK.parquet`: the same sequence rows as the in-memory
   path's, in another user order. No train shuffle pass: a sequence row holds all splits of
   one user, and the reader shuffles row groups and the samples of blocks of them, so the
   order on disk only has to put random users together, which each partition's seeded user
   order already does.

Row groups hold about `row_group_size` interactions (whole users); the manifest has the same
schema, features and counts as `writer.write_dataset`'s, so the reader and
`genci-prepare verify` work unchanged. `--split random` draws one permutation over all
interactions, which is not per user: it is refused for P > 1. The steps run in one process
(`prepare_partitioned`) or one per rank (data_pipes/partitioned_job.py, torchrun / TorchX).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipes.protocol import (
    Interactions,
    LabelRule,
    apply_label_rule,
    build_samples,
    dense_ids,
)
from data_pipes.raw_inter import BLOCK_BYTES, InterSpec, inter_spec, read_batches
from data_pipes.schema import (
    ITEM,
    ITEMS,
    MANIFEST,
    SCHEMA_VERSION,
    SEQUENCES,
    SPLITS,
    USER,
    USERS,
    DatasetError,
)
from data_pipes.sequence_writer import SequenceWriter, sequence_table
from data_pipes.sources.recbole import (
    AtomicTable,
    Warn,
    _find_files,
    generic_sides,
    read_atomic_file,
    stderr_warn,
)
from data_pipes.writer import (
    SideTable,
    feature_list,
    finish_counts,
    sha256_file,
    side_table,
    split_counts,
    staging,
)

PARTITION_ROWS = 2_000_000     # kept interactions per partition for --partitions auto
SMALL_VOCAB = 10_000           # fewer distinct ids: protocol.dense_ids; more: its Arrow twin


class _Vocab:
    """Distinct raw ids of a stream, merged as it goes (O(distinct ids) memory)."""

    def __init__(self) -> None:
        self.parts: list[pa.Array] = []
        self.size = 0

    def add(self, values: pa.Array) -> None:
        u = pc.unique(values)
        self.parts.append(u)
        self.size += len(u)
        if len(self.parts) > 8:
            merged = pc.unique(pa.concat_arrays(self.parts))
            self.parts, self.size = [merged], len(merged)

    def dense(self) -> tuple[np.ndarray, pa.Array]:
        """The in-memory path's vocabulary (dense_ids over the distinct raw ids) and the Arrow
        value set whose index + 1 is the dense id."""
        distinct = pc.unique(pa.concat_arrays(self.parts)) if self.parts else pa.array(
            [], pa.string())
        if len(distinct) <= SMALL_VOCAB:    # protocol.dense_ids itself
            _, vocab = dense_ids(np.asarray(distinct.to_pylist(), dtype=object))
            value_set = pa.array(vocab, pa.int64()) if vocab.dtype.kind in "iu" else pa.array(
                [str(v) for v in vocab], pa.string())
            return vocab, value_set
        # dense_ids in Arrow (no Python object per id): numeric when every id matches its
        # -?[0-9]{1,18}, then sorted int64 keys; else strings in code-point order, which is
        # UTF-8 byte order, Arrow's string order. Tests check both against dense_ids.
        if pc.all(pc.match_substring_regex(distinct, r"^-?[0-9]{1,18}$")).as_py():
            keys = pc.unique(pc.cast(distinct, pa.int64()))
        else:
            keys = distinct
        value_set = pc.take(keys, pc.sort_indices(keys))
        return value_set.to_numpy(zero_copy_only=False), value_set


def _to_dense(raw: pa.Array, value_set: pa.Array) -> np.ndarray:
    keys = pc.cast(raw, pa.int64()) if value_set.type == pa.int64() else raw
    idx = pc.index_in(keys, value_set=value_set).to_numpy(zero_copy_only=False)
    return (idx + 1).astype(np.int32)


def _ml_sides(spec: InterSpec, folder: Path, u_raw: list[str], i_raw: list[str]
              ) -> tuple[SideTable, SideTable]:
    """The MovieLens-shaped side tables, built by movielens.to_tables over a stand-in
    interaction table holding each kept user and item once (O(users + items))."""
    from data_pipes.sources import movielens as ml

    found = {ext: sorted(folder.glob(f"*.{ext}")) for ext in ("item", "user")}
    for ext, paths in found.items():
        if len(paths) != 1:
            raise DatasetError(f"{folder}: expected exactly one *.{ext} file, found "
                               f"{[p.name for p in paths]}")
    m = max(len(u_raw), len(i_raw))
    pad = lambda xs: np.asarray(xs + [xs[0]] * (m - len(xs)), dtype=object)  # noqa: E731
    rule = spec.rule
    kept = rule.hi + 1.0 if rule.kind == "drop-band" else 1.0
    stand_in = AtomicTable(str(spec.path), {
        "user_id": pad(u_raw), "item_id": pad(i_raw), "rating": np.full(m, kept),
        "timestamp": np.zeros(m)}, {"user_id": "token", "item_id": "token", "rating": "float",
                                    "timestamp": "float"})
    raw = ml.from_atomic(stand_in, read_atomic_file(found["item"][0]),
                         read_atomic_file(found["user"][0]))
    _, user, item = ml.to_tables(raw, rule)
    return user, item


@dataclass
class Settings:
    """Everything after the scan that the per-partition steps need (pickled in the work dir)."""

    p: int
    rule: LabelRule
    split: str
    max_history: int
    seed: int
    row_group_size: int
    shard_rows: int
    name: str
    user: SideTable
    item: SideTable
    protocol: dict[str, Any]
    source: dict[str, Any]


def work_dir(out_dir: Path) -> Path:
    """The scratch folder of a partitioned prepare of `out_dir` (shared by every rank)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partitioned"


def _load(work: Path) -> Settings:
    with (work / "settings.pkl").open("rb") as f:
        return pickle.load(f)


def scan(folder: Path, work: Path, *, shape: str, name: str | None = None,
         rule: LabelRule | None = None, partitions: int = 0,
         partition_rows: int = PARTITION_ROWS, split: str = "temporal", max_history: int = 50,
         seed: int = 0, row_group_size: int = 8192, shard_rows: int = 1 << 18,
         float_buckets: int = 10, block_bytes: int = BLOCK_BYTES, warn: Warn = stderr_warn
         ) -> int:
    """Passes 1 and 2: vocabularies, side tables, and the P partition files in `work` (a fresh
    folder). Returns P."""
    folder = Path(folder)
    if shape == "ml":
        inters = sorted(folder.glob("*.inter")) if folder.is_dir() else []
        if len(inters) != 1:
            raise DatasetError(f"{folder}: expected exactly one *.inter file, found "
                               f"{[p.name for p in inters]}")
        files: dict[str, Path | None] = {"inter": inters[0]}
        name = name or "recbole"
    else:
        name, files = _find_files(folder, name)
    inter_path = files["inter"]
    assert inter_path is not None
    spec = inter_spec(inter_path, shape, rule, warn)
    rule = spec.rule

    # pass 1: vocabularies
    users, items, n_raw, n_kept = _Vocab(), _Vocab(), 0, 0
    for b in read_batches(spec, block_bytes):
        keep = pa.array(rule.keep(b.value))
        users.add(pc.filter(b.user, keep))
        items.add(pc.filter(b.item, keep))
        n_raw += len(b.value)
        n_kept += int(keep.true_count)
    if n_raw == 0:
        raise DatasetError(f"{inter_path}: no interactions")
    if n_kept == 0:
        raise DatasetError(f"{inter_path}: no interactions left after the label rule "
                           f"({rule.describe()})")
    u_vocab, u_set = users.dense()
    i_vocab, i_set = items.dense()
    del users, items
    n_users = len(u_vocab)
    p = partitions if partitions > 0 else max(1, math.ceil(n_kept / partition_rows))
    p = min(p, n_users)
    if split == "random" and p > 1:
        raise DatasetError("--split random draws one permutation over all interactions (not "
                           "per user): use --partitions 1")

    if shape == "ml":
        user, item = _ml_sides(spec, folder, [str(v) for v in u_set.to_pylist()],
                               [str(v) for v in i_set.to_pylist()])
        source: dict[str, Any] = {"path": str(folder)}
        extra: dict[str, Any] = {}
    else:
        tables = {ext: (read_atomic_file(q) if q is not None else None)
                  for ext, q in files.items() if ext != "inter"}
        user, item, source = generic_sides(tables, u_vocab, i_vocab, folder, name, files,
                                           n_raw, float_buckets, warn)
        del tables
        extra = {"timestamp": spec.time_rule}
    source.update({"interactions": n_raw, "partitions": p})
    protocol = {"label_rule": rule.describe(),
                "ordering": "per user by (timestamp, dense item id = sorted raw id)",
                "split": split, "max_history": max_history, "seed": seed,
                "history": "earlier positives of the user, most recent max_history, oldest first",
                **extra}

    (work / "out").mkdir(parents=True)
    # pass 2: partition by dense user range
    schema = pa.schema([("u", pa.int32()), ("i", pa.int32()), ("v", pa.float64()),
                        ("t", pa.int64())])
    writers = [pq.ParquetWriter(work / f"inter-{k:05d}.parquet", schema) for k in range(p)]
    try:
        for b in read_batches(spec, block_bytes):
            keep = rule.keep(b.value)
            mask = pa.array(keep)
            u = _to_dense(pc.filter(b.user, mask), u_set)
            i = _to_dense(pc.filter(b.item, mask), i_set)
            v, t = b.value[keep], b.ts[keep]
            part = ((u.astype(np.int64) - 1) * p) // n_users
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(p + 1))
            for k in range(p):
                sel = order[bounds[k]:bounds[k + 1]]
                if sel.size:
                    writers[k].write_table(pa.table(
                        [pa.array(u[sel]), pa.array(i[sel]), pa.array(v[sel]),
                         pa.array(t[sel])], schema=schema))
    finally:
        for w in writers:
            w.close()
    settings = Settings(p, rule, split, max_history, seed, row_group_size, shard_rows, name,
                        user, item, protocol, source)
    with (work / "settings.pkl").open("wb") as f:
        pickle.dump(settings, f, protocol=pickle.HIGHEST_PROTOCOL)
    return p


def run_partition(work: Path, k: int, tick: Callable[[int], None] = lambda n: None) -> None:
    """Pass 3 for partition k: the protocol; its sequence shards written to work/out; counts
    and shard entries to work/part-k.json."""
    st = _load(work)
    files: dict[str, Any] = {}
    counts: dict[str, Any] = {s: {"rows": 0, "positives": 0, "hist": 0} for s in SPLITS}
    path = work / f"inter-{k:05d}.parquet"
    x = pq.read_table(path)
    if x.num_rows:
        inter = Interactions(*(x.column(c).to_numpy() for c in ("u", "i", "v", "t")))
        del x
        kept, label = apply_label_rule(inter, st.rule)
        samples = build_samples(kept, label, split=st.split,  # type: ignore[arg-type]
                                max_history=st.max_history, seed=st.seed,
                                histories=False)
        del inter, kept, label
        counts = split_counts(samples)
        writer = SequenceWriter(work / "out", st.row_group_size, st.shard_rows,
                                stem=f"part-{k:05d}")
        writer.add(sequence_table(samples, st.user.single, st.user.multi, [st.seed, 3, k]))
        files = writer.close()
        tick(len(samples))
    (work / f"part-{k:05d}.json").write_text(json.dumps({"counts": counts, "files": files}))
    path.unlink()


def finish(work: Path, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Side tables and manifest; publishes work/out as `out_dir` (writer.staging's rename) and
    removes `work`. Returns the manifest."""
    st = _load(work)
    features = feature_list(st.user, st.item)
    out: dict[str, Any] = {}
    counts: dict[str, Any] = {s: {"rows": 0, "positives": 0, "hist": 0} for s in SPLITS}
    for k in range(st.p):
        got = json.loads((work / f"part-{k:05d}.json").read_text())
        out.update(got["files"])
        for s in SPLITS:
            for key in ("rows", "positives", "hist"):
                counts[s][key] += got["counts"][s][key]
    total = sum(counts[s]["rows"] for s in SPLITS)
    if total == 0:
        raise DatasetError(f"{st.name}: no samples to write")
    with staging(Path(out_dir), force) as tmp:
        (work / "out" / SEQUENCES).rename(tmp / SEQUENCES)
        summary = finish_counts(counts, {"users": len(st.user.raw_ids),
                                         "items": len(st.item.raw_ids),
                                         "n_users": len(st.user.raw_ids),
                                         "n_items": len(st.item.raw_ids)})
        pq.write_table(side_table(st.item, ITEM, features, "item"), tmp / ITEMS)
        pq.write_table(side_table(st.user, USER, features, "user"), tmp / USERS)
        out[ITEMS] = {"rows": len(st.item.raw_ids)}
        out[USERS] = {"rows": len(st.user.raw_ids)}
        for rel in out:
            out[rel]["bytes"] = (tmp / rel).stat().st_size
            out[rel]["sha256"] = sha256_file(tmp / rel)
        manifest = {"schema_version": SCHEMA_VERSION, "dataset": st.name,
                    "protocol": st.protocol, "counts": summary,
                    "features": [f.to_json() for f in features],
                    "row_group_size": st.row_group_size, "files": dict(sorted(out.items())),
                    "source": st.source}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def check_out(out_dir: Path, force: bool) -> None:
    """writer.staging's refusals, checked before the work starts."""
    if (out_dir / MANIFEST).exists() and not force:
        raise DatasetError(f"{out_dir}: a prepared dataset already exists (use --force)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists() \
            and not force:
        raise DatasetError(f"{out_dir}: exists and is not a prepared dataset (use --force)")


def prepare_partitioned(folder: Path, out_dir: Path, *, force: bool = False,
                        tick: Callable[[int], None] = lambda n: None,
                        **options: Any) -> dict[str, Any]:
    """An atomic folder (`shape` "ml": MovieLens-shaped, one *.inter/*.item/*.user; "generic":
    sources/recbole.py's generic source) → a prepared dataset in `out_dir`, out of core, in
    this process: scan, every partition, finish (`options`: scan's keywords;
    `partitions` 0 = ceil(kept interactions / partition_rows)). Returns the manifest."""
    out_dir = Path(out_dir)
    check_out(out_dir, force)
    work = work_dir(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        p = scan(folder, work, **options)
        for k in range(p):
            run_partition(work, k, tick)
        return finish(work, out_dir, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
