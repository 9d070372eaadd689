"""The tokenizer at catalogue scale: resumable chunked embedding with the real bundled
MiniLM (a run killed after chunk k continues and ends with the very same vectors and ids),
RQ-VAE trained on a seeded sample for a step budget (reproducible, blind to rows outside the
sample), batched assignment equal to the one-shot path, and `genci-tokenize` on that path."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipes.schema import SCHEMA_VERSION
from genci_dist.tokenizer.cli import duplicate_rows, main
from genci_dist.tokenizer.config import TokenizerConfig
from genci_dist.tokenizer.embed import embed_texts
from genci_dist.tokenizer.rqvae import assign_codes, sample_rows, train_rqvae
from genci_dist.tokenizer.semantic_ids import load_semantic_ids

WORDS = ["Night", "Star", "Love", "River", "Ghost", "King", "City", "Dream", "Fire", "Road"]


def _texts(n: int) -> list[str]:
    # lengths vary a lot so that length sorting reorders the texts inside a chunk
    return [" ".join(WORDS[(i * j) % 10] for j in range(1 + (i * 7) % 23)) + f" #{i}"
            for i in range(n)]


class Killed(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("empty_hf_home")))


def _tiny_cfg(**kw: object) -> TokenizerConfig:
    base = TokenizerConfig(levels=3, codebook_size=8, hidden_dims=(32,), latent_dim=8,
                           epochs=15, batch_size=16, dead_code_threshold=5, kmeans_iters=20,
                           progress_bar=False)
    return replace(base, **kw)


def test_killed_embedding_resumes_to_identical_vectors_and_ids(tmp_path: Path) -> None:
    texts = _texts(44)  # 6 chunks of 8 (the last one 4)
    ref = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "a", batch_size=4, chunk_size=8,
                      progress=False)
    one_pass = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "c", batch_size=4,
                           progress=False)
    # chunking keeps the rows in text order (vs a single encode call; batches differ → ulps)
    np.testing.assert_allclose(ref.vectors, one_pass.vectors, rtol=0, atol=2e-6)

    def kill_after_2(c: int, n_chunks: int) -> None:
        assert n_chunks == 6
        if c == 2:
            raise Killed

    with pytest.raises(Killed):
        embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "b", batch_size=4, chunk_size=8,
                    progress=False, on_chunk=kill_after_2)
    folder = next((tmp_path / "b" / "embeddings").iterdir())
    progress = json.loads(next(folder.glob("*.progress.json")).read_text())
    assert progress["done_chunks"] == 3 and progress["n_chunks"] == 6
    assert not list(folder.glob("*[0-9a-f].npy"))  # no finished array yet, only the partial
    seen: list[int] = []
    res = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "b", batch_size=4, chunk_size=8,
                      progress=False, on_chunk=lambda c, n: seen.append(c))
    assert seen == [3, 4, 5]  # continued after the last finished chunk
    assert not res.cached and np.array_equal(res.vectors, ref.vectors)
    assert json.loads(res.cache_file.with_suffix(".json").read_text())["resumed_at_chunk"] == 3
    assert not list(folder.glob("*.progress.json")) and not list(folder.glob("*.partial.npy"))
    # the same vectors give the same semantic ids
    cfg = _tiny_cfg(train_sample=30, train_steps=20)
    ids = [assign_codes(train_rqvae(np.asarray(v), cfg)[0], v, 16).codes
           for v in (ref.vectors, res.vectors)]
    assert np.array_equal(ids[0], ids[1])
    # finished: a cache hit (memory-mapped on request), no model loaded
    hit = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "b", chunk_size=8, mmap=True,
                      on_chunk=lambda c, n: pytest.fail("cache expected"))
    assert hit.cached and isinstance(hit.vectors, np.memmap)
    assert np.array_equal(hit.vectors, ref.vectors)


def test_changed_chunking_restarts_instead_of_mixing(tmp_path: Path) -> None:
    texts = _texts(20)

    def kill_first(c: int, n: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        embed_texts(texts, "all-MiniLM-L6-v2", tmp_path, batch_size=4, chunk_size=8,
                    progress=False, on_chunk=kill_first)
    seen: list[int] = []
    res = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path, batch_size=4, chunk_size=5,
                      progress=False, on_chunk=lambda c, n: seen.append(c))
    assert seen == [0, 1, 2, 3]
    ref = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path / "r", batch_size=4, chunk_size=5,
                      progress=False)
    assert np.array_equal(res.vectors, ref.vectors)


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 24))
    return (centres[rng.integers(0, 12, n)] + 0.3 * rng.normal(size=(n, 24))).astype(np.float32)


def test_sampled_training_reproducible_and_blind_outside_the_sample() -> None:
    x = _clustered(900, 0)
    cfg = _tiny_cfg(codebook_size=16, batch_size=64, train_sample=400, train_steps=60,
                    kmeans_sample=250)
    runs = [train_rqvae(x, replace(cfg, seed=s)) for s in (7, 7, 8)]
    codes = [assign_codes(m, x, 128).codes for m, _ in runs]
    assert np.array_equal(codes[0], codes[1]) and not np.array_equal(codes[0], codes[2])
    assert runs[0][1].steps == 60
    # rows outside the seeded sample never reach training: changing them changes nothing
    rows = sample_rows(900, 400, 7)
    assert len(rows) == 400 and np.array_equal(rows, np.unique(rows))
    y = x.copy()
    outside = np.setdiff1d(np.arange(900), rows)
    y[outside] = 100.0
    other, _ = train_rqvae(y, replace(cfg, seed=7))
    for a, b in zip(runs[0][0].state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the sampled model still learns: level-1 codes separate the 12 clusters
    assert len(np.unique(codes[0][:, 0])) >= 10


def test_batched_assignment_equals_one_shot_and_float64_sums() -> None:
    x = _clustered(300, 3)
    model, _ = train_rqvae(x, _tiny_cfg(train_steps=30))
    a = assign_codes(model, x, batch_size=64)
    codes, x_hat = model.tokenize(torch.from_numpy(x))
    assert np.array_equal(a.codes, codes.numpy())
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(a.sq_err, ((x_hat.double().numpy() - x64) ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(a.sq_dev, ((x64 - x64.mean(0)) ** 2).sum(), rtol=1e-9)
    assert a.n_values == x.size


def test_duplicate_rows_hand_case() -> None:
    x = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [3, 4.5]], dtype=np.float32)
    assert duplicate_rows(x, batch_size=4) == 3


def test_cli_scaled_path_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 48
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(np.arange(1, n + 1), pa.int32()),
                             "text": _texts(n)}), d / "items.parquet")
    sha = hashlib.sha256((d / "items.parquet").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "counts": {"items": n}, "files": {"items.parquet": {"sha256": sha}}}))
    args = ["--data", str(d), "--no-progress", "--threads", "1",
            "--tokenizer.codebook_size", "8", "--tokenizer.hidden_dims", "[32]",
            "--tokenizer.latent_dim", "8", "--tokenizer.embed_chunk_size", "16",
            "--tokenizer.train_sample", "32", "--tokenizer.train_steps", "25",
            "--tokenizer.kmeans_sample", "24", "--tokenizer.batch_size", "16",
            "--tokenizer.assign_batch_size", "10"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threads"] == 1 and report["train_steps"] == 25
    assert report["n_items"] == n and 0 < report["recon_rel"] < 1.5
    sids = load_semantic_ids(d, expected=json.loads((d / "manifest.json").read_text()))
    assert len({tuple(r) for r in sids.full_ids().tolist()}) == n
    first = sids.codes.copy()
    assert main(args) == 0  # cached embeddings, same seed → same ids
    assert json.loads(capsys.readouterr().out)["embed_cached"] is True
    assert np.array_equal(load_semantic_ids(d).codes, first)


def test_bf16_embedding_close_to_float32_and_cached_apart(tmp_path: Path) -> None:
    texts = _texts(24)
    f32 = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path, batch_size=8, progress=False)
    b16 = embed_texts(texts, "all-MiniLM-L6-v2", tmp_path, batch_size=8, chunk_size=10,
                      progress=False, dtype="bfloat16")
    assert b16.vectors.dtype == np.float32 and b16.cache_file != f32.cache_file
    assert b16.cache_file.parent.name.endswith("-bf16")
    a, b = f32.vectors.astype(np.float64), b16.vectors.astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999 and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="dtype must be one of"):
        embed_texts(texts, "all-MiniLM-L6-v2", tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="embed_dtype"):
        TokenizerConfig(embed_dtype="float16")  # type: ignore[arg-type]


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:          # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_take_rows_equals_fancy_index(tmp_path: Path, block: int) -> None:
    from genci_dist.tokenizer.embed import take_rows

    arr = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    for rows in (np.array([], dtype=np.int64), np.array([0, 6, 7, 63, 64, 299]),
                 sample_rows(300, 120, 3), np.arange(300)):
        np.testing.assert_array_equal(take_rows(mm, rows, block), arr[rows])
        np.testing.assert_array_equal(take_rows(arr, rows, block), arr[rows])


def test_sampling_a_memory_map_keeps_its_pages_out_of_the_rss(tmp_path: Path) -> None:
    """A 10 % sample of a 96 MB map: the fancy index maps (nearly) the whole file into the
    process; take_rows leaves at most a block's pages."""
    from genci_dist.tokenizer.embed import take_rows

    path = tmp_path / "emb.npy"
    n, d = 65536, 384
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    out[:] = 1.0
    out.flush()
    del out
    rows = sample_rows(n, n // 10, 1)
    mm = np.load(path, mmap_mode="r")
    got = take_rows(mm, rows, block=1024)
    assert got.shape == (rows.size, d) and float(got.sum()) == rows.size * d
    assert _mapped_kib(path) <= 2 * 1024 * d * 4 // 1024       # about one block at most
    del mm
    mm = np.load(path, mmap_mode="r")
    naive = np.asarray(mm[rows])
    assert naive.shape == got.shape
    assert _mapped_kib(path) > n * d * 4 // 1024 // 2           # the problem it avoids
