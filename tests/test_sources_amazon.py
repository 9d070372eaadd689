"""Amazon Reviews 2023 source on fixture files written here: 5-core, labels, leave-one-out,
histories (truncation at 20), item features/text, the CLI end to end and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipes.prepare import main
from data_pipes.protocol import apply_label_rule, build_samples
from data_pipes.schema import DatasetError
from data_pipes.sequences import read_split_samples
from data_pipes.sources.amazon import DESCRIPTION_CHARS, load_amazon

N_ITEMS = 32                      # items B00..B31
SEQ = [j for j in range(N_ITEMS) if j not in (5, 17)]  # items left after dropping rating 3
USERS = ("U1", "U2", "U3", "U4", "U5")
LONG_DESC = ["x" * 250, "y" * 150]


def asin(j: int) -> str:
    return f"B{j:02d}"


def dense(j: int) -> int:
    """Dense id of item B<j>: rank among the surviving raw ids, sorted."""
    return SEQ.index(j) + 1


def rating_of(j: int) -> int:
    """Items 5 and 17 are rated 3 by everyone (they vanish); j % 3 == 2 → 2 (negative);
    else 4/5 (positive)."""
    if j in (5, 17):
        return 3
    return 2 if j % 3 == 2 else 4 + j % 2


def seconds(user: int, j: int) -> int:
    if user == 2 and j == 11:     # U2 rates B10 and B11 in the same second: ties → item id
        j = 10
    return 1_700_000_000 + 100 * j + user


def reviews() -> list[dict[str, Any]]:
    rows = []
    for k, u in enumerate(USERS, 1):
        order = list(range(N_ITEMS))
        if k == 2:
            order[10], order[11] = 11, 10          # file lists B11 before B10
        for j in order:
            rows.append({"rating": float(rating_of(j)), "title": "ok", "text": "fine",
                         "parent_asin": asin(j), "asin": asin(j), "user_id": u,
                         "timestamp": seconds(k, j) * 1000 + 123, "verified_purchase": True})
    # BX has 4 reviewers (U1..U3, U7) → dropped; then U7 falls to 4 rows → dropped (cascade);
    # U6 has 3 rows → dropped in the first round.
    for u in ("U1", "U2", "U3", "U7"):
        rows.append({"rating": 5.0, "parent_asin": "BX", "user_id": u,
                     "timestamp": 1_700_005_000_000})
    for j in range(4):
        rows.append({"rating": 5.0, "parent_asin": asin(j), "user_id": "U7",
                     "timestamp": 1_600_000_000_000 + j})
    for j in range(3):
        rows.append({"rating": 1.0, "parent_asin": asin(j), "user_id": "U6",
                     "timestamp": 1_600_000_000_000 + j})
    return rows


def meta() -> list[dict[str, Any]]:
    out = []
    for j in range(N_ITEMS - 1):   # B31 has no meta line
        m: dict[str, Any] = {
            "main_category": "Musical Instruments", "title": f"Guitar {j}",
            "categories": ["Musical Instruments", "Guitars" if j % 2 == 0 else "Drums"],
            "description": LONG_DESC if j == 0 else [],
            "features": ["solid"], "parent_asin": asin(j)}
        m["store"] = "Fender" if j < 16 else ("Yamaha" if j < 30 else None)
        out.append(m)
    out.append({"parent_asin": "BX", "title": "Gone", "categories": ["Pianos"], "store": "Z"})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]], lines: list[str] | None = None) -> Path:
    text = "\n".join([json.dumps(r) for r in rows] + (lines or [])) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def fixture(tmp: Path, gz_reviews: bool = True) -> Path:
    src = write_jsonl(tmp / ("Musical_Instruments.jsonl" + (".gz" if gz_reviews else "")),
                      reviews())
    write_jsonl(tmp / ("meta_Musical_Instruments.jsonl" + ("" if gz_reviews else ".gz")), meta())
    return src


def _hist(s: Any, i: int) -> list[int]:
    return s.hist_values[s.hist_offsets[i]:s.hist_offsets[i + 1]].tolist()


@pytest.mark.parametrize("gz_reviews", [True, False])
def test_five_core_tables_and_features(tmp_path: Path, gz_reviews: bool) -> None:
    """The iterative 5-core (with its cascade) keeps U1..U5 × B00..B31; items only rated 3
    leave the item table; categories/store/text come from the meta file."""
    (inter, user, item), info = load_amazon(fixture(tmp_path, gz_reviews))
    assert info["raw_interactions"] == 5 * 32 + 4 + 4 + 3
    assert info["after_5core"] == 160
    assert info["items_without_meta"] == 1
    assert user.raw_ids.tolist() == list(USERS)
    assert item.raw_ids.tolist() == [asin(j) for j in SEQ]
    assert len(inter.user) == 5 * 30                       # B05 and B17 rows (rating 3) gone
    assert set(inter.rating.tolist()) == {2.0, 4.0, 5.0}
    # categories: Drums=1, Guitars=2, Musical Instruments=3 (sorted); B31 (no meta) empty
    cats = item.multi["categories"].to_pylist()
    assert cats[0] == [] and cats[1] == [3, 2] and cats[2] == [3, 1] and cats[30] == []
    store = item.single["store"].tolist()                   # Fender=1, Yamaha=2, 0 = none
    assert store[0] == 0 and store[1:16] == [1] * 15 and store[16:29] == [2] * 13
    assert store[29:] == [0, 0]                             # B30 store null, B31 no meta
    assert item.text[0] == "Guitar 0; Musical Instruments Guitars; " + \
        ("x" * 250 + " " + "y" * 150)[:DESCRIPTION_CHARS]
    assert item.text[dense(7) - 1] == "Guitar 7; Musical Instruments Drums; "
    assert item.text[-1] == "; ; "


def test_labels_leave_one_out_and_histories(tmp_path: Path) -> None:
    """Leave-one-out (last → test, second last → valid), ties by item id, histories are the
    earlier positives truncated to the most recent 20, oldest first."""
    (inter, _, _), _ = load_amazon(fixture(tmp_path))
    kept, label = apply_label_rule(inter)
    s = build_samples(kept, label, split="leave_one_out", max_history=20)
    assert len(s) == 150 and int(s.label.sum()) == 5 * 22
    for k in range(1, 6):
        rows = np.flatnonzero(s.user == k)
        assert s.item[rows].tolist() == list(range(1, 31))  # U2's tie: B10 before B11
        assert s.label[rows].tolist() == [int(j % 3 != 2) for j in SEQ]
        assert s.split[rows].tolist() == [0] * 28 + [1, 2]
        # test sample B31: 21 earlier positives (j ≤ 30, j % 3 != 2) → B00 falls off
        want = [dense(j) for j in range(31) if j % 3 != 2][-20:]
        assert _hist(s, rows[-1]) == want and want[0] == dense(1) and len(want) == 20
        # valid sample B30: 20 earlier positives → untruncated, starts at B00
        assert _hist(s, rows[-2]) == [dense(j) for j in range(30) if j % 3 != 2]
        # B06 (after B00, B01, B03, B04 positive; B02 negative; B05 gone): ids 1, 2, 4, 5
        assert _hist(s, rows[5]) == [1, 2, 4, 5] and s.item[rows[5]] == dense(6) == 6
    u2 = np.flatnonzero(s.user == 2)
    assert s.timestamp[u2][9] == s.timestamp[u2][10] and s.item[u2][9] == dense(10)


def test_cli_end_to_end_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """genci-prepare --dataset amazon writes the layout; the manifest counts, cardinalities,
    hashes and the item features the samples read are right."""
    src = fixture(tmp_path)
    out = tmp_path / "instr"
    assert main(["--dataset", "amazon", "--source", str(src), "--out", str(out),
                 "--no-progress", "--row-group-size", "16"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["samples"], rep["users"], rep["items"]) == (150, 5, 30)
    assert rep["splits"]["test"]["rows"] == 5 and rep["splits"]["valid"]["rows"] == 5
    assert rep["splits"]["test"]["positives"] == 5          # B31: 31 % 3 == 1 → positive
    assert rep["splits"]["valid"]["positives"] == 5         # B30: positive
    assert rep["splits"]["train"]["positives"] == 100
    man = json.loads((out / "manifest.json").read_text())
    assert man["protocol"]["split"] == "leave_one_out" and man["protocol"]["max_history"] == 20
    assert [(f["name"], f["side"], f["multi"], f["cardinality"]) for f in man["features"]] == [
        ("user_id", "user", False, 6), ("item_id", "item", False, 31),
        ("store", "item", False, 3), ("categories", "item", True, 4)]
    for rel, meta_ in man["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == meta_["sha256"]
    train = read_split_samples(out, "train").to_pylist()
    # groups of whole users, closed at >= 16 interactions: one user (30) per group
    assert pq.ParquetFile(out / "sequences" / "part-00000.parquet").metadata.num_row_groups == 5
    items = {r["item_id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    for r in train:
        assert r["store"] == items[r["item_id"]]["store"]
        assert r["categories"] == items[r["item_id"]]["categories"]
        assert r["label"] == int(SEQ[r["item_id"] - 1] % 3 != 2)
    users = pq.read_table(out / "sequences", columns=["user_id"]).column(0).to_pylist()
    assert sorted(users) == [1, 2, 3, 4, 5] and users != [1, 2, 3, 4, 5]  # seeded user order


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    """Bad JSON, a missing rating, a non-numeric rating, no meta file and an empty 5-core each
    give a DatasetError naming the file and line; the CLI exits 2 and writes nothing."""
    good = [json.dumps(r) for r in reviews()[:3]]
    src = tmp_path / "Cat.jsonl"
    write_jsonl(tmp_path / "meta_Cat.jsonl", meta())
    src.write_text("\n".join(good + ['{"user_id": "U1", "parent_asin": ']) + "\n")
    with pytest.raises(DatasetError, match=r"Cat\.jsonl: line 4: not valid JSON"):
        load_amazon(src)
    src.write_text("\n".join(good + ['{"user_id": "U1", "parent_asin": "B01", '
                                     '"timestamp": 5}']) + "\n")
    with pytest.raises(DatasetError, match=r"Cat\.jsonl: line 4: missing field\(s\) \['rating'\]"):
        load_amazon(src)
    src.write_text("\n".join(good[:1] + ['{"user_id": "U1", "parent_asin": "B01", '
                                         '"rating": "five", "timestamp": 5}']) + "\n")
    with pytest.raises(DatasetError, match=r"line 2: rating 'five'.*not a number"):
        load_amazon(src)
    src.write_text("\n".join(good) + "\n")                  # 3 reviews: nothing is 5-core
    with pytest.raises(DatasetError, match="no interactions left after the 5-core"):
        load_amazon(src)
    lone = write_jsonl(tmp_path / "Other.jsonl", reviews())
    with pytest.raises(DatasetError, match=r"Other\.jsonl: no meta file meta_Other"):
        load_amazon(lone)
    out = tmp_path / "out"
    assert main(["--dataset", "amazon", "--source", str(src), "--out", str(out),
                 "--no-progress"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".out*"))
