"""RecBole atomic files (`.inter`, `.item`, `.user`; SPEC §1.3): the low-level reader shared by
every atomic source, and the generic source (`genci-prepare --dataset recbole --atomic-dir`).

Format: tab-separated, a header of `name:type` fields (types token, token_seq, float,
float_seq), UTF-8, CRLF line ends tolerated. Every column comes back as a numpy array:
`float` → float64 (an empty field is NaN, as in RecBole), `token` → str, `*_seq` → str (split
later by the caller, space-separated). Parsing uses pyarrow's CSV reader (fast,
multi-threaded) with quoting off, since titles contain quotes. Undecodable bytes are reported
as `file.inter:LINE: byte 0xff at column COL is not UTF-8` (COL counts characters, from 1).

The generic source (`load_generic`) takes any `.inter` with RecBole's default field names:
`user_id`, `item_id`, and a `rating` or a `label` column (optional `timestamp`):

- Label rule (`--label-rule`, see `protocol.LabelRule`): `threshold:T`, `drop-band:LO-HI`,
  `implicit`, or `label` (the default when a `label` column exists). Without a label column
  the rule must be given: a rating scale says nothing about which ratings are positive.
- No `timestamp` column: the file order is the time order (row k has timestamp k); the
  manifest says `protocol.timestamp = "file order"`.
- Side features: every column of the `.user` / `.item` files (both optional) other than the
  id. `:token` → one categorical feature; `:token_seq` → a bag feature (space-separated
  tokens, pooled); `:float` → bucketised: at most `float_buckets` distinct values become one
  category each, otherwise equal-frequency buckets over the kept entities (NaN → 0);
  `float_buckets = 0` keeps float columns out, with a warning; `:float_seq` is always kept out,
  with a warning. Columns of the `.inter` other than the ones above are not features (the
  prepared layout only has user- and item-side features); they are named in a warning.
- Degenerate features (every value missing, or one single value over the kept users/items)
  are dropped with a one-line warning each and listed in the manifest's `source.dropped`.
- Item text (for the semantic IDs): the item's `:token` / `:token_seq` values joined by
  "; " in header order, or its raw id when it has none.
- Dense ids as for MovieLens: users/items left after the label rule's drop get 1..n in sorted
  raw-id order (numeric when every id is an integer); side rows of entities that never
  interact are ignored, interacting entities without a side row get features 0 (a warning
  gives their number).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipes.protocol import Interactions, LabelRule, dense_ids
from data_pipes.schema import HISTORY, ITEM, LABEL, RAW_ID, TEXT, TIMESTAMP, USER, DatasetError
from data_pipes.writer import SideTable, list_array, sha256_file

TYPES = ("token", "token_seq", "float", "float_seq")
FLOAT_BUCKETS = 10
# Arrow's float syntax (what pc.cast accepts), to name the first field it would refuse.
_FLOAT_RE = r"(?i)^[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|nan|inf|infinity)$"
Warn = Callable[[str], None]


def stderr_warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class AtomicTable:
    path: str
    columns: dict[str, np.ndarray]
    types: dict[str, str]
    body: bytes = b""   # the data lines, for line numbers in later errors

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DatasetError(f"{self.path}: missing required column(s) {missing}; "
                               f"header has {list(self.columns)}")

    def line(self, row: int) -> int:
        """File line number (header = 1) of data row `row` (0-based)."""
        return _row_line(self.body, row)


def parse_header(line: str, path: str) -> tuple[list[str], list[str]]:
    names, types = [], []
    for i, field in enumerate(line.rstrip("\r\n").split("\t")):
        if ":" not in field:
            raise DatasetError(f"{path}: header field {i + 1} {field!r} is not 'name:type'")
        name, typ = field.rsplit(":", 1)
        if typ not in TYPES:
            raise DatasetError(f"{path}: header field {name!r} has unknown type {typ!r} "
                               f"(expected one of {TYPES})")
        if not name.strip():
            raise DatasetError(f"{path}: header field {i + 1} {field!r} has an empty name")
        if name in names:
            raise DatasetError(f"{path}: header field {i + 1}: column {name!r} appears twice")
        names.append(name)
        types.append(typ)
    return names, types


def check_utf8(data: bytes, path: str) -> None:
    """Raises `path:LINE: byte 0xNN at column COL is not UTF-8` for the first bad byte."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        col = len(data[start:e.start].decode("utf-8")) + 1
        raise DatasetError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {col} is "
                           f"not UTF-8") from None


def _bad_line(body: bytes, expected: int, reported: list[int]) -> int | str:
    """File line number (header = line 1) of the first row without `expected` fields. Arrow's
    multi-threaded reader reports row number -1, so the error path scans the body itself."""
    if reported and reported[0] > 0:
        return reported[0] + 1
    for i, line in enumerate(body.split(b"\n"), 2):
        line = line.rstrip(b"\r")
        if line and (line.count(b"\t") != expected - 1 or b"\r" in line):
            return i
    return "?"


