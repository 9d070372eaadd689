"""Raw RecBole interaction files at any size: `read_batches` streams an `.inter` in CSV blocks
(typed, label rule applied, row numbers kept for errors) for the out-of-core prepare
(`data_pipes.partitioned`), and `write_raw_synthetic` writes Instrument-shaped raw
interactions for the scale benchmark's prepare stages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipes.protocol import (
    MOVIELENS,
    LabelRule,
)
from data_pipes.schema import (
    DatasetError,
)
from data_pipes.sources.recbole import (
    INTER_FIELDS,
    Warn,
    parse_header,
)

BLOCK_BYTES = 1 << 24          # CSV bytes per streamed batch
# pyarrow's streaming CSV reader reads up to 32 blocks ahead on a background thread (its
# background generator's queue), so its memory is ~32 blocks whatever the consumer does: at
# 16 MB blocks that was 0.69 GB peak for a 563 MB file. It reads 1 MB blocks (0.15 GB, and no
# slower), which read_batches joins into batches of about BLOCK_BYTES.
CSV_BLOCK_BYTES = 1 << 20


@dataclass
class InterBatch:
    user: pa.Array       # raw ids (string)
    item: pa.Array
    value: np.ndarray    # float64: what the label rule reads
    ts: np.ndarray       # int64


@dataclass
class InterSpec:
    """How to read the `.inter`: MovieLens-shaped (rating + timestamp required, timestamps
    truncated to int64) or generic (see sources/recbole.py)."""

    path: Path
    shape: str                      # "ml" | "generic"
    rule: LabelRule
    names: list[str]
    types: list[str]
    time_rule: str = "column 'timestamp'"


def _header(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with path.open("rb") as f:
        line = f.readline()
    if line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    if not line.strip():
        raise DatasetError(f"{path}: empty file (no header)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}:1: byte 0x{line[e.start]:02x} is not UTF-8") from None
    return parse_header(text, str(path))


def inter_spec(path: Path, shape: str, rule: LabelRule | None, warn: Warn) -> InterSpec:
    names, types = _header(path)
    need = ["user_id", "item_id"] + (["rating", "timestamp"] if shape == "ml" else [])
    missing = [n for n in need if n not in names]
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {missing}; header has {names}")
    if shape == "ml":
        return InterSpec(path, shape, rule or MOVIELENS, names, types)
    extra = [c for c in names if c not in INTER_FIELDS]
    if extra:
        warn(f"{path}: column(s) {extra} ignored (interaction-level columns are not features "
             f"of the prepared layout)")
    if rule is None:
        if "label" not in names:
            raise DatasetError(f"{path}: no 'label' column; choose a label rule with "
                               "--label-rule threshold:T | drop-band:LO-HI | implicit")
        rule = LabelRule("label")
    if rule.kind == "label" and "label" not in names:
        raise DatasetError(f"{path}: missing required column(s) ['label']; header has {names}")
    if rule.reads_rating and "rating" not in names:
        raise DatasetError(f"{path}: label rule {rule.describe()!r} needs a 'rating' column; "
                           f"header has {names}")
    time_rule = ("column 'timestamp' (floor to an integer)" if "timestamp" in names
                 else "file order")
    return InterSpec(path, shape, rule, names, types, time_rule)


def _floats(col: pa.Array, name: str, path: Path, row0: int) -> np.ndarray:
    col = pc.utf8_trim_whitespace(col)
    filled = pc.if_else(pc.equal(col, ""), "nan", col)
    try:
        out = pc.cast(filled, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for k, v in enumerate(filled.to_pylist()):
            try:
                float(v)
            except ValueError:
                raise DatasetError(f"{path}: data row {row0 + k + 1}: field {name!r} = {v!r} "
                                   "is not a number") from None
        raise DatasetError(f"{path}: field {name!r} holds values that are not numbers"
                           ) from None
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise DatasetError(f"{path}: data row {row0 + int(bad[0]) + 1}: {name} is missing, NaN "
                           "or inf")
    return out


def read_batches(spec: InterSpec, block_bytes: int = BLOCK_BYTES) -> Iterator[InterBatch]:
    """Streams the `.inter` in batches of about `block_bytes`, checked as the in-memory
    readers check it; errors name the file and the data row (1 = the line after the header,
    blank lines not counted)."""
    path = spec.path
    try:
        reader = pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(column_names=spec.names, skip_rows=1,
                                           block_size=min(block_bytes, CSV_BLOCK_BYTES)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                             newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in spec.names}, strings_can_be_null=False))
    except pa.ArrowException as e:
        if "Empty CSV" in str(e):
            raise DatasetError(f"{path}: no interactions") from None
        raise DatasetError(f"{path}: unreadable ({e})") from None
    row0 = 0
    rule = spec.rule
    for rb in _joined(reader, block_bytes, path, len(spec.names)):
        n = rb.num_rows
        cols = {name: pc.utf8_rtrim(rb.column(name), characters="\r") for name in spec.names}
        for key in ("user_id", "item_id"):
            empty = np.flatnonzero(pc.equal(pc.utf8_trim_whitespace(cols[key]), "")
                                   .to_numpy(zero_copy_only=False))
            if empty.size:
                raise DatasetError(f"{path}: data row {row0 + int(empty[0]) + 1}: empty {key}")
        if spec.shape == "ml":
            value = _floats(cols["rating"], "rating", path, row0)
            ts = _floats(cols["timestamp"], "timestamp", path, row0).astype(np.int64)
        else:
            if rule.kind == "label":
                value = _floats(cols["label"], "label", path, row0)
                bad = np.flatnonzero((value != 0) & (value != 1))
                if bad.size:
                    raise DatasetError(f"{path}: data row {row0 + int(bad[0]) + 1}: label "
                                       f"{value[bad[0]]:g} is not 0 or 1")
            elif rule.reads_rating:
                value = _floats(cols["rating"], "rating", path, row0)
            else:
                value = np.ones(n, dtype=np.float64)
            if "timestamp" in cols:
                tsf = np.floor(_floats(cols["timestamp"], "timestamp", path, row0))
                if np.abs(tsf).max(initial=0) >= 2.0 ** 62:
                    row = int(np.argmax(np.abs(tsf)))
                    raise DatasetError(f"{path}: data row {row0 + row + 1}: timestamp "
                                       f"{tsf[row]:g} is out of range")
                ts = tsf.astype(np.int64)
            else:
                ts = np.arange(row0, row0 + n, dtype=np.int64)
        row0 += n
        yield InterBatch(cols["user_id"], cols["item_id"], value, ts)


def _joined(reader: pacsv.CSVStreamingReader, block_bytes: int, path: Path, n_fields: int
            ) -> Iterator[pa.RecordBatch]:
    """The reader's record batches joined into batches of at least `block_bytes` (the last
    may be smaller; none is empty)."""
    pending: list[pa.RecordBatch] = []
    size = rows = 0
    while True:
        try:
            rb = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as e:
            raise DatasetError(f"{path}: after data row {rows}: malformed row, expected "
                               f"{n_fields} tab-separated fields or invalid UTF-8 "
                               f"({e})") from None
        if rb.num_rows == 0:
            continue
        pending.append(rb)
        size += rb.nbytes
        rows += rb.num_rows
        if size >= block_bytes:
            yield pa.concat_batches(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_batches(pending)


# ---- raw synthetic interactions (the scale benchmark's input) -------------------------------

RAW_USERS, RAW_ITEMS = 57_440, 24_588   # s = 1: the synthetic source's Amazon-Instrument size


def write_raw_synthetic(path: Path, scale: float, seed: int = 0,
                        chunk_users: int = 200_000, repeat: int = 1) -> int:
    """A RecBole `.inter` (user_id, item_id, rating 1..5, timestamp) of about 9.2 · 57,440 · s
    interactions, written in chunks of users (memory O(chunk)); item popularity ∝ rank^-1.3
    via inverse CDF, user ids shuffled in the file so the dense mapping has work to do.
    repeat = r > 1: each chunk's interactions r times, copy c shifted c · (its last timestamp)
    later, so users and items stay those of `repeat = 1` and interactions grow r-fold (what
    shows that a stage's memory follows interactions or vocabularies).
    Returns the number of rows. Only a size model for the benchmark: no quality claims."""
    n_users = max(1, round(RAW_USERS * scale))
    n_items = max(2, round(RAW_ITEMS * scale))
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -1.3)
    cdf /= cdf[-1]
    item_of_rank = rng.permutation(n_items) + 1
    user_ids = rng.permutation(n_users) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rows = 0
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with tmp.open("wb") as f:
        f.write(b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for start in range(0, n_users, chunk_users):
            r = np.random.default_rng([seed, start])
            users = user_ids[start:start + chunk_users]
            lengths = 4 + r.geometric(1 / 5.2, size=users.size)   # 5 + Geometric0(mean 4.2)
            n = int(lengths.sum())
            u = np.repeat(users, lengths)
            item = item_of_rank[np.searchsorted(cdf, r.random(n), side="right").clip(
                max=n_items - 1)]
            ts = 1_000_000 + np.cumsum(r.integers(1, 5000, size=n))
            rating = r.integers(1, 6, size=n)
            for c in range(max(1, repeat)):
                table = pa.table({"u": u, "i": item, "r": rating, "t": ts + c * int(ts[-1])})
                pacsv.write_csv(table, f, write_options=opts)
                rows += n
    tmp.rename(path)
    return rows

