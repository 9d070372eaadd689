"""Bad data (SPEC §6), case by case: each damaged dataset gets its one-line message from
`genci-prepare verify` (exit 2) and a DatasetError from the loader, and no file is changed.

Two kinds of damage: bytes changed after the writer finished (corrupt, truncated, one bit
flipped, an extra shard): the manifest's size/sha256 give it away. And bad content whose
manifest agrees (`rehash`: as if a buggy writer or another tool had written it): only the
schema and row checks can see it, and they name the file, row group, row and column.

The tiny dataset's sequences/part-00000.parquet holds 4 users (12 positions each) in row
groups of 2 users (rows 0-1, 2-3); item ids are 1..40 (cardinality 41), user ids 1..30 (31).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.prepare import main as prepare_main
from data_pipes.schema import DatasetError
from data_pipes.stream import build_loader
from data_pipes.verify import CACHE
from tests.conftest import write_tiny_dataset

SHARD = "sequences/part-00000.parquet"
SIZE = 3485          # bytes of the pristine SHARD (checked below)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("bad") / "tiny", semantic_ids=False)


def _set_column(ds: Path, name: str, arr: pa.Array | None) -> None:
    t = pq.read_table(ds / SHARD)
    t = (t.drop_columns([name]) if arr is None
         else t.set_column(t.column_names.index(name), name, arr))
    pq.write_table(t, ds / SHARD, row_group_size=2)


def _column(ds: Path, name: str) -> list:
    return pq.read_table(ds / SHARD).column(name).to_pylist()


def _list_type(name: str) -> pa.DataType:
    return {"labels": pa.list_(pa.int8()), "splits": pa.list_(pa.int8()),
            "timestamps": pa.list_(pa.int64())}.get(name, pa.list_(pa.int32()))


def _at(ds: Path, name: str, row: int, pos: int | None, value: object) -> None:
    """Position `pos` of list column `name` in row `row` set to `value` (pos None: the whole
    row's list)."""
    col = _column(ds, name)
    if pos is None:
        col[row] = value
    else:
        col[row][pos] = value
    _set_column(ds, name, pa.array(col, _list_type(name)))


def _bytes(ds: Path, edit: Callable[[bytearray], bytearray]) -> None:
    (ds / SHARD).write_bytes(bytes(edit(bytearray((ds / SHARD).read_bytes()))))


def _random_bytes(b: bytearray) -> bytearray:
    mid = len(b) // 2
    b[mid:mid + 64] = np.random.default_rng(7).integers(0, 256, 64, dtype=np.uint8).tobytes()
    return b


def _flip_bit(b: bytearray) -> bytearray:
    b[len(b) // 3] ^= 0x10
    return b


P = r".*/tiny/sequences/part-00000\.parquet"
SHA = P + r": sha256 [0-9a-f]{16}… differs from the manifest's [0-9a-f]{16}…"
# (name, damage, rehash the manifest, the verify line, the loader's message, verify lines)
CASES = [
    ("corrupt", lambda ds: _bytes(ds, _random_bytes), False, SHA, SHA, None),
    ("truncated", lambda ds: _bytes(ds, lambda b: b[:len(b) // 2]), False,
     P + rf": {SIZE // 2} bytes, the manifest says {SIZE} \(truncated or replaced",
     P + rf": {SIZE // 2} bytes, the manifest says {SIZE} \(truncated or replaced", None),
    ("one bit flipped", lambda ds: _bytes(ds, _flip_bit), False, SHA, SHA, None),
    ("extra shard", lambda ds: shutil.copy(ds / SHARD, ds / "sequences/part-00099.parquet"),
     False, r".*/sequences/part-00099\.parquet: not listed in the manifest",
     r".*/sequences/part-00099\.parquet: not listed in the manifest", 1),
    ("missing column", lambda ds: _set_column(ds, "gender", None), True,
     P + r": missing column\(s\) \['gender'\]$",
     P + r" \(row group 0\): missing column\(s\) \['gender'\]$", 1),
    ("labels as strings", lambda ds: _set_column(ds, "labels", pa.array(
        [[str(x) for x in r] for r in _column(ds, "labels")])), True,
     P + r": column 'labels' is list<element: string>, expected a list of an integer type$",
     P + r" \(row group 0\): column 'labels' is list<element: string>, expected a list of an "
     r"integer type$", 1),
    ("labels as 0.0/1.0 floats", lambda ds: _set_column(ds, "labels", pa.array(
        _column(ds, "labels"), pa.list_(pa.float32()))), True,
     P + r": column 'labels' is list<element: float>, expected a list of an integer type$",
     P + r" \(row group 0\): column 'labels' is list<element: float>", 1),
    ("item id out of range", lambda ds: _at(ds, "items", 3, 4, 999), True,
     P + r" \(row group 1, row 1\): field 'items' has id 999 outside \[0, 41\) declared",
     P + r" \(row group 1, row 1\): field 'items' has id 999 outside \[0, 41\)", 1),
    ("negative item id", lambda ds: _at(ds, "items", 0, 2, -2), True,
     P + r" \(row group 0, row 0\): field 'items' has id -2 outside \[0, 41\)",
     P + r" \(row group 0, row 0\): field 'items' has id -2 outside \[0, 41\)", 1),
    ("user id out of range", lambda ds: _set_column(ds, "user_id", pa.array(
        [1, 2, 77, 4], pa.int32())), True,
     P + r" \(row group 1, row 0\): field 'user_id' has id 77 outside \[0, 31\)",
     P + r" \(row group 1, row 0\): field 'user_id' has id 77 outside \[0, 31\)", 1),
    ("user feature id out of range", lambda ds: _set_column(ds, "gender", pa.array(
        [1, 2, 1, 9], pa.int32())), True,
     P + r" \(row group 1, row 1\): field 'gender' has id 9 outside \[0, 3\)",
     P + r" \(row group 1, row 1\): field 'gender' has id 9 outside \[0, 3\)", 1),
    ("label 2", lambda ds: _at(ds, "labels", 2, 5, 2), True,
     P + r" \(row group 1, row 0\): field 'labels' has 2 at position 5, expected 0 or 1$",
     P + r" \(row group 1, row 0\): field 'labels' has 2 at position 5, expected 0 or 1$", 1),
    ("split code 3", lambda ds: _at(ds, "splits", 1, 0, 3), True,
     P + r" \(row group 0, row 1\): field 'splits' has 3 at position 0, expected 0, 1 or 2$",
     P + r" \(row group 0, row 1\): field 'splits' has 3 at position 0, expected 0, 1 or 2$",
     1),
    ("a label missing", lambda ds: _at(ds, "labels", 1, None, _column(ds, "labels")[1][:-1]),
     True,
     P + r" \(row group 0, row 1\): field 'labels' has 11 values, 'items' has 12$",
     P + r" \(row group 0, row 1\): field 'labels' has 11 values, 'items' has 12$", 1),
    ("a timestamp missing", lambda ds: _at(ds, "timestamps", 2, None,
                                           _column(ds, "timestamps")[2][1:]), True,
     P + r" \(row group 1, row 0\): field 'timestamps' has 11 values, 'items' has 12$",
     None, 1),     # the reader does not read timestamps: only verify sees it
    ("null items", lambda ds: _at(ds, "items", 1, None, None), True,
     P + r" \(row group 0, row 1\): field 'items' is null$",
     P + r" \(row group 0, row 1\): field 'items' is null$", 1),
    ("null item", lambda ds: _at(ds, "items", 3, 1, None), True,
     P + r" \(row group 1, row 1\): field 'items' has a null element \(position 1\)$",
     P + r" \(row group 1, row 1\): field 'items' has a null element \(position 1\)$", 1),
    ("null label", lambda ds: _at(ds, "labels", 0, 0, None), True,
     P + r" \(row group 0, row 0\): field 'labels' has a null element \(position 0\)$",
     P + r" \(row group 0, row 0\): field 'labels' has a null element \(position 0\)$", 1),
]


def _rehash(ds: Path, rel: str) -> None:
    """Records the edited file in the manifest, as its writer would have."""
    manifest = json.loads((ds / "manifest.json").read_text())
    data = (ds / rel).read_bytes()
    manifest["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ds / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _snapshot(ds: Path) -> dict[str, str]:
    return {str(p.relative_to(ds)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ds.rglob("*")) if p.is_file() and p.name != CACHE}


def _verify(ds: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = prepare_main(["verify", str(ds)])
    return rc, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(("name", "damage", "rehash", "verify_line", "loader_msg", "lines"),
                         CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_named_by_verify_and_refused_by_the_loader(
        pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
        damage: Callable[[Path], None], rehash: bool, verify_line: str, loader_msg: str,
        lines: int | None) -> None:
    ds = tmp_path / "tiny"
    shutil.copytree(pristine, ds)
    rc, out = _verify(ds, capsys)
    assert rc == 0 and len(out) == 1 and ": clean: 10 files" in out[0]   # the copy starts clean
    assert (ds / SHARD).stat().st_size == SIZE
    damage(ds)
    if rehash:
        _rehash(ds, SHARD)
    before = _snapshot(ds)

    rc, out = _verify(ds, capsys)
    assert rc == 2
    assert any(re.fullmatch(verify_line + ".*", line) for line in out), out
    assert all(str(ds) in line for line in out)       # every problem names its file
    if lines is not None:
        assert len(out) == lines, out
    assert not (ds / CACHE).exists(), "verify must not write into the dataset"

    if loader_msg is None:
        list(build_loader(ds, "train", batch_size=1000, shuffle=False, with_tokens=False))
    else:
        with pytest.raises(DatasetError) as err:
            list(build_loader(ds, "train", batch_size=1000, shuffle=False, with_tokens=False))
        assert re.fullmatch(loader_msg + ".*", str(err.value)), str(err.value)
        assert "\n" not in str(err.value)
    assert _snapshot(ds) == before, "nothing written may change"


def test_content_damage_without_a_matching_manifest_fails_on_the_hash_first(
        pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sha256 is checked before any row; verify goes on and names the row as well."""
    ds = tmp_path / "tiny"
    shutil.copytree(pristine, ds)
    _at(ds, "labels", 2, 5, 2)
    size = (ds / SHARD).stat().st_size
    rc, out = _verify(ds, capsys)
    assert rc == 2 and len(out) == 3, out
    assert re.fullmatch(P + rf": {size} bytes, the manifest says {SIZE} .*", out[0])
    assert re.fullmatch(SHA + ".*", out[1])
    assert out[2].endswith("(row group 1, row 0): field 'labels' has 2 at position 5, "
                           "expected 0 or 1")
    with pytest.raises(DatasetError, match=f"{size} bytes, the manifest says {SIZE}"):
        build_loader(ds, "train", batch_size=8, with_tokens=False)
    # the loader's own row checks are still there when the file check is skipped
    with pytest.raises(DatasetError, match=r"row group 1, row 0\): field 'labels' has 2"):
        list(build_loader(ds, "train", batch_size=1000, shuffle=False, with_tokens=False,
                          check_files=False))
