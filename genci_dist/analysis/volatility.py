"""Interest volatility of users (paper App. A.1, Table 5) and per-group metrics; shared
constants and errors of the post-hoc analyses (Fig. 4 is in `genci_dist.analysis.intent_map`).

Interest volatility. The paper partitions users "based on interest volatility, calculated via
the average Jaccard distance of consecutive item genres" and says nothing more; the choices
left open are made here, explicitly:

- a user's sequence = ALL the user's interactions in train, valid and test (labels 0 and 1:
  the paper speaks of consecutive items, not clicks), ordered by (timestamp, item id) — the
  project's protocol order (SPEC §1.1), so ties break exactly as in the samples;
- an item's genre set = its `genres` list in items.parquet (`categories` on Amazon-shaped
  data), as a *set* (duplicates collapse; id 0 is padding and ignored);
- items with an EMPTY genre set carry no evidence of a shift: they are dropped from the
  sequence before pairs are formed (A, ∅, C gives the one pair (A, C)); a user with fewer
  than two annotated interactions has an undefined volatility (NaN) and falls in no group;
- the median is taken over the TEST users (users with at least one test sample) whose
  volatility is defined; "fast" = above the median, "slow" = at or below it.

Per-group AUC and LogLoss come from `genci_dist.runtime.metrics` on the per-sample predictions that
`python -m genci_dist.evaluate --predictions FILE` writes.

Fig. 4 (t-SNE of intents) lives in `genci_dist.analysis.intent_map`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import scipy.sparse as sp

from genci_dist.runtime import metrics

SPLITS = ("train", "valid", "test")
GROUPS = ("fast", "slow", "all")
SET_FEATURES = ("genres", "categories")  # MovieLens, Amazon: the "genre" of an item
PREDICTION_COLUMNS = ("user_id", "label", "prob")
INTENT_KINDS = ("lt", "st", "item")
INTENT_LABELS = {"lt": "long-term intent H_LTI", "st": "short-term intent H_STI",
                 "item": "target item e_v"}
INTENT_COLOURS = {"lt": "tab:blue", "st": "tab:orange", "item": "tab:green"}


class AnalysisError(ValueError):
    """Bad input to an analysis; the message names the file and what was expected."""


# ---------------------------------------------------------------------------------------------
# Interest volatility
# ---------------------------------------------------------------------------------------------


def item_genre_sets(dataset_dir: str | Path, feature: str | None = None) -> tuple[sp.csr_matrix,
                                                                                  str]:
    """items.parquet's multi-valued `feature` as a binary CSR matrix [max item id + 1, vocab]
    (row = dense item id, so samples index it directly), and the feature's name.

    A sparse matrix rather than Python sets: the Jaccard distances of all consecutive pairs are
    then a handful of vectorised sparse operations, also for catalogs with many categories."""
    path = Path(dataset_dir) / "items.parquet"
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: not found (is {dataset_dir} a prepared dataset?)") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise AnalysisError(f"{path}: unreadable Parquet ({e})") from None
    if feature is None:
        feature = next((f for f in SET_FEATURES if f in schema.names), None)
        if feature is None:
            raise AnalysisError(f"{path}: no genre-like list column (expected one of "
                                f"{list(SET_FEATURES)}; columns: {schema.names})")
    if "item_id" not in schema.names or feature not in schema.names:
        raise AnalysisError(f"{path}: expected columns item_id and {feature!r}; "
                            f"found {schema.names}")
    if not pa.types.is_list(schema.field(feature).type) and not pa.types.is_large_list(
            schema.field(feature).type):
        raise AnalysisError(f"{path}: column {feature!r} must be a list of ints, "
                            f"is {schema.field(feature).type}")
    t = pq.read_table(path, columns=["item_id", feature])
    ids = t.column("item_id").to_numpy().astype(np.int64)
    col = t.column(feature)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(ids, lengths)
    keep = values > 0  # 0 pads every sparse feature (SPEC §2)
    if ids.size and ids.min() < 0:
        raise AnalysisError(f"{path}: negative item_id {int(ids.min())}")
    shape = (int(ids.max(initial=0)) + 1, int(values.max(initial=0)) + 1)
    x = sp.coo_matrix((np.ones(int(keep.sum()), dtype=np.int32), (rows[keep], values[keep])),
                      shape=shape).tocsr()
    x.data[:] = 1  # tocsr() summed duplicates: back to set membership
    return x, feature


def read_interactions(dataset_dir: str | Path,
                      splits: Sequence[str] = SPLITS) -> dict[str, np.ndarray]:
    """user_id, item_id, timestamp, label and split code of every sample of `splits`, from the
    sequence shards (one row per user; column projection only: user features are not read)."""
    folder = Path(dataset_dir) / "sequences"
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: sequence folder not found (is {dataset_dir} a "
                            "prepared dataset?)")
    cols = ["user_id", "items", "timestamps", "labels", "splits"]
    try:
        t = pads.dataset(folder, format="parquet").to_table(columns=cols)
    except (pa.ArrowInvalid, OSError) as e:
        raise AnalysisError(f"{folder}: cannot read columns {cols} ({e})") from None
    lens = pc.list_value_length(t.column("items")).to_numpy(zero_copy_only=False)
    out = {"user_id": np.repeat(t.column("user_id").to_numpy().astype(np.int64), lens)}
    for name, col in (("item_id", "items"), ("timestamp", "timestamps"), ("label", "labels"),
                      ("split", "splits")):
        flat = pc.list_flatten(t.column(col)).to_numpy()
        if flat.size != out["user_id"].size:
            raise AnalysisError(f"{folder}: column {col!r} does not hold one value per "
                                "position of 'items'")
        out[name] = flat.astype(np.int8 if name == "split" else np.int64)
    keep = np.isin(out["split"], [SPLITS.index(s) for s in splits])
    return {k: v[keep] for k, v in out.items()}


def jaccard_volatility(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                       item_sets: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: the mean Jaccard distance 1 − |A∩B| / |A∪B| between the genre sets of
    consecutive interactions, ordered by (timestamp, item id).

    Returns (user ids sorted ascending, volatility float64 — NaN for a user with fewer than two
    items with a non-empty genre set, number of pairs). Items whose genre set is empty are
    dropped from the sequence first (module docstring)."""
    users, items, timestamps = (np.asarray(a, dtype=np.int64) for a in (users, items,
                                                                        timestamps))
    if items.size and (items.min() < 0 or items.max() >= item_sets.shape[0]):
        bad = items[(items < 0) | (items >= item_sets.shape[0])][0]
        raise AnalysisError(f"item id {int(bad)} outside the item table "
                            f"(0..{item_sets.shape[0] - 1})")
    uniq, uidx = np.unique(users, return_inverse=True)
    sizes = np.diff(item_sets.indptr).astype(np.float64)
    annotated = sizes[items] > 0
    order = np.lexsort((items, timestamps, uidx))
    order = order[annotated[order]]
    u, it = uidx[order], items[order]
    same = u[1:] == u[:-1]
    a, b = it[:-1][same], it[1:][same]
    inter = np.asarray(item_sets[a].multiply(item_sets[b]).sum(axis=1), dtype=np.float64).ravel()
    dist = 1.0 - inter / (sizes[a] + sizes[b] - inter)  # unions > 0: empty sets were dropped
    pu = u[1:][same]
    n_pairs = np.bincount(pu, minlength=uniq.size)
    total = np.bincount(pu, weights=dist, minlength=uniq.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        vol = np.where(n_pairs > 0, total / np.maximum(n_pairs, 1), np.nan)
    return uniq, vol, n_pairs


def median_split(volatility: np.ndarray, among: np.ndarray | None = None
                 ) -> tuple[float, np.ndarray, np.ndarray]:
    """(median, fast mask, slow mask): fast = volatility > median, slow = ≤ median; the median
    over the entries selected by `among` (default all) whose volatility is defined. Entries
    outside `among` or with NaN volatility are in neither mask."""
    vol = np.asarray(volatility, dtype=np.float64)
    sel = np.ones(vol.shape, bool) if among is None else np.asarray(among, bool)
    sel = sel & ~np.isnan(vol)
    if not sel.any():
        raise AnalysisError("no user with a defined volatility to split at the median")
    med = float(np.median(vol[sel]))
    return med, sel & (vol > med), sel & (vol <= med)


@dataclass
class VolatilityGroups:
    """Every user's volatility and the fast/slow split of the test users."""

    dataset_dir: str
    feature: str
    user_ids: np.ndarray      # int64, sorted
    volatility: np.ndarray    # float64 (NaN = undefined)
    n_pairs: np.ndarray
    median: float
    fast: np.ndarray          # bool per user
    slow: np.ndarray
    n_test_users: int

    def group_of(self, users: np.ndarray) -> np.ndarray:
        """'fast' / 'slow' / '' (no group: not a test user, undefined or unknown) per id."""
        users = np.asarray(users, dtype=np.int64)
        out = np.full(users.shape, "", dtype=object)
        if self.user_ids.size == 0:
            return out
        pos = np.searchsorted(self.user_ids, users).clip(max=self.user_ids.size - 1)
        known = self.user_ids[pos] == users
        out[known & self.fast[pos]] = "fast"
        out[known & self.slow[pos]] = "slow"
        return out

    def summary(self) -> dict[str, Any]:
        test = self.fast | self.slow
        return {"dataset": self.dataset_dir, "feature": self.feature,
                "sequence": "all interactions (train+valid+test, both labels) by (timestamp, "
                            "item id); items with empty genre sets dropped",
                "median_volatility": self.median,
                "mean_volatility": {"fast": _mean(self.volatility[self.fast]),
                                    "slow": _mean(self.volatility[self.slow]),
                                    "test_users": _mean(self.volatility[test])},
                "users": {"test": self.n_test_users, "fast": int(self.fast.sum()),
                          "slow": int(self.slow.sum()),
                          "test_undefined": self.n_test_users - int(test.sum())}}


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def interest_volatility(dataset_dir: str | Path, feature: str | None = None
                        ) -> VolatilityGroups:
    """Volatility of every user of a prepared dataset and the median split of its test users."""
    sets, feature = item_genre_sets(dataset_dir, feature)
    inter = read_interactions(dataset_dir)
    try:
        users, vol, n_pairs = jaccard_volatility(inter["user_id"], inter["item_id"],
                                                 inter["timestamp"], sets)
    except AnalysisError as e:
        raise AnalysisError(f"{dataset_dir}: {e}") from None
    is_test = np.isin(users, inter["user_id"][inter["split"] == SPLITS.index("test")])
    med, fast, slow = median_split(vol, is_test)
    return VolatilityGroups(str(dataset_dir), feature, users, vol, n_pairs, med, fast, slow,
                            int(is_test.sum()))


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """A predictions Parquet file of `genci_dist.evaluate --predictions` (or its per-rank
    `FILE.rank*` parts when evaluation ran on several ranks), checked: user_id, label ∈ {0,1},
    prob ∈ [0,1] finite."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.parent.glob(path.name + ".rank*"))
    if not files:
        raise AnalysisError(f"{path}: predictions file not found (write it with `python -m "
                            f"genci_dist.evaluate --checkpoint CKPT --split test "
                            f"--predictions {path}`)")
    parts = []
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowInvalid, OSError) as e:
            raise AnalysisError(f"{f}: not a readable Parquet predictions file ({e})") from None
        missing = [c for c in PREDICTION_COLUMNS if c not in names]
        if missing:
            raise AnalysisError(f"{f}: predictions file lacks column(s) {missing} (expected "
                                f"{list(PREDICTION_COLUMNS)}, found {names})")
        parts.append(pq.read_table(f, columns=list(PREDICTION_COLUMNS)))
    t = pa.concat_tables(parts)
    out = {"user_id": t.column("user_id").to_numpy().astype(np.int64),
           "label": t.column("label").to_numpy().astype(np.float64),
           "prob": t.column("prob").to_numpy().astype(np.float64)}
    bad = ~np.isin(out["label"], (0.0, 1.0))
    if bad.any():
        raise AnalysisError(f"{path}: row {int(np.argmax(bad))}: label "
                            f"{float(out['label'][bad][0])} not in {{0, 1}}")
    bad = ~(np.isfinite(out["prob"]) & (out["prob"] >= 0) & (out["prob"] <= 1))
    if bad.any():
        raise AnalysisError(f"{path}: row {int(np.argmax(bad))}: prob {float(out['prob'][bad][0])} "
                            "is not a probability in [0, 1]")
    return out


def prob_to_logit(prob: np.ndarray) -> np.ndarray:
    """Logits (float64) back from stored probabilities, clipped to the float32 resolution the
    file keeps (a stored 1.0 would otherwise be an infinite logit and a NaN LogLoss)."""
    from scipy.special import logit

    f32 = np.finfo(np.float32)
    # bounds in float64: `1.0 - f32.epsneg / 2` in float32 arithmetic rounds back to 1.0
    lo, hi = float(f32.tiny), 1.0 - float(f32.epsneg) / 2
    return logit(np.clip(np.asarray(prob, dtype=np.float64), lo, hi))


def group_metrics(preds: Mapping[str, np.ndarray], groups: VolatilityGroups
                  ) -> dict[str, dict[str, float]]:
    """AUC / LogLoss / GAUC / #users / #samples of one model's predictions per group
    ('fast', 'slow', and 'all' = every sample, for a check against evaluate's metrics)."""
    g = groups.group_of(preds["user_id"])
    logits = prob_to_logit(preds["prob"])
    out = {}
    for name in GROUPS:
        m = np.ones(g.shape, bool) if name == "all" else g == name
        y, users = preds["label"][m], preds["user_id"][m]
        out[name] = {"auc": metrics.auc(preds["prob"][m], y),
                     "logloss": metrics.logloss(logits[m], y) if m.any() else float("nan"),
                     "gauc": metrics.gauc(preds["prob"][m], y, users),
                     "users": int(np.unique(users).size), "samples": int(m.sum())}
    return out


def volatility_comparison(dataset_dir: str | Path, predictions: Mapping[str, str | Path],
                          feature: str | None = None, base: str | None = None
                          ) -> dict[str, Any]:
    """The Table-5 comparison as a JSON-able dict: the split's summary and, per model, its
    per-group metrics (and RelaImpr against `base` within each group)."""
    if base is not None and base not in predictions:
        raise AnalysisError(f"--base {base!r} is not one of the models {list(predictions)}")
    groups = interest_volatility(dataset_dir, feature)
    models = {name: {"predictions": str(p), "groups": group_metrics(read_predictions(p), groups)}
              for name, p in predictions.items()}
    if base is not None:
        for m in models.values():
            for gname, s in m["groups"].items():
                b = models[base]["groups"][gname]["auc"]
                s["rela_impr_pct"] = metrics.rela_impr(s["auc"], b)
    return {**groups.summary(), "base": base, "models": models}


def volatility_markdown(result: Mapping[str, Any]) -> str:
    """Markdown table: one row per model × group."""
    base = result.get("base")
    head = "| model | group | AUC | LogLoss | #users | #samples |"
    sep = "|---|---|---|---|---|---|"
    if base:
        head, sep = head + f" RelaImpr vs {base} |", sep + "---|"
    lines = [head, sep]
    for name, m in result["models"].items():
        for g in GROUPS:
            s = m["groups"][g]
            row = (f"| {name} | {g} | {s['auc']:.4f} | {s['logloss']:.4f} | {s['users']} | "
                   f"{s['samples']} |")
            if base:
                row += f" {s['rela_impr_pct']:+.2f}% |"
            lines.append(row)
    u = result["users"]
    lines.append("")
    lines.append(f"Volatility = mean Jaccard distance of consecutive {result['feature']} sets; "
                 f"median over test users {result['median_volatility']:.4f}; fast "
                 f"(> median) {u['fast']} users, slow (≤ median) {u['slow']} users, "
                 f"{u['test_undefined']} test users without a defined volatility.")
    return "\n".join(lines)


def plot_volatility(result: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars: AUC and LogLoss per model for the fast and slow groups."""
    plt = _pyplot()
    models = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(models) + 4), 3.6))
    x = np.arange(len(models))
    w = 0.38
    for ax, key in zip(axes, ("auc", "logloss"), strict=True):
        for j, (g, colour) in enumerate((("fast", "tab:red"), ("slow", "tab:blue"))):
            vals = [result["models"][m]["groups"][g][key] for m in models]
            bars = ax.bar(x + (j - 0.5) * w, vals, w, label=f"{g}-changing", color=colour)
            ax.bar_label(bars, fmt="%.4f", fontsize=7, rotation=90, padding=2)
        finite = [v for m in models for g in ("fast", "slow")
                  if math.isfinite(v := result["models"][m]["groups"][g][key])]
        if finite:  # differences are in the 3rd decimal: do not start the axis at 0
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + 1.5 * pad)
        ax.set_xticks(x, models)
        ax.set_title("AUC (higher is better)" if key == "auc" else "LogLoss (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Interest volatility (median {result['median_volatility']:.3f})", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_volatility(result: Mapping[str, Any], out_dir: str | Path,
                     stem: str = "volatility") -> list[Path]:
    """volatility.json / .md / .png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(result, indent=2))
    md.write_text(volatility_markdown(result) + "\n")
    return [js, md, plot_volatility(result, out / f"{stem}.png")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
