"""Fuzz tests (Hypothesis) of the raw-file readers: RecBole atomic files (the low-level reader and
the generic source), MovieLens `.dat` folders and Amazon reviews + meta jsonl. Arbitrary bytes
and structured-but-broken rows must end in a clean parse or the project's own DatasetError,
never another exception. Each test counts the examples it ran and how they ended, prints the
counts, and requires both endings to occur on the structured inputs (so the generators really
reach the parsers' success and error paths)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipes.protocol import LabelRule
from data_pipes.schema import DatasetError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(counts: Counter, fn, *args, **kwargs) -> None:  # noqa: ANN001, ANN003
    """Runs fn; DatasetError or success is counted, anything else fails the test."""
    try:
        fn(*args, **kwargs)
    except DatasetError:
        counts["DatasetError"] += 1
    else:
        counts["parsed"] += 1


def report(name: str, counts: Counter, need_both: bool) -> None:
    print(f"\n[fuzz] {name}: {sum(counts.values())} examples, {dict(counts)}")
    assert sum(counts.values()) >= 100, counts     # max_examples=200; a few may be duplicates
    if need_both:
        assert counts["parsed"] > 0 and counts["DatasetError"] > 0, counts


# ---- RecBole atomic --------------------------------------------------------------------------

TYPES = ["token", "token_seq", "float", "float_seq", "int", ""]
cell = st.one_of(st.sampled_from(["", "1", "2.5", "-3", "nan", "inf", "1e400", "x", "a b",
                                  "0", "5", "10", " 7 ", "1_0", "٣", "\r"]),
                 st.text(max_size=6))


@st.composite
def atomic_files(draw: st.DrawFn) -> bytes:
    """A header of mostly valid `name:type` fields (RecBole's inter names likely), rows of
    mostly the right width, CRLF or LF, sometimes a stray byte."""
    names = draw(st.lists(st.sampled_from(["user_id", "item_id", "rating", "label", "timestamp",
                                           "tag", "x", ""]), min_size=1, max_size=5))
    types = [draw(st.sampled_from(TYPES[:4] if draw(st.integers(0, 9)) else TYPES))
             for _ in names]
    header = "\t".join(f"{n}:{t}" if t else n for n, t in zip(names, types, strict=True))
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        width = len(names) + (draw(st.integers(-1, 1)) if draw(st.integers(0, 5)) == 0 else 0)
        rows.append("\t".join(draw(cell) for _ in range(max(width, 0))))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    data = (end.join([header, *rows]) + end).encode()
    if draw(st.integers(0, 5)) == 0:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=2)) + data[pos:]
    return data


def test_fuzz_read_atomic_arbitrary_bytes() -> None:
    from data_pipes.sources.recbole import read_atomic

    counts: Counter = Counter()

    @FUZZ
    @given(st.binary(max_size=300))
    def run(data: bytes) -> None:
        outcome(counts, read_atomic, data, "f.inter")

    run()
    report("read_atomic, arbitrary bytes", counts, need_both=False)


def test_fuzz_read_atomic_structured() -> None:
    from data_pipes.sources.recbole import read_atomic

    counts: Counter = Counter()

    @FUZZ
    @given(atomic_files())
    def run(data: bytes) -> None:
        outcome(counts, read_atomic, data, "f.inter")

    run()
    report("read_atomic, structured", counts, need_both=True)


def test_fuzz_generic_source() -> None:
    """The generic source end to end (folder → tables) on a fuzzed .inter/.item/.user."""
    from data_pipes.sources.recbole import load_generic

    counts: Counter = Counter()
    rules = st.sampled_from([None, LabelRule("implicit"), LabelRule("threshold", 4, 4),
                             LabelRule("drop-band", 3, 3), LabelRule("label")])
    inter_header = st.sampled_from([
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "user_id:token\titem_id:token\trating:float",
        "user_id:token\titem_id:token\tlabel:float",
        "user_id:token\titem_id:token\ttimestamp:token"])

    @st.composite
    def folder(draw: st.DrawFn) -> dict[str, bytes]:
        """Well-formed rows, broken ones (bad ids/values, wrong widths) in about half of the
        examples; optional .item (well-formed, or fuzzed) and .user (fuzzed)."""
        header = draw(inter_header)
        width = header.count("\t") + 1
        broken = draw(st.booleans())
        ids = st.sampled_from(["1", "2", "3", "a"] + (["", "-1", " "] if broken else []))
        vals = st.sampled_from(["0", "1", "4", "5"] + (["3", "", "x", "nan", "2.5", "1e30"]
                                                       if broken else []))
        rows = [header] + ["\t".join([draw(ids), draw(ids)] + [draw(vals)
                                                             for _ in range(width - 2)])
                           for _ in range(draw(st.integers(1 - broken, 8)))]
        if broken and draw(st.booleans()):
            rows.insert(draw(st.integers(1, len(rows))), "\t".join(draw(cell)
                                                                 for _ in range(width + 1)))
        files = {"d.inter": ("\n".join(rows) + "\n").encode()}
        if draw(st.booleans()):
            files["d.item"] = draw(atomic_files()) if draw(st.booleans()) else (
                "item_id:token\tg:token_seq\tp:float\n"
                + "".join(f"{i}\t{draw(cell)}\t{draw(st.sampled_from(['1', '2.5', '', '9']))}\n"
                          for i in ("1", "2", "a", "1" if broken else "3"))).encode()
        if broken and draw(st.booleans()):
            files["d.user"] = draw(atomic_files())
        return files

    @FUZZ
    @given(folder(), rules, st.integers(0, 3))
    def run(files: dict[str, bytes], rule: LabelRule | None, buckets: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            outcome(counts, load_generic, Path(tmp), None, rule, float_buckets=buckets,
                    warn=lambda msg: None)

    run()
    report("recbole generic source", counts, need_both=True)


# ---- MovieLens .dat ----------------------------------------------------------------------------

def test_fuzz_movielens_dat() -> None:
    """A well-formed 3-user/3-movie folder, in about half of the examples with one to three
    lines replaced or added by fuzzed ones (near-valid '::' rows or raw bytes), or a file
    missing."""
    from data_pipes.sources.movielens import load_dat_dir, to_tables

    counts: Counter = Counter()
    field = st.sampled_from(["1", "2", "10", "", "x", "5", "3", "978300760", "nan", "-1", "²",
                             "Toy Story (1995)", "Drama|Comedy", "F", "M", "٣", "1e3", "inf",
                             "--5", "9" * 25])
    good = {"ratings": [f"{u}::{m}::{(u * m) % 5 + 1}::{978300000 + 10 * m}"
                        for u in (1, 2, 3) for m in (1, 2, 3)],
            "movies": ["1::Toy Story (1995)::Animation|Comedy", "2::Heat (1995)::Action",
                       "3::Café (2000)::"],
            "users": [f"{u}::{'FM'[u % 2]}::{20 + u}::{u}::1234{u}" for u in (1, 2, 3)]}
    fuzzed_line = st.one_of(st.lists(field, min_size=2, max_size=6).map("::".join),
                            st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
    # (file, line, how: 0 replace the line, 1 insert a line, 2 replace field `f` of the line)
    edit = st.tuples(st.sampled_from(["ratings", "ratings", "movies", "users"]),
                     st.integers(0, 9), st.integers(0, 2), st.integers(0, 4), fuzzed_line,
                     field)

    @FUZZ
    @given(st.one_of(st.just([]), st.lists(edit, min_size=1, max_size=3)),
           st.sampled_from([None, None, None, "users", "ratings"]))
    def run(edits: list[tuple[str, int, int, int, str, str]], missing: str | None) -> None:
        files = {k: list(v) for k, v in good.items()}
        for name, k, how, f, line, value in edits:
            lines = files[name]
            if how == 2 and k < len(lines):
                parts = lines[k].split("::")
                parts[f % len(parts)] = value
                lines[k] = "::".join(parts)
            elif how == 0 and k < len(lines):
                lines[k] = line
            else:
                lines.insert(k, line)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for name, lines in files.items():
                if name != missing:
                    (d / f"{name}.dat").write_bytes("\n".join(lines).encode("latin-1",
                                                                             "replace"))
            outcome(counts, lambda: to_tables(load_dat_dir(d)))

    run()
    report("movielens .dat", counts, need_both=True)


# ---- Amazon jsonl ----------------------------------------------------------------------------

json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 14),
                                    st.floats(allow_nan=True, allow_infinity=True),
                                    st.sampled_from(["A", "B", "u1", "", "5", "x"])),
                          lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.sampled_from(["a", "b"]), kids, max_size=2),
                          max_leaves=5)


@st.composite
def review(draw: st.DrawFn) -> str:
    obj = {"user_id": draw(st.sampled_from(["u1", "u2", "u3", "u4", "u5", ""])
                           | json_value),
           "parent_asin": draw(st.sampled_from(["A", "B", "C", "D", "E"]) | json_value),
           "rating": draw(st.sampled_from([1, 2, 3, 4, 5, 4.0]) | json_value),
           "timestamp": draw(st.sampled_from([1_600_000_000_000, 1_600_000_100_000, 10])
                             | st.sampled_from([float("inf"), 1e30, 10 ** 30, -1e300, True,
                                                "1600000000000", 1.5e12])
                             | json_value)}
    for key in draw(st.lists(st.sampled_from(list(obj)), max_size=2)):
        obj.pop(key, None)
    return json.dumps(obj)


@st.composite
def meta(draw: st.DrawFn) -> str:
    obj = {"parent_asin": draw(st.sampled_from(["A", "B", "C", "D", "E"]) | json_value),
           "title": draw(json_value), "categories": draw(json_value),
           "description": draw(json_value), "store": draw(json_value)}
    return json.dumps(obj)


def test_fuzz_amazon_jsonl() -> None:
    from data_pipes.sources.amazon import load_amazon

    counts: Counter = Counter()
    # a 5x5 full grid of good reviews passes the 5-core filter; fuzzed lines are mixed in
    good = [json.dumps({"user_id": f"u{u}", "parent_asin": a, "rating": (u + k) % 5 + 1,
                        "timestamp": 1_600_000_000_000 + 1000 * k})
            for u in range(1, 6) for k, a in enumerate("ABCDE")]
    junk = st.one_of(review(), review(), st.binary(max_size=40).map(
        lambda b: b.decode("latin-1")), st.sampled_from(["{", "[]", "null", "{\"a\": 1}", "", "[" * 5000 + "]" * 5000]))

    @FUZZ
    @given(st.lists(junk, max_size=4), st.lists(st.integers(0, 25), max_size=4),
           st.lists(st.one_of(meta(), junk), max_size=5), st.booleans())
    def run(extra: list[str], at: list[int], metas: list[str], raw_bytes: bool) -> None:
        lines = list(good) if len(extra) % 2 == 0 else good[:3]
        for k, line in zip(at, extra, strict=False):
            lines.insert(k, line)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "Cat.jsonl"
            data = "\n".join(lines).encode("utf-8", "surrogatepass")
            if raw_bytes and extra:
                data += b"\n\xff\xfe" + extra[0].encode("latin-1", "replace")
            src.write_bytes(data)
            (Path(tmp) / "meta_Cat.jsonl").write_text("\n".join(metas), encoding="utf-8")
            outcome(counts, load_amazon, src)

    run()
    report("amazon jsonl", counts, need_both=True)


def test_found_by_fuzzing_now_clean_errors(tmp_path: Path) -> None:
    """Inputs the fuzzers (or their review) found raising foreign exceptions, fixed to
    DatasetError: a .dat timestamp beyond int64 (OverflowError), an Amazon timestamp of
    Infinity / 1e30 (OverflowError), JSON nested 5,000 deep (RecursionError), an atomic float
    Python accepts but Arrow refuses ("1_0": a bare ArrowInvalid), a non-ASCII digit id ("²"
    sorted as an integer: ValueError)."""
    import pytest

    from data_pipes.sources.amazon import load_amazon
    from data_pipes.sources.movielens import load_dat_dir, to_tables
    from data_pipes.sources.recbole import read_atomic

    d = tmp_path / "dat"
    d.mkdir()
    (d / "movies.dat").write_text("1::A (1995)::Drama\n")
    (d / "users.dat").write_text("1::F::1::1::1\n")
    (d / "ratings.dat").write_text("1::1::5::" + "9" * 25 + "\n")
    with pytest.raises(DatasetError, match=r"ratings\.dat: line 1: rating '5' / timestamp"):
        load_dat_dir(d)
    (d / "ratings.dat").write_text("1::1::5::10\n²::1::4::11\n", encoding="latin-1")
    (d / "users.dat").write_text("1::F::1::1::1\n²::M::2::2::2\n", encoding="latin-1")
    inter, user, _ = to_tables(load_dat_dir(d))
    assert user.raw_ids.tolist() == ["1", "²"]          # sorted as strings, not as integers
    grid = [{"user_id": f"u{u}", "parent_asin": a, "rating": 5, "timestamp": 1000}
            for u in range(5) for a in "ABCDE"]
    (tmp_path / "meta_C.jsonl").write_text("")
    for ts, msg in ((float("inf"), "is not a number"), (1e30, "out of range")):
        lines = [json.dumps(dict(grid[0], timestamp=ts))] + [json.dumps(g) for g in grid[1:]]
        (tmp_path / "C.jsonl").write_text("\n".join(lines))
        with pytest.raises(DatasetError, match=rf"C\.jsonl: line 1: .*{msg}"):
            load_amazon(tmp_path / "C.jsonl")
    (tmp_path / "C.jsonl").write_text("\n".join(json.dumps(g) for g in grid))
    (tmp_path / "meta_C.jsonl").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(DatasetError, match=r"meta_C\.jsonl: line 1: JSON nested too deeply"):
        load_amazon(tmp_path / "C.jsonl")
    with pytest.raises(DatasetError, match=r"f\.inter: line 3: field 'r' = '1_0' is not a num"):
        read_atomic(b"a:token\tr:float\nx\t1\ny\t1_0\n", "f.inter")
