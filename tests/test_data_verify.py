"""The loader's load-time file check and its cache (data_pipes.verify.check_split_files), and
`genci-prepare verify` through its real entry point.

The cache remembers a shard's digest under its (size, mtime_ns): a second load only stats,
a touched file is hashed once more and accepted, a changed file is refused. Hash calls are
counted by wrapping data_pipes.verify.sha256_file.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipes import verify
from data_pipes.schema import DatasetError
from data_pipes.stream import build_loader
from data_pipes.verify import CACHE, check_split_files
from tests.conftest import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# the tiny dataset's sequence shards, which every split reads
TRAIN = [f"sequences/part-{k:05d}.parquet" for k in range(8)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("cache") / "tiny", semantic_ids=False)


@pytest.fixture
def ds(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "tiny"))


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names (relative to the dataset) of the files hashed, in order."""
    calls: list[str] = []
    real = verify.sha256_file

    def counting(path: Path) -> str:
        calls.append(f"{path.parent.name}/{path.name}")
        return real(path)

    monkeypatch.setattr(verify, "sha256_file", counting)
    return calls


def _load(ds: Path, split: str = "train", **kw: object) -> list[int]:
    loader = build_loader(ds, split, batch_size=1000, shuffle=False, with_tokens=False, **kw)
    return [r for b in loader for r in b.row_ids.tolist()]


def test_second_load_does_not_rehash(ds: Path, hashed: list[str]) -> None:
    assert _load(ds) == list(range(270))
    assert sorted(hashed) == TRAIN                        # each shard once, nothing else
    cache = json.loads((ds / CACHE).read_text())["files"]
    assert sorted(cache) == TRAIN
    shard = ds / TRAIN[0]
    assert cache[TRAIN[0]] == {"size": shard.stat().st_size,
                               "mtime_ns": shard.stat().st_mtime_ns,
                               "sha256": json.loads((ds / "manifest.json").read_text())
                               ["files"][TRAIN[0]]["sha256"]}
    hashed.clear()
    assert _load(ds) == list(range(270))
    assert _load(ds, num_workers=2) == list(range(270))   # workers never re-check
    assert hashed == []
    _load(ds, "valid")
    assert hashed == []                                  # the same shards, still cached
    assert len(json.loads((ds / CACHE).read_text())["files"]) == 8
    assert not list(ds.glob(f"{CACHE}.*")), "no temporary cache file left behind"


def test_touched_file_is_rehashed_once_and_a_changed_one_refused(ds: Path,
                                                                 hashed: list[str]) -> None:
    _load(ds)
    shard = ds / TRAIN[2]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touched, same bytes
    hashed.clear()
    assert _load(ds) == list(range(270))
    assert hashed == [TRAIN[2]]
    hashed.clear()
    _load(ds)
    assert hashed == []
    # one bit flipped: same size, new mtime → hashed again and refused, naming the file
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"{TRAIN[2]}: sha256 [0-9a-f]{{16}}… differs "
                                           r"from the manifest's [0-9a-f]{16}…"):
        _load(ds)
    with pytest.raises(DatasetError, match="differs from the manifest"):   # not cached as good
        _load(ds)


def test_a_change_that_keeps_size_and_mtime_is_what_verify_is_for(
        ds: Path, hashed: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The documented limit of the cheap check: bytes rotting in place (size and mtime kept)
    pass the cached load; the full `genci-prepare verify` always hashes and finds them."""
    _load(ds)
    shard = ds / TRAIN[1]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    check_split_files(ds, "train")                         # cache hit: not hashed
    assert hashed == []
    assert verify.main([str(ds)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{shard}: sha256 ") for line in out), out


def test_cache_is_keyed_by_the_manifest_digest_too(ds: Path, hashed: list[str]) -> None:
    _load(ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["files"][TRAIN[4]]["sha256"] = "0" * 64
    (ds / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    with pytest.raises(DatasetError, match=rf"{TRAIN[4]}: sha256 .* differs from the "
                                           r"manifest's 0000000000000000…"):
        _load(ds)
    assert hashed[-1] == TRAIN[4]


def test_unwritable_or_damaged_cache_only_costs_a_rehash(ds: Path, hashed: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (ds / CACHE).write_text("{not json")
    _load(ds)
    assert len(hashed) == 8
    assert sorted(json.loads((ds / CACHE).read_text())["files"]) == TRAIN   # rewritten

    def read_only(*_: object) -> None:
        raise PermissionError("read-only file system")

    (ds / CACHE).unlink()
    monkeypatch.setattr(verify.os, "replace", read_only)
    hashed.clear()
    assert _load(ds) == list(range(270))
    _load(ds)
    assert len(hashed) == 16                  # no cache: every load hashes, and still passes
    assert sorted(p.name for p in ds.iterdir() if p.name.startswith(CACHE)) == []


def _check_all(ds: str, barrier: mp.synchronize.Barrier) -> None:   # a forked process
    barrier.wait()
    for split in ("train", "valid", "test"):
        check_split_files(ds, split)


def test_processes_starting_at_once_share_the_cache_safely(ds: Path) -> None:
    """Four processes (two ranks' worth, twice) check every split at the same moment on a cold
    cache: all pass; the cache on disk is always whole JSON whose every entry is right (a lost
    merge only costs a later rehash); no temporary file is left."""
    ctx = mp.get_context("fork")
    for _ in range(3):
        (ds / CACHE).unlink(missing_ok=True)
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_check_all, args=(str(ds), barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        files = json.loads((ds / CACHE).read_text())["files"]
        manifest = json.loads((ds / "manifest.json").read_text())["files"]
        assert files and all(
            v == {"size": (ds / rel).stat().st_size, "mtime_ns": (ds / rel).stat().st_mtime_ns,
                  "sha256": manifest[rel]["sha256"]} for rel, v in files.items())
        assert not list(ds.glob(f"{CACHE}.*"))


def test_verify_cli_exit_codes_through_genci_prepare(ds: Path) -> None:
    run = [sys.executable, "-m", "data_pipes.prepare", "verify", str(ds)]
    clean = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith(f"genci-prepare verify: {ds}: clean: 10 files, ")
    shard = ds / "sequences/part-00007.parquet"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-100])
    bad = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    lines = bad.stdout.splitlines()
    assert lines[0].startswith(f"{shard}: {size - 100} bytes, the manifest says {size} "
                               "(truncated")
    assert all(line.startswith(f"{shard}") for line in lines) and len(lines) == 3
    assert "3 problem(s)" in bad.stderr