def _row_line(body: bytes, row: int) -> int:
    """File line number of data row `row` (0-based; Arrow skips blank lines, the file does
    not)."""
    seen = -1
    for i, line in enumerate(body.split(b"\n"), 2):
        if line.rstrip(b"\r"):
            seen += 1
            if seen == row:
                return i
    return row + 2


def _to_float(col: pa.ChunkedArray, name: str, path: str, body: bytes) -> np.ndarray:
    col = pc.utf8_trim_whitespace(col)
    empty = pc.equal(col, "")
    filled = pc.if_else(empty, "nan", col)
    try:
        return pc.cast(filled, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.match_substring_regex(filled, _FLOAT_RE).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~ok)
        if bad.size:
            i = int(bad[0])
            raise DatasetError(f"{path}: line {_row_line(body, i)}: field {name!r} = "
                               f"{col[i].as_py()!r} is not a number") from None
        raise DatasetError(f"{path}: field {name!r} holds values that are not numbers") from None


def read_atomic(data: bytes, path: str) -> AtomicTable:
    """Parses one atomic file's bytes; `path` names it in errors."""
    if not data.strip():
        raise DatasetError(f"{path}: empty file (no header)")
    check_utf8(data, path)
    if data.startswith(b"\xef\xbb\xbf"):         # a UTF-8 byte-order mark is not a name
        data = data[3:]
    text_end = data.find(b"\n")
    if text_end < 0:
        text_end = len(data)
    names, types = parse_header(data[:text_end].decode("utf-8"), path)
    body = data[text_end + 1:]
    expected = len(names)
    bad: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row.number if row.number is not None else -1)
        return "error"

    if not body.strip(b"\r\n"):
        table = pa.table({n: pa.array([], pa.string()) for n in names})
    else:
        try:
            table = pacsv.read_csv(
                io.BytesIO(body),
                read_options=pacsv.ReadOptions(column_names=names,
                                               autogenerate_column_names=False),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                                 newlines_in_values=False,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names}, strings_can_be_null=False),
            )
        except pa.ArrowException as e:
            raise DatasetError(f"{path}: line {_bad_line(body, expected, bad)}: malformed row, "
                               f"expected {expected} tab-separated fields ({e})") from None
    cols: dict[str, np.ndarray] = {}
    for name, typ in zip(names, types, strict=True):
        col = pc.utf8_rtrim(table.column(name), characters="\r")
        if typ == "float":
            cols[name] = _to_float(col, name, path, body)
        else:
            cols[name] = np.asarray(col.to_pylist(), dtype=object)
    return AtomicTable(path, cols, dict(zip(names, types, strict=True)), body)


def read_atomic_file(path: str | Path) -> AtomicTable:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return read_atomic(path.read_bytes(), str(path))


# ---- the generic source ----------------------------------------------------------------------

RESERVED = {USER, ITEM, LABEL, TIMESTAMP, HISTORY, RAW_ID, TEXT}
INTER_FIELDS = ("user_id", "item_id", "rating", "label", "timestamp")


def encode_tokens(values: np.ndarray) -> np.ndarray:
    """Categorical strings → 1..k in sorted order, "" → 0."""
    out = np.zeros(len(values), dtype=np.int32)
    strs = np.array([str(v) for v in values], dtype=object)
    present = strs != ""
    if present.any():
        vocab, inv = np.unique(strs[present].astype(str), return_inverse=True)
        out[present] = inv + 1
    return out


def encode_bags(values: np.ndarray) -> pa.ListArray:
    """Space-separated token lists → a list<int32> array (tokens 1..k in sorted order)."""
    bags = [str(v).split() for v in values]
    vocab = {t: k + 1 for k, t in enumerate(sorted({t for b in bags for t in b}))}
    offsets = np.cumsum(np.r_[0, [len(b) for b in bags]]).astype(np.int64)
    vals = np.array([vocab[t] for b in bags for t in b], dtype=np.int32)
    return list_array(offsets, vals)


def bucketise(values: np.ndarray, buckets: int) -> tuple[np.ndarray, str]:
    """float64 → 0 (NaN/inf) or 1..k: by value when there are at most `buckets` distinct
    finite values, else by equal-frequency bucket. Returns the ids and how it was done."""
    finite = np.isfinite(values)
    out = np.zeros(len(values), dtype=np.int32)
    distinct = np.unique(values[finite])
    if distinct.size <= buckets:
        out[finite] = np.searchsorted(distinct, values[finite]) + 1
        return out, f"{distinct.size} distinct values, one id each"
    edges = np.unique(np.quantile(values[finite], np.linspace(0, 1, buckets + 1)[1:-1]))
    out[finite] = np.searchsorted(edges, values[finite], side="right") + 1
    return out, f"{edges.size + 1} equal-frequency buckets"


