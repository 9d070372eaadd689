"""Model benchmark (JSON lines): GenCI forward+backward samples/s at the ML-1M config (history
50) and the Instrument config (history 20), and constrained beam search alone against
transformers' `generate(..., prefix_allowed_tokens_fn=...)` on the same trie. One process,
random inputs of the right shapes (no dataset needed), timings after a warm-up step.

    python -m genci_dist.bench.beam --batch-size 1024 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from data_pipes.batch import Batch
from data_pipes.schema import HISTORY_FEATURE, FeatureSpec, TokenVocab
from genci_dist.config import load_config
from genci_dist.model.task import GenCITask, GenerationAssets
from genci_dist.tokenizer.cohorts import CohortIndex
from genci_dist.tokenizer.semantic_ids import collision_digits
from genci_dist.tokenizer.trie import SemanticIdTrie

FEATURES = [FeatureSpec("user_id", "user", False, 6041), FeatureSpec("gender", "user", False, 3),
            FeatureSpec("age", "user", False, 8), FeatureSpec("occupation", "user", False, 22),
            FeatureSpec("item_id", "item", False, 3669),
            FeatureSpec("release_year", "item", False, 82),
            FeatureSpec("genres", "item", True, 19)]


def random_assets(n_items: int, levels: int, k: int, seed: int) -> GenerationAssets:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(n_items, levels))
    coll = collision_digits(codes)
    full = np.concatenate([codes, coll[:, None]], 1)
    vocab = TokenVocab(levels, k, int(coll.max()) + 1)
    trie = SemanticIdTrie(full, np.arange(1, n_items + 1), [k] * levels + [vocab.n_collision])
    idx = CohortIndex.build(codes, k)
    indptr, members = idx.csr("code")
    return GenerationAssets(vocab, trie, indptr.numpy(), members.numpy(),
                            torch.zeros(0, dtype=torch.long), idx.num_cohorts("code"), "bench")


def random_batch(b: int, hist: int, assets: GenerationAssets, n_items: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, hist + 1, (b,), generator=g)
    items = torch.randint(1, n_items, (b,), generator=g)
    h = torch.randint(1, n_items, (b, hist), generator=g)
    h[torch.arange(hist)[None, :] >= lengths[:, None]] = 0
    table = torch.zeros(n_items + 1, assets.vocab.tokens_per_item, dtype=torch.long)
    rng = np.random.default_rng(seed)
    table[1:, :-1] = torch.from_numpy(rng.integers(0, assets.vocab.codebook_size,
                                                   (n_items, assets.vocab.levels)))
    table[1:] += torch.tensor(assets.vocab.offsets())   # row 0 stays the all-pad item
    values, lens = [], []
    for f in FEATURES:
        n = 2 if f.multi else 1
        values.append(torch.randint(1, f.cardinality, (b * n,), generator=g))
        lens.append(torch.full((b,), n))
    values[4] = items
    return Batch(
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in FEATURES], values=torch.cat(values), lengths=torch.cat(lens)),
        sequence_features=KeyedJaggedTensor.from_lengths_sync(
            keys=[HISTORY_FEATURE], values=h[h > 0], lengths=lengths),
        history=h, history_lengths=lengths, history_tokens=table[h].reshape(b, -1),
        target_tokens=table[items], labels=torch.randint(0, 2, (b,), generator=g).float(),
        user_ids=torch.zeros(b, dtype=torch.long), item_ids=items, row_ids=torch.arange(b))


def bench_train(config: str, hist: int, b: int, steps: int) -> dict[str, float]:
    cfg = load_config(config).model
    assets = random_assets(3668, 3, 256, 0)
    task = GenCITask(cfg, FEATURES, assets, torch.device("cpu"))
    batch = random_batch(b, hist, assets, 3668, 0)
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    loss, *_ = task(batch)
    loss.backward()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss, *_ = task(batch)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / steps
    return {"bench": "genci_fwd_bwd", "config": config, "history": hist, "batch": b,
            "step_s": round(dt, 3), "samples_per_s": round(b / dt, 1)}


@torch.no_grad()
def bench_beam(b: int, beam: int) -> list[dict[str, float]]:
    cfg = load_config("configs/ml1m.toml").model
    assets = random_assets(3668, 3, 256, 0)
    task = GenCITask(cfg, FEATURES, assets, torch.device("cpu")).eval()
    batch = random_batch(b, 50, assets, 3668, 0)
    gen = task.generator
    enc, mask = gen.encode(batch.history_tokens)
    gen.beam_search(enc, mask, assets.trie, beam, steps=3)
    t0 = time.perf_counter()
    ours, _ = gen.beam_search(enc, mask, assets.trie, beam, steps=3)
    t_ours = time.perf_counter() - t0
    offsets = assets.vocab.offsets()
    trie = assets.trie

    def allowed(_i: int, prefix: torch.Tensor) -> list[int]:
        node, d = 0, prefix.shape[0] - 1  # prefix starts with the decoder start token
        for t in range(d):
            node = int(trie.children[t][node, int(prefix[t + 1]) - offsets[t]])
        row = trie.children[d][node]
        return (torch.nonzero(row >= 0).flatten() + offsets[d]).tolist()

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    t0 = time.perf_counter()
    hf = gen.t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                         attention_mask=mask, max_new_tokens=3, num_beams=beam, do_sample=False,
                         prefix_allowed_tokens_fn=allowed, decoder_start_token_id=0,
                         # generate() sizes its default cache by the encoder's layer count (2),
                         # which breaks a 3-layer decoder; an empty dynamic cache grows freely
                         past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    t_hf = time.perf_counter() - t0
    same = (hf[:, 1:4] - torch.tensor(offsets[:3]) == ours[:, 0]).all(1).float().mean()
    return [{"bench": "beam_search_ours", "beam": beam, "batch": b,
             "samples_per_s": round(b / t_ours, 1)},
            {"bench": "beam_search_hf_generate_prefix_allowed", "beam": beam, "batch": b,
             "samples_per_s": round(b / t_hf, 1), "same_top1_share": round(float(same), 4)}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--beam-batch", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for config, hist in (("configs/ml1m.toml", 50), ("configs/instrument.toml", 20)):
        print(json.dumps(bench_train(config, hist, args.batch_size, args.steps)), flush=True)
    for beam in (1, 4):
        for row in bench_beam(args.beam_batch, beam):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
