"""Offline embeddings with the bundled all-MiniLM-L6-v2, the on-disk cache, the config rules
and `genci-tokenize` end to end on a small prepared dataset written here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.schema import SCHEMA_VERSION
from genci_dist.config_loader import ConfigError
from genci_dist.tokenizer import embed
from genci_dist.tokenizer.cli import load_tokenizer_config, main
from genci_dist.tokenizer.cohorts import CohortIndex
from genci_dist.tokenizer.config import TokenizerConfig
from genci_dist.tokenizer.embed import EmbeddingError, embed_texts
from genci_dist.tokenizer.semantic_ids import SemanticIdError, load_semantic_ids

GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Animation", "War", "Western"]
WORDS = ["Night", "Star", "Love", "River", "Ghost", "King", "City", "Dream", "Fire", "Road"]


def _texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]} {i} ({1950 + i % 50}); "
            f"{'|'.join(rng.choice(GENRES, 2, replace=False))}" for i in range(n)]


def _dataset(root: Path, n: int = 60) -> Path:
    d = root / "ds"
    d.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array(np.arange(1, n + 1), pa.int32()),
                             "raw_id": [f"m{i}" for i in range(n)], "text": _texts(n)}),
                   d / "items.parquet")
    sha = hashlib.sha256((d / "items.parquet").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "counts": {"items": n}, "files": {"items.parquet": {"sha256": sha}}}))
    return d


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A dataset whose item texts were embedded once by the real model (HF_HUB_OFFLINE=1)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("empty_hf_home")))
    root = tmp_path_factory.mktemp("tok")
    d = _dataset(root)
    res = embed_texts(_texts(60), "all-MiniLM-L6-v2", root / "cache", progress=False)
    mp.undo()
    assert not res.cached
    return d, res.vectors


def test_bundled_model_offline_gives_meaningful_vectors(warm: tuple[Path, np.ndarray]) -> None:
    _, vecs = warm
    assert vecs.shape == (60, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)  # Normalize module
    # texts sharing the first title word are closer than texts sharing nothing in the title
    sim = vecs @ vecs.T
    same = np.mean([sim[i, j] for i in range(60) for j in range(60) if i != j and i % 10 == j % 10])
    other = np.mean([sim[i, j] for i in range(60) for j in range(60) if i % 10 != j % 10])
    assert same > other + 0.05


def test_cache_hit_returns_identical_array_without_loading(
        warm: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    d, vecs = warm

    def no_model(*a: object, **k: object) -> np.ndarray:
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(embed, "_encode", no_model)
    hit = embed_texts(_texts(60), "all-MiniLM-L6-v2", d.parent / "cache", progress=False)
    assert hit.cached and np.array_equal(hit.vectors, vecs)
    assert hit.cache_file.parent.parent.name == "embeddings"
    assert json.loads(hit.cache_file.with_suffix(".json").read_text())["n_texts"] == 60
    with pytest.raises(AssertionError, match="model loaded"):  # other texts → a miss
        embed_texts(_texts(61), "all-MiniLM-L6-v2", d.parent / "cache", progress=False)


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="not a local sentence-transformers model folder"):
        embed_texts(["a"], "sentence-t5-base", tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(EmbeddingError, match="neither modules.json nor config.json"):
        embed_texts(["a"], str(tmp_path / "m"), tmp_path)


def test_config_file_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "job.toml"
    p.write_text('[train]\nlr = 1.0\n[tokenizer]\nlevels = 2\nhidden_dims = [64, 32]\n')
    cfg = load_tokenizer_config(p, ["--tokenizer.levels", "4", "--tokenizer.beta=0.5"])
    assert (cfg.levels, cfg.hidden_dims, cfg.beta) == (4, (64, 32), 0.5)
    assert cfg.codebook_size == TokenizerConfig().codebook_size
    p.write_text("[tokenizer]\nlevel = 2\n")
    with pytest.raises(ConfigError, match="job.toml: tokenizer.level: unknown key.*'levels'"):
        load_tokenizer_config(p)
    with pytest.raises(ConfigError, match="command line: --tokenizer.epochs: expected an int"):
        load_tokenizer_config(None, ["--tokenizer.epochs", "many"])
    with pytest.raises(ConfigError, match="tokenizer: codebook_size must be >= 2"):
        load_tokenizer_config(None, ["--tokenizer.codebook_size", "1"])


SMALL = ["--tokenizer.codebook_size", "8", "--tokenizer.hidden_dims", "[32]",
         "--tokenizer.latent_dim", "8", "--tokenizer.epochs", "20", "--tokenizer.batch_size",
         "32", "--tokenizer.kmeans_iters", "10", "--no-progress"]


def test_cli_end_to_end_and_refusal(warm: tuple[Path, np.ndarray], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = warm
    monkeypatch.setattr(embed, "_encode", lambda *a, **k: pytest.fail("cache expected"))
    cfg_file = tmp_path / "t.toml"
    cfg_file.write_text("[tokenizer]\nseed = 3\ncohort_member_cap = 5\n")
    assert main(["--data", str(d), "--config", str(cfg_file), *SMALL]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = json.loads((d / "manifest.json").read_text())
    sids = load_semantic_ids(d, expected=manifest)
    assert sids.codes.shape == (60, 3) and sids.codebook_size == 8
    assert sids.metrics["collision_rate"] == report["collision_rate"]
    assert report["embed_cached"] is True and len(report["utilisation"]) == 3
    assert sids.config["seed"] == 3 and sids.model == "all-MiniLM-L6-v2"
    assert len({tuple(r) for r in sids.full_ids().tolist()}) == 60
    coh = CohortIndex.load(d, expected_hash=sids.content_hash)
    assert coh.member_cap == 5 and int(coh.code_sizes.sum()) == 3 * 60
    assert int(np.diff(coh.code_indptr.numpy()).max()) <= 5

    first = sids.codes.copy()  # same seed → identical IDs on a re-run
    assert main(["--data", str(d), "--config", str(cfg_file), *SMALL]) == 0
    assert np.array_equal(load_semantic_ids(d).codes, first)

    # items.parquet changed after tokenizing → refused when training starts
    manifest["files"]["items.parquet"]["sha256"] = "0" * 64
    with pytest.raises(SemanticIdError, match="items changed since tokenizing"):
        load_semantic_ids(d, expected=manifest)


def test_cli_bad_input_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path), "--no-progress"]) == 2
    assert "no manifest" in capsys.readouterr().err
    d = _dataset(tmp_path)
    table = pq.read_table(d / "items.parquet")
    texts = table.column("text").to_pylist()
    texts[4] = ""
    pq.write_table(table.set_column(2, "text", pa.array(texts)), d / "items.parquet")
    assert main(["--data", str(d), "--no-progress"]) == 2
    assert "row 4 (item 5): field 'text' is empty" in capsys.readouterr().err
    assert main(["--data", str(d), "--tokenizer.nope", "1"]) == 2
    assert "tokenizer.nope: unknown key" in capsys.readouterr().err


def test_quality_report_hand_case() -> None:
    from genci_dist.tokenizer.cli import quality_report

    codes = np.array([[0, 1], [0, 1], [2, 3], [2, 0]])
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    x_hat = x + np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    r = quality_report(codes, x, x_hat, codebook_size=4)
    assert r["utilisation"] == [0.5, 0.75]
    assert r["recon_mse"] == 2 / 8
    assert r["recon_rel"] == pytest.approx(2 / 7)  # SSE 2 / total sum of squares 6 + 1
    assert (r["collision_rate"], r["largest_collision_group"], r["n_collision"]) == (0.5, 2, 2)
    assert r["items_with_duplicate_embedding"] == 2