def _find_files(folder: Path, name: str | None) -> tuple[str, dict[str, Path | None]]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    if name is None:
        inters = sorted(folder.glob("*.inter"))
        if len(inters) != 1:
            raise DatasetError(f"{folder}: expected exactly one *.inter file (or pass --name), "
                               f"found {[p.name for p in inters]}")
        name = inters[0].name[:-len(".inter")]
    files: dict[str, Path | None] = {}
    for ext in ("inter", "user", "item"):
        p = folder / f"{name}.{ext}"
        files[ext] = p if p.is_file() else None
    if files["inter"] is None:
        raise DatasetError(f"{folder / f'{name}.inter'}: file not found")
    return name, files


def _inter_columns(t: AtomicTable, rule: LabelRule | None, warn: Warn
                   ) -> tuple[LabelRule, np.ndarray, np.ndarray, str]:
    """(rule, the value the rule reads, timestamps, how time is defined) of the .inter."""
    t.require("user_id", "item_id")
    for key in ("user_id", "item_id"):
        empty = np.flatnonzero(np.array([str(v).strip() == "" for v in t.columns[key]],
                                        dtype=bool))
        if empty.size:
            raise DatasetError(f"{t.path}: line {t.line(int(empty[0]))}: empty {key}")
    extra = [c for c in t.columns if c not in INTER_FIELDS]
    if extra:
        warn(f"{t.path}: column(s) {extra} ignored (interaction-level columns are not features "
             f"of the prepared layout)")
    if rule is None:
        if "label" not in t.columns:
            have = ""
            if "rating" in t.columns and len(t):
                r = _numeric(t, "rating")
                have = f" (ratings range {np.nanmin(r):g}..{np.nanmax(r):g})"
            raise DatasetError(f"{t.path}: no 'label' column{have}; choose a label rule with "
                               "--label-rule threshold:T | drop-band:LO-HI | implicit")
        rule = LabelRule("label")
    if rule.kind == "label":
        t.require("label")
        value = _numeric(t, "label")
        bad = np.flatnonzero((value != 0) & (value != 1))
        if bad.size:
            raise DatasetError(f"{t.path}: line {t.line(int(bad[0]))}: label "
                               f"{value[bad[0]]:g} is not 0 or 1")
    elif rule.reads_rating:
        if "rating" not in t.columns:
            raise DatasetError(f"{t.path}: label rule {rule.describe()!r} needs a 'rating' "
                               f"column; header has {list(t.columns)}")
        value = _numeric(t, "rating")
    else:
        value = np.ones(len(t), dtype=np.float64)
    if "timestamp" in t.columns:
        ts = np.floor(_numeric(t, "timestamp"))
        if np.abs(ts).max(initial=0) >= 2.0 ** 62:
            row = int(np.argmax(np.abs(ts)))
            raise DatasetError(f"{t.path}: line {t.line(row)}: timestamp {ts[row]:g} is out of "
                               "range")
        return rule, value, ts.astype(np.int64), "column 'timestamp' (floor to an integer)"
    return rule, value, np.arange(len(t), dtype=np.int64), "file order"


def _numeric(t: AtomicTable, name: str) -> np.ndarray:
    """A column as finite float64 (a `:token` column is converted too); errors name the line."""
    col = t.columns[name]
    if t.types[name] != "float":
        col = _to_float(pa.chunked_array([pa.array([str(v) for v in col], pa.string())]), name,
                        t.path, t.body)
    bad = np.flatnonzero(~np.isfinite(col))
    if bad.size:
        raise DatasetError(f"{t.path}: line {t.line(int(bad[0]))}: {name} is missing, NaN or "
                           "inf")
    return col



def generic_sides(tables: dict[str, AtomicTable | None], u_vocab: np.ndarray,
                  i_vocab: np.ndarray, folder: Path, name: str,
                  files: dict[str, Path | None], raw_interactions: int, float_buckets: int,
                  warn: Warn) -> tuple[SideTable, SideTable, dict[str, Any]]:
    """The user and item side tables of a generic atomic dataset (features typed by their
    suffixes, degenerate ones dropped with a warning) and the manifest's `source` entry; the
    in-memory and the partitioned prepare share it."""
    dropped: dict[str, str] = {}
    taken: set[str] = set()
    user = _side(tables["user"], "user_id", u_vocab, "user", float_buckets, taken, warn,
                 dropped, text=False)
    item = _side(tables["item"], "item_id", i_vocab, "item", float_buckets, taken, warn,
                 dropped, text=True)
    source = {"path": str(folder), "name": name,
              "files": {p.name: sha256_file(p) for p in files.values() if p is not None},
              "raw_interactions": raw_interactions, "dropped": dropped}
    return user, item, source


