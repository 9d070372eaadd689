"""Is a prepared dataset still what its writer wrote? Two checks, one message per problem.

`genci-prepare verify DATA` (`verify_dataset`) reads everything and never writes:

- every file the manifest lists: present, its size (when the manifest records it) and sha256;
  a Parquet shard in a split folder that the manifest does not list is a problem too;
- every Parquet file opens, with the row and row-group counts the manifest records;
- sequence shards have every column (user id and user features: integers or lists of them;
  items, labels, timestamps, splits: lists of integers) and, row group by row group, the
  reader's own validation (`data_pipes.sequences.cut_samples`): no nulls, labels in {0, 1},
  split codes in {0, 1, 2}, equal list lengths per row, ids within the manifest's
  cardinalities; each group's sample count per split equals the manifest's ``groups``. A row
  group reports its first problem only;
- items.parquet / users.parquet: key column 1..n, feature ids within range, no nulls.

Each problem is one line naming the file and, where it applies, the row group, the row and
the column; the command exits 2 on any problem, 0 with a one-line summary when clean.

The reader's check at load time (`check_split_files`, called by data_pipes.stream before it
opens a split) is the cheap part: the split's shards are exactly the manifest's, with its
sizes and sha256. A file's digest is remembered in ``.verified-files.json`` in the dataset
folder under its (size, mtime_ns), so a later run only stats the files: a file whose mtime
changed is hashed again (accepted if its content did not change, refused if it did). That
cache is written atomically (a temporary file renamed over it), so ranks and processes
starting together at worst hash a file twice; a read-only dataset folder only means every run
hashes. Damage that keeps a file's size and mtime (a bit rotting on disk) is what
`genci-prepare verify`, which always hashes, is for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from data_pipes.collate import check_ids, check_nulls, check_schema
from data_pipes.schema import (
    ITEM,
    ITEMS,
    SEQUENCES,
    SPLITS,
    USER,
    USERS,
    DatasetError,
    FeatureSpec,
    feature_specs,
    load_manifest,
)
from data_pipes.sequences import cut_samples, sequence_columns
from data_pipes.writer import sha256_file

CACHE = ".verified-files.json"
_CACHE_VERSION = 1


# ---- the load-time check ---------------------------------------------------------------------


def _listed(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        return dict(manifest["files"])
    except (KeyError, TypeError):
        raise DatasetError(f"{path}: the manifest has no 'files' table of sizes and "
                           "hashes") from None


def file_problem(dataset_dir: Path, rel: str, entry: dict[str, Any]) -> str | None:
    """Size + sha256 of one listed file against its manifest entry → a one-line problem or
    None. (Always hashes; `check_split_files` is the cached form.)"""
    return _stat_problem(dataset_dir / rel, entry) or _hash_problem(dataset_dir / rel, entry)[0]


def _stat_problem(path: Path, entry: dict[str, Any]) -> str | None:
    if not path.is_file():
        return f"{path}: missing (the manifest lists it)"
    size, want = path.stat().st_size, entry.get("bytes")
    if want is not None and size != int(want):
        return (f"{path}: {size} bytes, the manifest says {int(want)} (truncated or replaced "
                "after it was written)")
    return None


def _hash_problem(path: Path, entry: dict[str, Any]) -> tuple[str | None, str]:
    want = str(entry.get("sha256", ""))
    digest = sha256_file(path)
    if digest != want:
        return (f"{path}: sha256 {digest[:16]}… differs from the manifest's {want[:16]}… "
                f"({path.stat().st_size} bytes; the file changed after it was written)", digest)
    return None, digest


def check_split_files(dataset_dir: str | Path, split: str,
                      manifest: dict[str, Any] | None = None) -> None:
    """The load-time check of the files a run of `split` reads (every split reads the
    sequence shards): they are exactly those the manifest lists, each with the manifest's size
    and sha256 (hashed only when its (size, mtime_ns) is not in the cache). A DatasetError
    names the first bad file and what differs."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir) if manifest is None else manifest
    listed = _listed(manifest, dataset_dir / "manifest.json")
    rels = sorted(r for r in listed if r.startswith(f"{SEQUENCES}/"))
    on_disk = {f"{SEQUENCES}/{p.name}" for p in (dataset_dir / SEQUENCES).glob("*.parquet")}
    extra = sorted(on_disk - set(rels))
    if extra:
        raise DatasetError(f"{dataset_dir / extra[0]}: not listed in the manifest (a shard "
                           "the writer did not write); remove it or re-run genci-prepare")
    cache = _read_cache(dataset_dir)
    fresh: dict[str, dict[str, Any]] = {}
    for rel in rels:
        path, entry = dataset_dir / rel, listed[rel]
        problem = _stat_problem(path, entry)
        if problem:
            raise DatasetError(problem)
        before = path.stat()
        key = {"size": before.st_size, "mtime_ns": before.st_mtime_ns,
               "sha256": str(entry.get("sha256", ""))}
        if cache.get(rel) == key:
            continue
        problem, _ = _hash_problem(path, entry)
        if problem:
            raise DatasetError(problem)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            fresh[rel] = key      # unchanged while it was hashed: the digest is this version's
    if fresh:
        _write_cache(dataset_dir, fresh)


