"""Bad data (SPEC §6), case by case: each damaged dataset gets its one-line message from
`genci-prepare verify` (exit 2) and a DatasetError from the loader, and no file is changed.

Two kinds of damage: bytes changed after the writer finished (corrupt, truncated, one bit
flipped, an extra shard): the manifest's size/sha256 give it away. And bad content whose
manifest agrees (`rehash`: as if a buggy writer or another tool had written it): only the
schema and row checks can see it, and they name the file, row group, row and column.

The tiny dataset's train/part-00000.parquet holds 48 rows in row groups of 16 (rows 0-15,
16-31, 32-47); item ids are 1..40 (cardinality 41).
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

SHARD = "train/part-00000.parquet"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("bad") / "tiny", semantic_ids=False)


def _set_column(ds: Path, name: str, arr: pa.Array | None) -> None:
    t = pq.read_table(ds / SHARD)
    t = (t.drop_columns([name]) if arr is None
         else t.set_column(t.column_names.index(name), name, arr))
    pq.write_table(t, ds / SHARD, row_group_size=16)


def _column(ds: Path, name: str) -> list:
    return pq.read_table(ds / SHARD).column(name).to_pylist()


def _labels(ds: Path, bad: dict[int, float], dtype: pa.DataType) -> None:
    labels = np.asarray(_column(ds, "label"), dtype=np.float64)
    for row, value in bad.items():
        labels[row] = value
    _set_column(ds, "label", pa.array(labels.astype(dtype.to_pandas_dtype()), dtype))


def _history(ds: Path, row: int, value: list | None) -> None:
    hist = _column(ds, "history")
    hist[row] = value
    _set_column(ds, "history", pa.array(hist, pa.list_(pa.int32())))


def _bytes(ds: Path, edit: Callable[[bytearray], bytearray]) -> None:
    (ds / SHARD).write_bytes(bytes(edit(bytearray((ds / SHARD).read_bytes()))))


def _random_bytes(b: bytearray) -> bytearray:
    mid = len(b) // 2
    b[mid:mid + 64] = np.random.default_rng(7).integers(0, 256, 64, dtype=np.uint8).tobytes()
    return b


def _flip_bit(b: bytearray) -> bytearray:
    b[len(b) // 3] ^= 0x10
    return b


def _items(ds: Path, row: int, value: int) -> None:
    items = _column(ds, "item_id")
    items[row] = value
    _set_column(ds, "item_id", pa.array(items, pa.int32()))


P = r".*/tiny/train/part-00000\.parquet"
SHA = P + r": sha256 [0-9a-f]{16}… differs from the manifest's [0-9a-f]{16}…"
# (name, damage, rehash the manifest, the verify line, the loader's message, verify lines)
CASES = [
    ("corrupt", lambda ds: _bytes(ds, _random_bytes), False, SHA, SHA, None),
    ("truncated", lambda ds: _bytes(ds, lambda b: b[:len(b) // 2]), False,
     P + r": 3256 bytes, the manifest says 6512 \(truncated or replaced",
     P + r": 3256 bytes, the manifest says 6512 \(truncated or replaced", None),
    ("one bit flipped", lambda ds: _bytes(ds, _flip_bit), False, SHA, SHA, None),
    ("extra shard", lambda ds: shutil.copy(ds / SHARD, ds / "train/part-00099.parquet"), False,
     r".*/train/part-00099\.parquet: not listed in the manifest",
     r".*/train/part-00099\.parquet: not listed in the manifest", 1),
    ("missing column", lambda ds: _set_column(ds, "genres", None), True,
     P + r": missing column\(s\) \['genres'\]$",
     P + r" \(row group 0\): missing column\(s\) \['genres'\]$", 1),
    ("label as string", lambda ds: _set_column(
        ds, "label", pa.array([str(x) for x in _column(ds, "label")])), True,
     P + r": column 'label' is string, expected an integer or bool type \(0/1\)$",
     P + r" \(row group 0\): column 'label' is string, expected an integer or bool type", 1),
    ("label as 0.0/1.0 floats", lambda ds: _labels(ds, {}, pa.float32()), True,
     P + r" \(row group 0\): column 'label' is float, expected an integer or bool type",
     P + r" \(row group 0\): column 'label' is float, expected an integer or bool type", 3),
    ("item id out of range", lambda ds: _items(ds, 20, 999), True,
     P + r" \(row group 1, row 4\): field 'item_id' has id 999 outside \[0, 41\) declared",
     P + r" \(row group 1, row 4\): field 'item_id' has id 999 outside \[0, 41\)", 1),
    ("negative history id", lambda ds: _history(ds, 33, [3, -2]), True,
     P + r" \(row group 2, row 1\): field 'history' has id -2 outside \[0, 41\)",
     P + r" \(row group 2, row 1\): field 'history' has id -2 outside \[0, 41\)", 1),
    ("NaN label", lambda ds: _labels(ds, {3: np.nan}, pa.float32()), True,
     P + r" \(row group 0, row 3\): label nan is not 0 or 1$",
     P + r" \(row group 0, row 3\): label nan is not 0 or 1$", 3),   # + 2 float-typed groups
    ("inf label", lambda ds: _labels(ds, {5: np.inf}, pa.float64()), True,
     P + r" \(row group 0, row 5\): label inf is not 0 or 1$",
     P + r" \(row group 0, row 5\): label inf is not 0 or 1$", 3),
    ("label 2", lambda ds: _labels(ds, {17: 2}, pa.int8()), True,
     P + r" \(row group 1, row 1\): label 2\.0 is not 0 or 1$",
     P + r" \(row group 1, row 1\): label 2\.0 is not 0 or 1$", 1),
    ("null history", lambda ds: _history(ds, 9, None), True,
     P + r" \(row group 0, row 9\): field 'history' is null$",
     P + r" \(row group 0, row 9\): field 'history' is null$", 1),
    ("null history element", lambda ds: _history(ds, 40, [4, None, 6]), True,
     P + r" \(row group 2, row 8\): field 'history' has a null element \(position 1\)$",
     P + r" \(row group 2, row 8\): field 'history' has a null element \(position 1\)$", 1),
    ("null label", lambda ds: _set_column(
        ds, "label", pa.array([None] + _column(ds, "label")[1:], pa.int8())), True,
     P + r" \(row group 0, row 0\): field 'label' is null$",
     P + r" \(row group 0, row 0\): field 'label' is null$", 1),
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
    assert rc == 0 and len(out) == 1 and ": clean: 11 files" in out[0]   # the copy starts clean
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
    _labels(ds, {17: 2}, pa.int8())
    rc, out = _verify(ds, capsys)
    assert rc == 2 and len(out) == 3, out
    assert re.fullmatch(P + r": 6518 bytes, the manifest says 6512 .*", out[0])
    assert re.fullmatch(SHA + ".*", out[1])
    assert out[2].endswith("(row group 1, row 1): label 2.0 is not 0 or 1")
    with pytest.raises(DatasetError, match="6518 bytes, the manifest says 6512"):
        build_loader(ds, "train", batch_size=8, with_tokens=False)
    # the loader's own row checks are still there when the file check is skipped
    with pytest.raises(DatasetError, match=r"row group 1, row 1\): label 2\.0 is not 0 or 1"):
        list(build_loader(ds, "train", batch_size=1000, shuffle=False, with_tokens=False,
                          check_files=False))
