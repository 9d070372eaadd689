"""The generic RecBole atomic source (`genci-prepare --dataset recbole --atomic-dir`) on fixture
files written here: every label rule on hand-computed labels, a missing timestamp (file order,
said in the manifest), a user/item/rating-only dataset through prepare and the streaming
reader, token_seq → bag feature, float bucketing, degenerate features warned and dropped,
non-UTF-8 bytes reported by line and column, and the trainer's tokenizer notice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipes.prepare import main
from data_pipes.protocol import MOVIELENS, LabelRule
from data_pipes.schema import DatasetError
from data_pipes.sequences import read_split_samples
from data_pipes.sources.recbole import read_atomic

# 0..10 ratings with implicit zeros (the case the MovieLens rule got wrong).
INTER = [("u1", "i1", 0, 10), ("u1", "i2", 10, 11), ("u1", "i3", 7, 12), ("u1", "i4", 5, 13),
         ("u2", "i1", 6, 20), ("u2", "i3", 3, 21), ("u2", "i5", 8, 22)]


def write(folder: Path, name: str, ext: str, header: str, rows: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header] + ["\t".join(str(v) for v in r) for r in rows]
    (folder / f"{name}.{ext}").write_text("\n".join(lines) + "\n")


def prepare(tmp: Path, src: Path, *args: str) -> tuple[int, Path]:
    out = tmp / "out"
    return main(["--dataset", "recbole", "--atomic-dir", str(src), "--out", str(out),
                 "--no-progress", "--force", *args]), out


def labels(out: Path) -> dict[tuple[str, str], int]:
    """(raw user, raw item) → label over all splits."""
    users = {r["user_id"]: r["raw_id"] for r in pq.read_table(out / "users.parquet").to_pylist()}
    items = {r["item_id"]: r["raw_id"] for r in pq.read_table(out / "items.parquet").to_pylist()}
    return {(users[r["user_id"]], items[r["item_id"]]): r["label"]
            for s in ("train", "valid", "test") for r in read_split_samples(out, s).to_pylist()}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_label_rules_hand_computed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "raw"
    write(src, "r10", "inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
          INTER)
    # no label column and no rule: refuses, naming the rating range
    rc, out = prepare(tmp_path, src)
    err = capsys.readouterr().err
    assert rc == 2 and "r10.inter: no 'label' column (ratings range 0..10); choose a label " \
        "rule with --label-rule" in err and not out.exists()
    expected = {
        # label = rating >= 7, nothing dropped
        "threshold:7": {("u1", "i1"): 0, ("u1", "i2"): 1, ("u1", "i3"): 1, ("u1", "i4"): 0,
                        ("u2", "i1"): 0, ("u2", "i3"): 0, ("u2", "i5"): 1},
        # drop 5 and 6; label = rating > 6
        "drop-band:5-6": {("u1", "i1"): 0, ("u1", "i2"): 1, ("u1", "i3"): 1,
                          ("u2", "i3"): 0, ("u2", "i5"): 1},
        "implicit": {(u, i): 1 for u, i, _, _ in INTER},
    }
    described = {"threshold:7": "label = rating >= 7; nothing dropped",
                 "drop-band:5-6": "drop 5 <= rating <= 6; label = rating > 6",
                 "implicit": "implicit feedback: every interaction is a positive (label 1)"}
    for rule, want in expected.items():
        rc, out = prepare(tmp_path, src, "--label-rule", rule)
        assert rc == 0, capsys.readouterr().err
        assert labels(out) == want, rule
        m = manifest(out)
        assert m["protocol"]["label_rule"] == described[rule] and m["dataset"] == "r10"
        assert m["counts"]["samples"] == len(want)
    # drop-band 5-6 drops i4's only interaction: the item table holds only interacting items
    rc, out = prepare(tmp_path, src, "--label-rule", "drop-band:5-6")
    raw_items = [r["raw_id"] for r in pq.read_table(out / "items.parquet").to_pylist()]
    assert raw_items == ["i1", "i2", "i3", "i5"]
    # the MovieLens rule is drop-band:3-3 and its manifest text is unchanged
    assert LabelRule.parse("drop-band:3-3") == MOVIELENS
    assert MOVIELENS.describe() == "drop rating 3; label = rating > 3"
    for bad in ("drop-band:6-5", "threshold:", "above:3", "drop-band:1"):
        with pytest.raises(DatasetError, match="label rule"):
            LabelRule.parse(bad)
    with pytest.raises(SystemExit):
        prepare(tmp_path, src, "--label-rule", "drop-band:6-5")
    assert "LO 6 is above HI 5" in capsys.readouterr().err


def test_label_column_is_used_and_checked(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "raw"
    rows = [("a", "x", 1, 5), ("a", "y", 0, 6), ("b", "x", 0, 7), ("b", "z", 1, 8)]
    write(src, "lab", "inter", "user_id:token\titem_id:token\tlabel:float\ttimestamp:float", rows)
    rc, out = prepare(tmp_path, src)
    assert rc == 0
    assert labels(out) == {("a", "x"): 1, ("a", "y"): 0, ("b", "x"): 0, ("b", "z"): 1}
    assert manifest(out)["protocol"]["label_rule"] == "label column: label = the file's 0/1 label"
    write(src, "lab", "inter", "user_id:token\titem_id:token\tlabel:float\ttimestamp:float",
          rows[:2] + [("b", "x", 2, 7)] + rows[3:])
    rc, _ = prepare(tmp_path, src)
    assert rc == 2 and "lab.inter: line 4: label 2 is not 0 or 1" in capsys.readouterr().err
    # a rule reading ratings on a file without ratings
    rc, _ = prepare(tmp_path, src, "--label-rule", "threshold:1")
    assert rc == 2 and "needs a 'rating' column" in capsys.readouterr().err


def test_missing_timestamp_is_file_order(tmp_path: Path) -> None:
    """No timestamp: row k of the .inter has time k. u1's rows in file order are items 9, 3, 5
    (not sorted by id), so the 3rd sample's history is [9, 3]; temporal split of n = 3:
    2 train, 0 valid, 1 test."""
    src = tmp_path / "raw"
    write(src, "noclock", "inter", "user_id:token\titem_id:token\trating:float",
          [("u1", "9", 5), ("u2", "3", 1), ("u1", "3", 4), ("u2", "5", 5), ("u1", "5", 2),
           ("u2", "9", 4)])
    rc, out = prepare(tmp_path, src, "--label-rule", "threshold:4")
    assert rc == 0
    m = manifest(out)
    assert m["protocol"]["timestamp"] == "file order"
    items = {r["item_id"]: r["raw_id"] for r in pq.read_table(out / "items.parquet").to_pylist()}
    rows = sorted((r for s in ("train", "valid", "test") for r in read_split_samples(out, s)
                   .to_pylist()), key=lambda r: r["timestamp"])
    got = [(r["timestamp"], items[r["item_id"]], r["label"], [items[h] for h in r["history"]])
           for r in rows]
    assert got == [(0, "9", 1, []), (1, "3", 0, []), (2, "3", 1, ["9"]), (3, "5", 1, []),
                   (4, "5", 0, ["9", "3"]), (5, "9", 1, ["5"])]
    assert [m["counts"][s]["rows"] for s in ("train", "valid", "test")] == [4, 0, 2]


def test_minimal_dataset_prepares_and_streams(tmp_path: Path) -> None:
    """user/item/rating only (no timestamp, no .user/.item): the manifest has just the id
    features, item texts are the raw ids, and the streaming reader yields every sample."""
    from data_pipes.stream import build_loader

    src = tmp_path / "raw"
    rows = [(f"u{u}", f"i{(u * 7 + k) % 13}", (u + k) % 5 + 1) for u in range(6)
            for k in range(5)]
    write(src, "tiny", "inter", "user_id:token\titem_id:token\trating:float", rows)
    rc, out = prepare(tmp_path, src, "--label-rule", "threshold:4")
    assert rc == 0
    m = manifest(out)
    assert [f["name"] for f in m["features"]] == ["user_id", "item_id"]
    n_pos = sum(r[2] >= 4 for r in rows)
    assert m["counts"]["samples"] == 30 and m["counts"]["users"] == 6
    assert sum(m["counts"][s]["positives"] for s in ("train", "valid", "test")) == n_pos
    texts = {r["raw_id"]: r["text"] for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert all(t == raw for raw, t in texts.items())
    seen = 0
    for split in ("train", "valid", "test"):
        for batch in build_loader(out, split, batch_size=4, shuffle=False, with_tokens=False):
            seen += batch.size
            assert set(batch.sparse_features.keys()) == {"user_id", "item_id"}
    assert seen == 30


def test_side_features_bags_floats_and_degenerate(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "raw"
    write(src, "side", "inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
          [("u1", "a", 5, 1), ("u1", "b", 1, 2), ("u2", "c", 4, 3), ("u2", "a", 2, 4),
           ("u3", "b", 5, 5)])
    # country: one value for every user; note: always empty; age: 3 distinct floats
    write(src, "side", "user", "user_id:token\tcountry:token\tnote:token\tage:float",
          [("u1", "FR", "", 30), ("u2", "FR", "", 20), ("u3", "FR", "", 30.5),
           ("u9", "DE", "x", 99)])                       # u9 never interacts: ignored
    write(src, "side", "item", "item_id:token\ttitle:token_seq\ttags:token_seq\tprice:float"
          "\tvec:float_seq", [("a", "Red Fish", "pop rock", 3.5, "1 2"),
                              ("b", "Blue Fish", "jazz", "", "3 4"),
                              ("c", "Sad Song", "rock jazz rock", 10, "5 6")])
    rc, out = prepare(tmp_path, src, "--label-rule", "threshold:4")
    assert rc == 0, capsys.readouterr().err
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert any(re.search(r"side\.user: feature 'country' has a single value over the 3 users "
                         r"that interact; dropped", w) for w in warnings), warnings
    assert any("feature 'note' has no value" in w for w in warnings)
    assert any("float_seq feature 'vec' kept out" in w for w in warnings)
    assert len(warnings) == 3
    m = manifest(out)
    feats = {f["name"]: (f["side"], f["multi"], f["cardinality"]) for f in m["features"]}
    # tags vocabulary jazz=1 pop=2 rock=3; title words Blue=1 Fish=2 Red=3 Sad=4 Song=5;
    # age by value 20=1 30=2 30.5=3; price 3.5=1 10=2, missing = 0
    assert feats == {"user_id": ("user", False, 4), "age": ("user", False, 4),
                     "item_id": ("item", False, 4), "price": ("item", False, 3),
                     "title": ("item", True, 6), "tags": ("item", True, 4)}
    assert m["source"]["dropped"] == {"country": "has a single value", "note": "has no value",
                                      "vec": "float_seq column not used"}
    items = {r["raw_id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert items["a"]["tags"] == [2, 3] and items["c"]["tags"] == [3, 1, 3]
    assert items["b"]["tags"] == [1] and items["a"]["title"] == [3, 2]
    assert (items["a"]["price"], items["b"]["price"], items["c"]["price"]) == (1, 0, 2)
    assert items["a"]["text"] == "Red Fish; pop rock"
    users = {r["raw_id"]: r for r in pq.read_table(out / "users.parquet").to_pylist()}
    assert [users[u]["age"] for u in ("u1", "u2", "u3")] == [2, 1, 3]
    rows = [r for s in ("train", "valid", "test") for r in read_split_samples(out, s).to_pylist()]
    assert all(r["tags"] == items[next(k for k, v in items.items()
                                       if v["item_id"] == r["item_id"])]["tags"] for r in rows)


def test_float_feature_equal_frequency_buckets() -> None:
    import numpy as np

    from data_pipes.sources.recbole import bucketise

    ids, how = bucketise(np.array([1.0, 2, 3, 4, 5, 6, 7, 8, np.nan]), 4)
    # quartile edges of 1..8: 2.75, 4.5, 6.25 → buckets 1,1,2,2,3,3,4,4; NaN → 0
    assert ids.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 0] and how == "4 equal-frequency buckets"
    ids, how = bucketise(np.array([5.0, 1.0, 5.0]), 4)
    assert ids.tolist() == [2, 1, 2] and how == "2 distinct values, one id each"


def test_non_utf8_names_line_byte_and_column(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = "user_id:token\titem_id:token\tlabel:float\nu1\tcafé\t1\n".encode() + \
        b"u2\tcaf\xc3\xa9\t\xff1\n"
    # line 3: "u2", tab, "café", tab = 8 characters before the bad byte → column 9
    with pytest.raises(DatasetError, match=r"^x\.inter:3: byte 0xff at column 9 is not "
                                           r"UTF-8$"):
        read_atomic(data, "x.inter")
    with pytest.raises(DatasetError, match=r"^x\.inter:1: byte 0xe9 at column 5 is not UTF-8"):
        read_atomic(b"user\xe9:token\n", "x.inter")
    src = tmp_path / "raw"
    src.mkdir()
    (src / "bad.inter").write_bytes(data)
    rc, out = prepare(tmp_path, src)
    assert rc == 2 and re.search(r"bad\.inter:3: byte 0xff at column 9 is not UTF-8",
                                 capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_tokenizer_notice_says_what_and_how(tmp_path: Path) -> None:
    from genci_dist.runtime.datasets import tokenizer_notice

    src = tmp_path / "raw"
    write(src, "n", "inter", "user_id:token\titem_id:token\trating:float",
          [("u1", "a", 5), ("u1", "b", 5), ("u2", "c", 5)])
    rc, out = prepare(tmp_path, src, "--label-rule", "implicit")
    assert rc == 0
    line = tokenizer_notice(out)
    assert "\n" not in line and "running the tokenizer now on its 3 items" in line
    assert str(out / "semantic_ids.parquet") in line and f"genci-tokenize --data {out}" in line