def _read_cache(dataset_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((dataset_dir / CACHE).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == _CACHE_VERSION
    return data.get("files", {}) if ok and isinstance(data.get("files"), dict) else {}


def _write_cache(dataset_dir: Path, fresh: dict[str, dict[str, Any]]) -> None:
    """Merges `fresh` into the cache on disk (re-read just before, so entries another process
    wrote meanwhile are kept, but for a lost race that only costs a rehash) and publishes it
    by an atomic rename of a uniquely named temporary file."""
    files = _read_cache(dataset_dir) | fresh
    tmp = dataset_dir / f"{CACHE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": files}, indent=1))
        os.replace(tmp, dataset_dir / CACHE)
    except OSError:     # a read-only dataset folder: no cache, every run hashes
        tmp.unlink(missing_ok=True)


# ---- the full check ----------------------------------------------------------------------------


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    rows: int = 0
    row_groups: int = 0

    def add(self, problem: str) -> None:
        self.problems.append(" ".join(problem.split()))   # one line, whatever pyarrow said


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def verify_dataset(dataset_dir: str | Path) -> Report:
    """Every check of the module docstring; never writes."""
    dataset_dir = Path(dataset_dir)
    rep = Report()
    try:
        manifest = load_manifest(dataset_dir)
        listed = _listed(manifest, dataset_dir / "manifest.json")
        features = feature_specs(manifest)
    except (DatasetError, KeyError, TypeError, ValueError) as e:
        rep.add(str(e) if isinstance(e, DatasetError) else
                f"{dataset_dir / 'manifest.json'}: unreadable feature list ({_one_line(e)})")
        return rep
    for p in sorted((dataset_dir / SEQUENCES).glob("*.parquet")):
        if f"{SEQUENCES}/{p.name}" not in listed:
            rep.add(f"{p}: not listed in the manifest (a shard the writer did not write)")
    for rel in sorted(listed):
        entry, path = listed[rel], dataset_dir / rel
        problem = _stat_problem(path, entry)
        if problem and not path.is_file():
            rep.add(problem)
            continue
        rep.files += 1
        rep.bytes += path.stat().st_size
        if problem:
            rep.add(problem)
        hash_problem, _ = _hash_problem(path, entry)
        if hash_problem:
            rep.add(hash_problem)
        if rel.endswith(".parquet"):
            _verify_parquet(dataset_dir, rel, entry, features, manifest, rep)
    return rep


