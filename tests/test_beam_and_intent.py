"""Exact checks of the generative and intent parts: trie vs brute force, constrained beam
search vs exhaustive scoring, KV-cached decoding vs a full re-run, H_LTI positions, the
cohort → history → target attentions vs a float64 reference, member means vs brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipes.schema import TokenVocab
from genci_dist.model.config import ModelConfig
from genci_dist.model.generator import Generator
from genci_dist.model.intent import CohortIntent
from genci_dist.model.sparse import IntentEmbeddings, cap_members
from genci_dist.tokenizer.semantic_ids import collision_digits
from genci_dist.tokenizer.trie import SemanticIdTrie

K, N = 4, 3


def _trie(seed: int, n_items: int = 20) -> tuple[SemanticIdTrie, np.ndarray, TokenVocab]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n_items, N))
    coll = collision_digits(codes)
    full = np.concatenate([codes, coll[:, None]], 1)
    vocab = TokenVocab(N, K, int(coll.max()) + 1)
    return SemanticIdTrie(full, np.arange(1, n_items + 1), [K] * N + [vocab.n_collision]), \
        full, vocab


def _generator(vocab: TokenVocab, seed: int) -> Generator:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=2,
                      num_heads=2, d_kv=8, attn_heads=2)
    return Generator(cfg, vocab).eval()


def test_trie_answers_equal_brute_force() -> None:
    trie, full, _ = _trie(0)
    for depth in range(N + 1):
        prefixes = {tuple(r[:depth]) for r in full}
        for p in prefixes:
            node = torch.zeros(1, dtype=torch.long)
            for d, c in enumerate(p):
                node = trie.child(d, node, torch.tensor([c]))
            allowed = trie.allowed(depth, node)[0].nonzero().flatten().tolist()
            assert allowed == sorted({int(r[depth]) for r in full if tuple(r[:depth]) == p})
    assert trie.contains(torch.from_numpy(full)).all()
    assert not trie.contains(torch.tensor([[K - 1, K - 1, K - 1, 7]])).any()


def _exhaustive(gen: Generator, enc: torch.Tensor, mask: torch.Tensor, trie: SemanticIdTrie,
                full: np.ndarray, steps: int) -> list[list[tuple[float, tuple[int, ...]]]]:
    """Score every valid prefix of length `steps` by full teacher-forced decoding."""
    paths = sorted({tuple(int(x) for x in r[:steps]) for r in full})
    out = []
    for b in range(enc.shape[0]):
        scored = []
        for path in paths:
            toks = torch.tensor([[c + o for c, o in zip(path, gen.offsets, strict=False)]])
            logits = gen.ntp_logits(enc[b:b + 1], mask[b:b + 1], toks)[0].double()
            node, score = torch.zeros(1, dtype=torch.long), 0.0
            for d, c in enumerate(path):
                allowed = trie.allowed(d, node)[0]
                row = logits[d, gen.offsets[d]:gen.offsets[d] + K]
                row = row.masked_fill(~allowed, float("-inf"))
                score += float(torch.log_softmax(row, -1)[c])
                node = trie.child(d, node, torch.tensor([c]))
            scored.append((score, path))
        out.append(sorted(scored, reverse=True))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_equals_exhaustive_top_b_and_greedy(seed: int) -> None:
    trie, full, vocab = _trie(seed)
    gen = _generator(vocab, seed)
    hist = torch.randint(1, vocab.size, (3, 8))
    hist[1, 5:] = 0
    with torch.no_grad():
        enc, mask = gen.encode(hist)
        widest = max(trie.nodes_per_depth())
        codes, scores = gen.beam_search(enc, mask, trie, beam=widest * K, steps=N)
        ref = _exhaustive(gen, enc, mask, trie, full, N)
        for b in range(3):
            top = [p for _, p in ref[b][:5]]
            assert [tuple(c) for c in codes[b, :5].tolist()] == top
            assert scores[b, 0].item() == pytest.approx(ref[b][0][0], abs=1e-4)
        greedy, _ = gen.beam_search(enc, mask, trie, beam=1, steps=N)
        for b in range(3):  # beam 1 = argmax step by step among allowed codes
            node, path = torch.zeros(1, dtype=torch.long), []
            for d in range(N):
                toks = torch.tensor([[c + o for c, o in zip(path, gen.offsets, strict=False)]
                                     + [0]])[:, :d + 1]
                logits = gen.ntp_logits(enc[b:b + 1], mask[b:b + 1], toks)[0, d]
                row = logits[gen.offsets[d]:gen.offsets[d] + K].masked_fill(
                    ~trie.allowed(d, node)[0], float("-inf"))
                path.append(int(row.argmax()))
                node = trie.child(d, node, torch.tensor([path[-1]]))
            assert greedy[b, 0].tolist() == path


def test_beam_never_emits_invalid_ids_and_cache_matches_full_rerun() -> None:
    for seed in range(4):
        trie, full, vocab = _trie(seed, n_items=9)
        gen = _generator(vocab, 10 + seed)
        with torch.no_grad():
            enc, mask = gen.encode(torch.randint(1, vocab.size, (6, 5)))
            for beam in (1, 3, 7):
                codes, scores = gen.beam_search(enc, mask, trie, beam=beam)
                ok = torch.isfinite(scores)
                assert ok[:, 0].all()
                assert trie.contains(codes[ok]).all()
            # cached per-step logits along a path equal one teacher-forced pass
            toks = torch.from_numpy(full[:6] + np.array(vocab.offsets()))
            full_logits = gen.ntp_logits(enc, mask, toks)
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache
            from transformers.modeling_outputs import BaseModelOutput
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            step = torch.zeros(6, 1, dtype=torch.long)
            for t in range(toks.shape[1]):
                out = gen.t5(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                             attention_mask=mask, decoder_input_ids=step,
                             past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                assert torch.allclose(out.logits[:, -1], full_logits[:, t], atol=1e-5)
                step = toks[:, t:t + 1]


def test_h_lti_is_last_valid_position_and_empty_history_is_defined() -> None:
    _, _, vocab = _trie(0)
    gen = _generator(vocab, 0)
    enc = torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    h = gen.last_valid(enc, mask)
    assert torch.equal(h, torch.stack([enc[0, 2], enc[1, 5], enc[2, 0]]))
    with torch.no_grad():
        e1, m1 = gen.encode(torch.zeros(2, 8, dtype=torch.long))   # two empty histories
        e2, m2 = gen.encode(torch.zeros(1, 0, dtype=torch.long))
    assert m1[:, 0].tolist() == [1, 1] and m1[:, 1:].sum() == 0  # one visible pad token
    assert torch.allclose(gen.last_valid(e1, m1)[0], gen.last_valid(e2, m2)[0], atol=1e-6)
    assert torch.isfinite(e1).all()


def _mha_ref(m: torch.nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    """float64 einsum multi-head attention from the module's own weights."""
    d, h = m.embed_dim, m.num_heads
    w, bias = m.in_proj_weight.double(), m.in_proj_bias.double()
    qp = q.double() @ w[:d].T + bias[:d]
    kp = kv.double() @ w[d:2 * d].T + bias[d:2 * d]
    vp = kv.double() @ w[2 * d:].T + bias[2 * d:]
    split = lambda x: x.view(x.shape[0], x.shape[1], h, d // h)  # noqa: E731
    att = torch.einsum("bqhd,bkhd->bhqk", split(qp), split(kp)) / (d // h) ** 0.5
    att = att.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    ctx = torch.einsum("bhqk,bkhd->bqhd", att, split(vp)).reshape(q.shape[0], q.shape[1], d)
    return ctx @ m.out_proj.weight.double().T + m.out_proj.bias.double()


@pytest.mark.parametrize("share", [False, True])
def test_cohort_and_target_attention_match_float64_reference(share: bool) -> None:
    torch.manual_seed(0)
    mod = CohortIntent(d_model=8, heads=2, dropout=0.0, share=share).eval()
    assert (mod.refine is mod.target) == share
    e_c, h_enc, e_v = torch.randn(3, 3, 8), torch.randn(3, 5, 8), torch.randn(3, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = mod(e_c, h_enc, mask, e_v)
    e_r = _mha_ref(mod.refine, e_c, h_enc, mask.bool())
    ref = _mha_ref(mod.target, e_v[:, None], e_r, torch.ones(3, 3, dtype=torch.bool))[:, 0]
    assert torch.allclose(out.double(), ref, atol=1e-5)
    noisy = h_enc.clone()
    noisy[mask == 0] = 1e3  # padding must have no influence
    assert torch.allclose(mod(e_c, noisy, mask, e_v), out, atol=1e-5)


def test_member_mean_equals_brute_force_csr_mean() -> None:
    torch.manual_seed(0)
    indptr = np.array([0, 3, 3, 4, 9])          # cohort 1 empty
    members = np.array([1, 2, 5, 7, 2, 3, 4, 5, 6])
    ptr, mem = cap_members(indptr, members, 0)
    emb = IntentEmbeddings(n_items=8, d_model=4, levels=2, n_cohorts=4, use_table=False,
                           device=torch.device("cpu"))
    table = emb.intent.embedding_bags["t_intent_item"].weight.detach()
    cohorts = torch.tensor([[0, 3], [1, 2], [-1, 0]])
    target = torch.tensor([3, 4, 5])
    e_v, e_c = emb(target, cohorts, ptr, mem)
    assert torch.allclose(e_v, table[target])
    for b, n in itertools.product(range(3), range(2)):
        c = int(cohorts[b, n])
        ids = members[indptr[c]:indptr[c + 1]] if c >= 0 else []
        ref = table[list(ids)].mean(0) if len(ids) else torch.zeros(4)
        assert torch.allclose(e_c[b, n], ref, atol=1e-6), (b, n)


def test_cap_members_is_an_evenly_spaced_deterministic_sample() -> None:
    indptr = np.array([0, 10, 12])
    members = np.arange(100, 112)
    ptr, mem = cap_members(indptr, members, 4)
    assert ptr.tolist() == [0, 4, 6]
    assert mem.tolist() == [100, 102, 105, 107, 110, 111]   # floor(j * 10 / 4) of cohort 0
