"""The partitioned, out-of-core prepare (data_pipes/partitioned.py) against the in-memory path
on the same atomic files: MovieLens-shaped and generic RecBole folders, P = 1, 2, 3, 7 and tiny
CSV blocks (many streamed batches). Same dense ids, side tables, features, counts; the same
sequence row per user (users in another order), so the same samples and histories of every
split; `genci-prepare verify` passes and the streaming reader reads every row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipes.partitioned import prepare_partitioned
from data_pipes.prepare import main
from data_pipes.protocol import LabelRule
from data_pipes.schema import DatasetError
from data_pipes.sequences import read_split_samples

ML_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
ML_USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"


def ml_folder(folder: Path, seed: int = 0, n: int = 600) -> Path:
    """MovieLens-shaped atomic files: 40 users, 60 items (numeric ids, unsorted in the file),
    ratings 1..5 (3 dropped), timestamps with ties (same timestamp, same user)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    users = rng.permutation(np.arange(1, 41) * 7)
    items = rng.permutation(np.arange(1, 61) * 3)
    rows = [f"{rng.choice(users)}\t{rng.choice(items)}\t{rng.integers(1, 6)}\t"
            f"{rng.integers(0, 40)}" for _ in range(n)]
    (folder / "mini.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(rows) + "\n")
    (folder / "mini.item").write_text(ML_ITEM + "\n" + "\n".join(
        f"{i}\tFilm {i}\t{1950 + i % 7}\t{'Drama Comedy' if i % 2 else 'Horror'}"
        for i in items) + "\n")
    (folder / "mini.user").write_text(ML_USER + "\n" + "\n".join(
        f"{u}\t{20 + u % 5}\t{'MF'[u % 2]}\tjob{u % 4}\t000{u}" for u in users) + "\n")
    return folder


def generic_folder(folder: Path, seed: int = 1, n: int = 500) -> Path:
    """Generic atomic files: string ids, a 0/1 label column, no timestamp (file order), an
    item token and token_seq feature, a user float feature."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    users = [f"u{k}" for k in rng.permutation(30)]
    items = [f"it-{k}" for k in rng.permutation(45)]
    rows = [f"{rng.choice(users)}\t{rng.choice(items)}\t{rng.integers(0, 2)}" for _ in range(n)]
    (folder / "gen.inter").write_text("user_id:token\titem_id:token\tlabel:float\n"
                                      + "\n".join(rows) + "\n")
    (folder / "gen.item").write_text("item_id:token\tbrand:token\ttags:token_seq\n" + "\n".join(
        f"{i}\tb{k % 4}\tt{k % 3} t{k % 5}" for k, i in enumerate(items)) + "\n")
    (folder / "gen.user").write_text("user_id:token\tscore:float\n" + "\n".join(
        f"{u}\t{k * 0.37:.2f}" for k, u in enumerate(users)) + "\n")
    return folder


def sequences(out: Path) -> dict[int, dict]:
    """Sequence rows by user id (every user once)."""
    rows = [r for p in sorted((out / "sequences").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    by_user = {r["user_id"]: r for r in rows}
    assert len(by_user) == len(rows) > 0
    return by_user


def assert_same(mem: Path, part: Path) -> None:
    for side in ("items.parquet", "users.parquet"):
        assert pq.read_table(part / side).equals(pq.read_table(mem / side)), side
    assert sequences(part) == sequences(mem)       # the same rows, in another user order
    for split in ("train", "valid", "test"):        # hence the same samples and histories
        got, want = read_split_samples(part, split), read_split_samples(mem, split)
        assert got.to_pylist() == want.to_pylist() and len(got) > 0, split
    m1 = json.loads((mem / "manifest.json").read_text())
    m2 = json.loads((part / "manifest.json").read_text())
    for k in ("dataset", "protocol", "features", "row_group_size", "schema_version"):
        assert m2[k] == m1[k], k
    c1, c2 = m1["counts"], m2["counts"]
    for k in ("samples", "users", "items", "n_users", "n_items"):
        assert c2[k] == c1[k], k
    for s in ("train", "valid", "test"):
        assert c2[s]["rows"] == c1[s]["rows"] and c2[s]["positives"] == c1[s]["positives"]
        assert c2[s]["avg_history"] == pytest.approx(c1[s]["avg_history"], rel=1e-12)
    assert c2["avg_history"] == pytest.approx(c1["avg_history"], rel=1e-12)
    assert main(["verify", str(part)]) == 0


@pytest.fixture(params=["dense_ids", "arrow"])
def vocab_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both vocabulary paths of partitioned._Vocab.dense (the Arrow one for big vocabularies)."""
    from data_pipes import partitioned

    if request.param == "arrow":
        monkeypatch.setattr(partitioned, "SMALL_VOCAB", 0)
    return request.param


def test_ml_shaped_equals_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    vocab_path: str) -> None:
    src = ml_folder(tmp_path / "raw")
    mem = tmp_path / "mem"
    assert main(["--dataset", "recbole", "--source", str(src), "--out", str(mem),
                 "--no-progress", "--row-group-size", "16", "--shard-rows", "48"]) == 0
    for p in (1, 2, 3, 7):
        out = tmp_path / f"p{p}"
        prepare_partitioned(src, out, shape="ml", partitions=p, seed=2024, row_group_size=16,
                            shard_rows=48, block_bytes=256)
        assert_same(mem, out)
        assert json.loads((out / "manifest.json").read_text())["source"]["partitions"] == p
    # through the CLI, and the streaming reader reads every train row once
    out = tmp_path / "cli"
    capsys.readouterr()
    assert main(["--dataset", "recbole", "--source", str(src), "--out", str(out),
                 "--no-progress", "--row-group-size", "16", "--shard-rows", "48",
                 "--partitions", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == json.loads(
        (mem / "manifest.json").read_text())["counts"]["samples"]
    assert_same(mem, out)
    from data_pipes.stream import build_loader

    loader = build_loader(out, "train", batch_size=32, num_workers=0, seed=0,
                          with_tokens=False, with_history_ids=True)
    seen = sum(b.size for b in loader)
    man = json.loads((out / "manifest.json").read_text())
    assert seen == man["counts"]["train"]["rows"] > 0


def test_generic_equals_in_memory(tmp_path: Path, vocab_path: str) -> None:
    src = generic_folder(tmp_path / "raw")
    mem = tmp_path / "mem"
    args = ["--dataset", "recbole", "--atomic-dir", str(src), "--no-progress",
            "--row-group-size", "8", "--shard-rows", "40", "--split", "leave_one_out"]
    assert main([*args, "--out", str(mem)]) == 0
    for p in ("2", "auto"):
        out = tmp_path / f"p{p}"
        assert main([*args, "--out", str(out), "--partitions", p,
                     "--partition-rows", "100"]) == 0
        assert_same(mem, out)
    assert json.loads((tmp_path / "pauto" / "manifest.json").read_text())["source"][
        "partitions"] == 5      # ceil(500 / 100)
    out = tmp_path / "p1"
    prepare_partitioned(src, out, shape="generic", rule=LabelRule("label"), partitions=1,
                        split="leave_one_out", max_history=50, seed=2024, row_group_size=8,
                        shard_rows=40, block_bytes=128)
    assert_same(mem, out)


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ml_folder(tmp_path / "raw", n=50)
    with pytest.raises(DatasetError, match="--split random .* use --partitions 1"):
        prepare_partitioned(src, tmp_path / "o", shape="ml", partitions=2, split="random")
    bad = tmp_path / "bad"
    bad.mkdir()
    for ext in ("item", "user"):
        (bad / f"mini.{ext}").write_bytes((src / f"mini.{ext}").read_bytes())
    (bad / "mini.inter").write_text("user_id:token\titem_id:token\trating:float\t"
                                    "timestamp:float\n7\t3\t4\t1\n7\t6\tfive\t2\n")
    rc = main(["--dataset", "recbole", "--source", str(bad), "--out", str(tmp_path / "o"),
               "--no-progress", "--partitions", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("genci-prepare: error: " + str(bad / "mini.inter")
                               + ": data row 2: field 'rating' = 'five' is not a number")
    assert not (tmp_path / "o").exists()
    rc = main(["--dataset", "amazon", "--source", str(bad), "--out", str(tmp_path / "o"),
               "--no-progress", "--partitions", "2"])
    assert rc == 2 and "not --dataset amazon" in capsys.readouterr().err


@pytest.mark.parametrize("ids", [
    ["10", "9", "007", "7", "-3", "100000000000000000"],            # numeric: int order, 007 = 7
    ["b", "a10", "a9", "É", "z", "é", "10", "ü", "Z", "a"],          # strings: code-point order
    ["5", "+5", "6"],                                               # "+5" is not numeric
])
def test_arrow_vocab_is_dense_ids(ids: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from data_pipes import partitioned
    from data_pipes.protocol import dense_ids

    rng = np.random.default_rng(0)
    raw = [ids[k] for k in rng.integers(0, len(ids), size=200)]
    _, want = dense_ids(np.asarray(raw, dtype=object))
    monkeypatch.setattr(partitioned, "SMALL_VOCAB", 0)     # the Arrow path
    v = partitioned._Vocab()
    for k in range(0, 200, 7):
        v.add(pa.array(raw[k:k + 7]))
    vocab, value_set = v.dense()
    assert vocab.dtype.kind == want.dtype.kind and vocab.tolist() == want.tolist()
    dense = partitioned._to_dense(pa.array(raw), value_set)
    assert dense.tolist() == dense_ids(np.asarray(raw, dtype=object))[0].tolist()


def test_csv_blocks_are_joined_into_batches(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's CSV reader reads small blocks (its read-ahead queue holds 32 of them) and
    read_batches joins them into batches of at least block_bytes: the same rows and values
    in file order; a malformed row in a later block is still named by the rows before it."""
    from data_pipes import raw_inter

    src = ml_folder(tmp_path / "raw")
    spec = raw_inter.inter_spec(src / "mini.inter", "ml", None, lambda m: None)
    whole = list(raw_inter.read_batches(spec, 1 << 20))
    assert len(whole) == 1 and len(whole[0].value) == 600
    monkeypatch.setattr(raw_inter, "CSV_BLOCK_BYTES", 64)
    joined = list(raw_inter.read_batches(spec, 2000))
    assert len(joined) > 2
    assert all(pa_nbytes(b) >= 2000 for b in joined[:-1])
    for field in ("user", "item"):
        got = [v for b in joined for v in getattr(b, field).to_pylist()]
        assert got == getattr(whole[0], field).to_pylist()
    assert np.concatenate([b.ts for b in joined]).tolist() == whole[0].ts.tolist()
    lines = (src / "mini.inter").read_text().splitlines()
    lines.insert(401, "7\t3\t4")                               # data row 401: three fields
    (src / "mini.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"after data row (\d+): malformed row") as e:
        list(raw_inter.read_batches(spec, 2000))
    before = int(e.value.args[0].split("after data row ")[1].split(":")[0])
    assert 300 < before <= 400


def pa_nbytes(b) -> int:  # noqa: ANN001
    return b.user.nbytes + b.item.nbytes + b.value.nbytes + b.ts.nbytes