def _verify_parquet(dataset_dir: Path, rel: str, entry: dict[str, Any],
                    features: list[FeatureSpec], manifest: dict[str, Any], rep: Report) -> None:
    path = dataset_dir / rel
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        schema = pf.schema_arrow
    except Exception as e:  # noqa: BLE001 - any failure to open is this file's problem
        rep.add(f"{path}: not a readable Parquet file ({_one_line(e)})")
        return
    for what, have in (("rows", meta.num_rows), ("row_groups", meta.num_row_groups)):
        if what in entry and int(entry[what]) != have:
            rep.add(f"{path}: {have} {what.replace('_', ' ')}, the manifest says "
                    f"{int(entry[what])}")
    rep.rows += meta.num_rows
    rep.row_groups += meta.num_row_groups
    if rel.split("/")[0] == SEQUENCES:
        columns = sequence_columns(features)
        groups = entry.get("groups")
        if not isinstance(groups, list) or len(groups) != meta.num_row_groups:
            rep.add(f"{path}: the manifest's per-row-group sample counts ('groups') do not "
                    f"list its {meta.num_row_groups} row groups")
            groups = None
    elif rel in (ITEMS, USERS):
        side, key = ("item", ITEM) if rel == ITEMS else ("user", USER)
        columns = {key: "int"} | {f.name: "ints" if f.multi else "int" for f in features
                                  if f.side == side and f.name != key}
    else:
        return
    try:
        check_schema(schema, columns, str(path))
    except DatasetError as e:
        rep.add(str(e))
        return
    start = 1
    item_card = next((f.cardinality for f in features if f.name == ITEM), None)
    for g in range(meta.num_row_groups):
        def where(row: int | None, g: int = g) -> str:
            return (f"{path} (row group {g})" if row is None
                    else f"{path} (row group {g}, row {row})")
        try:
            table = pf.read_row_group(g, columns=list(columns), use_threads=False)
            if rel in (ITEMS, USERS):
                start = _check_side_table(table, key, columns, features, where, start)
            else:
                for code, split in enumerate(SPLITS):
                    n = cut_samples(table, code, 0, features, where, item_card).item.size
                    if groups is not None and int(groups[g][code]) != n:
                        raise DatasetError(f"{where(None)}: {n} {split} samples, the "
                                           f"manifest says {int(groups[g][code])}")
        except DatasetError as e:
            rep.add(str(e))
        except Exception as e:  # noqa: BLE001 - a damaged page: name the group, go on
            rep.add(f"{where(None)}: unreadable ({_one_line(e)})")


def _check_side_table(table: Any, key: str, columns: dict[str, str],
                      features: list[FeatureSpec], where: Any, start: int) -> int:
    """items/users rows: no nulls, key = start, start+1, ... (dense ids in order), feature ids
    within their cardinality. Returns the next expected key."""
    check_nulls(table, list(columns), where)
    ids = table.column(key).to_numpy()
    want = np.arange(start, start + ids.size)
    if (ids != want).any():
        row = int(np.flatnonzero(ids != want)[0])
        raise DatasetError(f"{where(row)}: field {key!r} is {int(ids[row])}, expected "
                           f"{int(want[row])} (dense ids 1..n in order)")
    card = {f.name: f.cardinality for f in features}
    for name in columns:
        col = table.column(name).combine_chunks()
        if columns[name] == "ints":
            offsets = col.offsets.to_numpy().astype(np.int64)
            vals = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            check_ids(name, vals, card[name], where, np.diff(offsets))
        else:
            check_ids(name, col.to_numpy(), card[name], where)
    return start + ids.size


# ---- `genci-prepare verify DATA` ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="genci-prepare verify",
        description="Checks a prepared dataset against its manifest (sizes, sha256, Parquet "
                    "schemas, ids within the cardinalities, labels in {0,1}, no nulls); "
                    "never writes. One line per problem; exit 2 on any problem, 0 when clean.")
    p.add_argument("data", help="prepared dataset folder (manifest.json)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    rep = verify_dataset(args.data)
    seconds = time.perf_counter() - t0
    for problem in rep.problems:
        print(problem)
    if rep.problems:
        print(f"genci-prepare verify: {args.data}: {len(rep.problems)} problem(s) in "
              f"{rep.files} file(s)", file=sys.stderr)
        return 2
    print(f"genci-prepare verify: {args.data}: clean: {rep.files} files, {rep.bytes:,} bytes "
          f"hashed, {rep.rows:,} rows in {rep.row_groups} row groups checked "
          f"({seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