def _side(t: AtomicTable | None, key: str, vocab: np.ndarray, what: str, float_buckets: int,
          taken: set[str], warn: Warn, dropped: dict[str, str], text: bool) -> SideTable:
    n = len(vocab)
    if t is None:
        texts = [str(v) for v in vocab] if text else None
        return SideTable(vocab, {}, {}, texts)
    t.require(key)
    ids = [str(v) for v in t.columns[key]]
    pos: dict[str, int] = {}
    for k, v in enumerate(ids):
        if v in pos:
            raise DatasetError(f"{t.path}: line {t.line(k)}: {key} {v!r} appears twice "
                               f"(first on line {t.line(pos[v])})")
        pos[v] = k
    idx = np.array([pos.get(str(v), -1) for v in vocab], dtype=np.int64)
    missing = int((idx < 0).sum())
    if missing:
        warn(f"{t.path}: {missing} of {n} {what}s that interact have no row here; their "
             "features are 0 (unknown)")
    has = idx >= 0

    def gather(col: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=col.dtype)
        out[has] = col[idx[has]]
        return out

    single: dict[str, np.ndarray] = {}
    multi: dict[str, pa.ListArray] = {}
    pad = lambda a: np.r_[np.zeros(1, dtype=np.int32), a].astype(np.int32)  # noqa: E731
    for name, typ in t.types.items():
        if name == key:
            continue
        feat = name if name not in RESERVED and name not in taken else f"{what}_{name}"
        if feat != name:
            warn(f"{t.path}: feature {name!r} renamed {feat!r} (name already taken)")
        if typ == "float_seq" or (typ == "float" and float_buckets == 0):
            warn(f"{t.path}: {typ} feature {name!r} kept out of the model's sparse features")
            dropped[feat] = f"{typ} column not used"
            continue
        if typ == "token_seq":
            bags = encode_bags(gather(t.columns[name], ""))
            distinct = np.unique(bags.values.to_numpy(zero_copy_only=False)).size
            arr: Any = pa.ListArray.from_arrays(
                pa.array(np.r_[0, bags.offsets.to_numpy()].astype(np.int32)), bags.values)
            values_seen = distinct
        elif typ == "token":
            ids_ = encode_tokens(gather(t.columns[name], ""))
            arr, values_seen = pad(ids_), np.unique(ids_[ids_ > 0]).size
        else:
            ids_, how = bucketise(gather(t.columns[name], np.nan), float_buckets)
            arr, values_seen = pad(ids_), np.unique(ids_[ids_ > 0]).size
        if values_seen <= 1:
            why = "has no value" if values_seen == 0 else "has a single value"
            warn(f"{t.path}: feature {name!r} {why} over the {n} {what}s that interact; dropped")
            dropped[feat] = why
            continue
        taken.add(feat)
        if typ == "token_seq":
            multi[feat] = arr
        else:
            single[feat] = arr
    texts = None
    if text:
        parts = [t.columns[c] for c, ty in t.types.items() if c != key and ty in ("token",
                                                                                 "token_seq")]
        texts = []
        for k in range(n):
            vals = [str(p[idx[k]]).strip() for p in parts] if has[k] else []
            joined = "; ".join(v for v in vals if v)
            texts.append(joined or str(vocab[k]))
    return SideTable(vocab, single, multi, texts)


def load_generic(folder: Path, name: str | None = None, rule: LabelRule | None = None, *,
                 float_buckets: int = FLOAT_BUCKETS, warn: Warn = stderr_warn
                 ) -> tuple[tuple[Interactions, SideTable, SideTable], LabelRule,
                            dict[str, Any], dict[str, Any]]:
    """An atomic folder → ((interactions, user table, item table), the label rule used,
    source info for the manifest, protocol entries for the manifest)."""
    folder = Path(folder)
    name, files = _find_files(folder, name)
    tables = {ext: (read_atomic_file(p) if p is not None else None) for ext, p in files.items()}
    inter = tables["inter"]
    assert inter is not None
    if len(inter) == 0:
        raise DatasetError(f"{inter.path}: no interactions")
    rule, value, ts, time_rule = _inter_columns(inter, rule, warn)
    keep = rule.keep(value)
    if not keep.any():
        raise DatasetError(f"{inter.path}: no interactions left after the label rule "
                           f"({rule.describe()})")
    u_dense, u_vocab = dense_ids(inter.columns["user_id"][keep])
    i_dense, i_vocab = dense_ids(inter.columns["item_id"][keep])
    interactions = Interactions(u_dense, i_dense, value[keep], ts[keep])
    user, item, source = generic_sides(tables, u_vocab, i_vocab, folder, name, files,
                                       len(inter), float_buckets, warn)
    return (interactions, user, item), rule, source, {"timestamp": time_rule}
