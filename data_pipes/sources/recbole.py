"""Generic reader of RecBole atomic files (`.inter`, `.item`, `.user`).

Format: tab-separated, a header of `name:type` fields (types token, token_seq, float,
float_seq), CRLF line ends tolerated. Every column comes back as a numpy array: `float` →
float64, `token` → str, `*_seq` → str (split later by the caller, space-separated). Parsing uses
pyarrow's CSV reader (fast, multi-threaded) with quoting off, since titles contain quotes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipes.schema import DatasetError

TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass
class AtomicTable:
    path: str
    columns: dict[str, np.ndarray]
    types: dict[str, str]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DatasetError(f"{self.path}: missing required column(s) {missing}; "
                               f"header has {list(self.columns)}")


def parse_header(line: str, path: str) -> tuple[list[str], list[str]]:
    names, types = [], []
    for i, field in enumerate(line.rstrip("\r\n").split("\t")):
        if ":" not in field:
            raise DatasetError(f"{path}: header field {i + 1} {field!r} is not 'name:type'")
        name, typ = field.rsplit(":", 1)
        if typ not in TYPES:
            raise DatasetError(f"{path}: header field {name!r} has unknown type {typ!r} "
                               f"(expected one of {TYPES})")
        names.append(name)
        types.append(typ)
    return names, types


def _bad_line(body: bytes, expected: int, reported: list[int]) -> int | str:
    """File line number (header = line 1) of the first row without `expected` fields. Arrow's
    multi-threaded reader reports row number -1, so the error path scans the body itself."""
    if reported and reported[0] > 0:
        return reported[0] + 1
    for i, line in enumerate(body.split(b"\n"), 2):
        line = line.rstrip(b"\r")
        if line and line.count(b"\t") != expected - 1:
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


def read_atomic(data: bytes, path: str) -> AtomicTable:
    """Parses one atomic file's bytes; `path` names it in errors."""
    text_end = data.find(b"\n")
    if text_end < 0 or not data.strip():
        raise DatasetError(f"{path}: empty file (no header)")
    names, types = parse_header(data[:text_end].decode("utf-8"), path)
    body = data[text_end + 1:]
    expected = len(names)
    bad: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row.number if row.number is not None else -1)
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=names, autogenerate_column_names=False),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                             newlines_in_values=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: line {_bad_line(body, expected, bad)}: malformed row, "
                           f"expected {expected} tab-separated fields ({e})") from None
    cols: dict[str, np.ndarray] = {}
    for name, typ in zip(names, types, strict=True):
        col = pc.utf8_rtrim(table.column(name), characters="\r")
        if typ == "float":
            try:
                cols[name] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                strings = col.to_pylist()
                for i, s in enumerate(strings):
                    try:
                        float(s)
                    except ValueError:
                        raise DatasetError(f"{path}: line {_row_line(body, i)}: field "
                                           f"{name!r} = {s!r} is not a number") from None
                raise
        else:
            cols[name] = np.asarray(col.to_pylist(), dtype=object)
    return AtomicTable(path, cols, dict(zip(names, types, strict=True)))


def read_atomic_file(path: str | Path) -> AtomicTable:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return read_atomic(path.read_bytes(), str(path))
