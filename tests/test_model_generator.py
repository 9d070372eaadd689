"""The generative part: trie queries vs brute-force filtering of the code list, H_LTI position
(Eq. 5), the defined encoding of an empty history, KV-cached beam-search decoding vs a full
teacher-forced re-run, and constrained beam search vs exhaustive scoring of every valid ID."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from data_pipes.schema import TokenVocab
from genci_dist.model.config import ModelConfig
from genci_dist.model.generator import Generator
from genci_dist.tokenizer.semantic_ids import collision_digits
from genci_dist.tokenizer.trie import SemanticIdTrie

N, K = 3, 4   # 3 levels × 4 codes, plus the collision digit


def make_trie(seed: int, n_items: int) -> tuple[SemanticIdTrie, np.ndarray, TokenVocab]:
    """Random codes made unique by the tokenizer's collision digit; item ids 101, 102, ..."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n_items, N))
    coll = collision_digits(codes)
    full = np.concatenate([codes, coll[:, None]], 1)
    assert len({tuple(r) for r in full}) == n_items
    vocab = TokenVocab(N, K, int(coll.max()) + 1)
    trie = SemanticIdTrie(full, np.arange(101, 101 + n_items), [K] * N + [vocab.n_collision])
    return trie, full, vocab


def make_generator(vocab: TokenVocab, seed: int) -> Generator:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=2,
                      num_heads=2, d_kv=8, attn_heads=2)
    return Generator(cfg, vocab).eval()


def random_history(vocab: TokenVocab, lengths: list[int], seed: int) -> Tensor:
    """Token histories, left-aligned, 0-padded (lengths in tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = max(max(lengths), 1)
    tok = torch.randint(1, vocab.size, (len(lengths), s), generator=g)
    return tok.masked_fill(torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None], 0)


# ---- trie ----------------------------------------------------------------------------------

def test_trie_allowed_child_contains_equal_brute_force() -> None:
    """For random (valid and invalid) prefixes: allowed = the set of next digits among the codes
    with that prefix, child = -1 exactly when no code continues that way (the item id at the
    last digit), contains = "some code starts with this prefix"."""
    trie, full, _ = make_trie(0, n_items=30)
    rows = [tuple(int(x) for x in r) for r in full]
    item_of = {r: 101 + i for i, r in enumerate(rows)}
    widths = trie.widths
    rng = np.random.default_rng(1)
    checked_valid = checked_invalid = 0
    for _ in range(300):
        depth = int(rng.integers(0, N + 2))
        src = rows[int(rng.integers(len(rows)))]
        # half the prefixes follow an existing code (deep valid paths), half are random
        p = src[:depth] if rng.random() < 0.5 else tuple(
            int(rng.integers(0, widths[d])) for d in range(depth))
        match = [r for r in rows if r[:depth] == p]
        exists = bool(match)
        assert bool(trie.contains(torch.tensor([p], dtype=torch.long).view(1, depth))[0]) \
            == exists
        node = torch.zeros(1, dtype=torch.long)
        for d, c in enumerate(p):
            node = trie.child(d, node.clamp(min=0), torch.tensor([c])) if node[0] >= 0 else node
        if not exists:
            assert int(node[0]) == -1
            checked_invalid += 1
            continue
        checked_valid += 1
        if depth == N + 1:
            assert int(node[0]) == item_of[p]
            continue
        allowed = trie.allowed(depth, node)[0]
        assert allowed.nonzero().flatten().tolist() == sorted({r[depth] for r in match})
        for c in range(widths[depth]):
            nxt = int(trie.child(depth, node, torch.tensor([c]))[0])
            assert (nxt >= 0) == any(r[depth] == c for r in match)
    assert checked_valid > 100 and checked_invalid > 30
    assert trie.nodes_per_depth() == [len({r[:d] for r in rows}) for d in range(N + 1)]
    # out-of-range digits are "not contained", never an index error
    assert not trie.contains(torch.tensor([[K, 0, 0, 0], [0, -1, 0, 0]])).any()


def test_trie_rejects_duplicate_ids_and_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="share a full semantic ID"):
        SemanticIdTrie(np.array([[0, 1], [0, 1]]), np.array([1, 2]), [2, 2])
    with pytest.raises(ValueError, match="outside"):
        SemanticIdTrie(np.array([[0, 2]]), np.array([1]), [2, 2])


# ---- encoder, H_LTI, empty history -----------------------------------------------------------

def test_last_valid_picks_the_last_valid_position() -> None:
    """H_LTI = H_enc[b, max{i | m_i = 1}] for ragged masks (also masks with holes)."""
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(40, 9, 5, generator=g)
    mask = (torch.rand(40, 9, generator=g) < 0.5).long()
    mask[torch.arange(40), torch.randint(0, 9, (40,), generator=g)] = 1   # never all-zero
    mask[0] = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0])
    mask[1] = 1
    out = Generator.last_valid(enc, mask)
    for b in range(40):
        p = max(i for i in range(9) if mask[b, i] == 1)
        assert torch.equal(out[b], enc[b, p])
    lengths = torch.tensor([1, 9, 4, 6])          # left-aligned ragged masks, as encode() makes
    ragged = (torch.arange(9)[None, :] < lengths[:, None]).long()
    assert torch.equal(Generator.last_valid(enc[:4], ragged), enc[torch.arange(4), lengths - 1])


def test_empty_history_is_one_visible_pad_token() -> None:
    """Defined representation: an empty history (all-zero row of any width, or a width-0 batch)
    is encoded as a single visible padding token at position 0, so its H_LTI is the same vector
    for every empty-history sample, whatever the batch width or its neighbours; non-empty rows
    keep their own mask and are not affected by an empty neighbour."""
    _, _, vocab = make_trie(0, 20)
    gen = make_generator(vocab, 0)
    hist = random_history(vocab, [0, 7, 0, 3], seed=1)
    with torch.no_grad():
        enc, mask = gen.encode(hist)
        assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0],
                                 [1, 1, 1, 0, 0, 0, 0]]
        h = gen.last_valid(enc, mask)
        e0, m0 = gen.encode(torch.zeros(3, 0, dtype=torch.long))     # no history column at all
        assert m0.tolist() == [[1], [1], [1]]
        e1, m1 = gen.encode(torch.zeros(1, 1, dtype=torch.long))      # one pad token
        ref = gen.last_valid(e1, m1)[0]
        for row in (h[0], h[2], *gen.last_valid(e0, m0)):
            assert torch.allclose(row, ref, atol=1e-5)
        assert torch.isfinite(enc).all()
        assert not torch.allclose(h[1], ref, atol=1e-3)    # a real history encodes differently
        alone, m_alone = gen.encode(hist[3:4, :3])
        assert m_alone.tolist() == [[1, 1, 1]]
        assert torch.allclose(enc[3, :3], alone[0], atol=1e-5)


# ---- beam search ---------------------------------------------------------------------------

def _tokens(gen: Generator, paths: Tensor) -> Tensor:
    return paths + torch.tensor(gen.offsets[:paths.shape[1]])


def exhaustive_scores(gen: Generator, enc: Tensor, mask: Tensor, trie: SemanticIdTrie,
                      paths: Tensor) -> Tensor:
    """[B, P] float64 scores of every path [P, steps] by teacher forcing (no cache): the sum over
    steps of the log-softmax over the codes the trie allows below the path's prefix."""
    b, p, steps = enc.shape[0], paths.shape[0], paths.shape[1]
    logits = gen.ntp_logits(enc.repeat_interleave(p, 0), mask.repeat_interleave(p, 0),
                            _tokens(gen, paths).repeat(b, 1)).double()        # [B*P, steps, V]
    scores = torch.zeros(b * p, dtype=torch.float64)
    node = torch.zeros(p, dtype=torch.long)
    for d in range(steps):
        allowed = trie.allowed(d, node).repeat(b, 1)
        row = logits[:, d, gen.offsets[d]:gen.offsets[d] + trie.widths[d]]
        logp = torch.log_softmax(row.masked_fill(~allowed, float("-inf")), -1)
        scores += logp.gather(1, paths[:, d].repeat(b)[:, None])[:, 0]
        node = trie.child(d, node, paths[:, d])
    return scores.view(b, p)


def valid_paths(full: np.ndarray, steps: int) -> Tensor:
    return torch.tensor(sorted({tuple(int(x) for x in r[:steps]) for r in full}))


@pytest.mark.parametrize("seed, steps", [(0, N + 1), (1, N + 1), (2, N)])
def test_beam_search_equals_exhaustive_top_b(seed: int, steps: int) -> None:
    """beam B >= the most trie nodes at any depth keeps every valid prefix at every step, so the
    result must be exactly the top-B valid IDs of exhaustive scoring, best first, with the same
    scores; unused beams (fewer valid IDs than B) are -inf."""
    trie, full, vocab = make_trie(seed, n_items=24)
    gen = make_generator(vocab, seed)
    paths = valid_paths(full, steps)
    hist = random_history(vocab, [8, 3, 0, 12], seed=seed)
    with torch.no_grad():
        enc, mask = gen.encode(hist)
        ref = exhaustive_scores(gen, enc, mask, trie, paths)
        widest = max(trie.nodes_per_depth())
        assert widest < len(paths) or steps == N   # the final top-B is a real selection
        for beam in (widest, len(paths) + 3):
            codes, scores = gen.beam_search(enc, mask, trie, beam=beam, steps=steps)
            assert codes.shape == (4, beam, steps) and scores.shape == (4, beam)
            n_live = min(beam, len(paths))
            for b in range(4):
                order = torch.sort(ref[b], descending=True)
                gaps = -order.values[:n_live + 1].diff()
                assert (gaps > 1e-6).all()   # no near-ties: the top-B is well defined
                top = paths[order.indices[:n_live]]
                assert torch.equal(codes[b, :n_live], top), (beam, b)
                assert torch.allclose(scores[b, :n_live].double(), order.values[:n_live],
                                      atol=1e-4)
                assert torch.isneginf(scores[b, n_live:]).all()


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_is_the_greedy_valid_path(seed: int) -> None:
    """beam 1 = at each step the argmax of the decoder logits among the codes the trie allows
    below the prefix chosen so far (computed here by teacher forcing, no cache)."""
    trie, _, vocab = make_trie(seed, n_items=24)
    gen = make_generator(vocab, 10 + seed)
    hist = random_history(vocab, [5, 0, 9, 2, 12], seed=seed)
    with torch.no_grad():
        enc, mask = gen.encode(hist)
        codes, scores = gen.beam_search(enc, mask, trie, beam=1)
        node = torch.zeros(5, dtype=torch.long)
        path = torch.zeros(5, 0, dtype=torch.long)
        total = torch.zeros(5, dtype=torch.float64)
        for d in range(trie.depth):
            probe = torch.cat([path, torch.zeros(5, 1, dtype=torch.long)], 1)
            logits = gen.ntp_logits(enc, mask, _tokens(gen, probe))[:, d].double()
            row = logits[:, gen.offsets[d]:gen.offsets[d] + trie.widths[d]]
            row = row.masked_fill(~trie.allowed(d, node), float("-inf"))
            pick = row.argmax(1)
            total += torch.log_softmax(row, 1).gather(1, pick[:, None])[:, 0]
            path = torch.cat([path, pick[:, None]], 1)
            node = trie.child(d, node, pick)
    assert torch.equal(codes[:, 0], path)
    assert (node >= 101).all()      # a real item id at the end
    assert torch.allclose(scores[:, 0].double(), total, atol=1e-4)


class _StepRecorder:
    """Forward hook on the T5 model: the decoder input and last-position logits of each call."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.logits: list[Tensor] = []

    def __call__(self, _m: Any, _args: Any, kwargs: dict[str, Any], out: Any) -> None:
        self.inputs.append(kwargs["decoder_input_ids"].clone())
        self.logits.append(out.logits[:, -1].detach().clone())


@pytest.mark.parametrize("beam", [1, 3])
def test_kv_cached_steps_equal_full_teacher_forced_rerun(beam: int) -> None:
    """Each beam-search step feeds one token (the cache holds the rest) and its logits equal the
    teacher-forced full-decoder logits (Generator.ntp_logits) of the prefix it extends: along
    the chosen path for beam 1; for beam 3 every returned beam's prefixes are found among the
    step's rows and every returned score equals the teacher-forced score of its path (which
    fails if the cache is not reordered with the beams)."""
    trie, full, vocab = make_trie(4, n_items=24)
    gen = make_generator(vocab, 4)
    hist = random_history(vocab, [6, 10, 0], seed=4)
    rec = _StepRecorder()
    handle = gen.t5.register_forward_hook(rec, with_kwargs=True)
    try:
        with torch.no_grad():
            enc, mask = gen.encode(hist)
            codes, scores = gen.beam_search(enc, mask, trie, beam=beam)
    finally:
        handle.remove()
    steps = trie.depth
    assert len(rec.inputs) == steps
    assert all(x.shape == (3 * beam, 1) for x in rec.inputs)
    with torch.no_grad():
        for j in range(beam):
            teacher = gen.ntp_logits(enc, mask, _tokens(gen, codes[:, j]))   # [3, steps, V]
            for b in range(3):
                for d in range(steps):
                    rows = rec.logits[d][b * beam:(b + 1) * beam]
                    err = (rows - teacher[b, d]).abs().amax(1).min()
                    assert err < 1e-4, (j, b, d, float(err))
                    if beam == 1:
                        assert torch.allclose(rows[0], teacher[b, d], atol=1e-4)
        ref = exhaustive_scores(gen, enc, mask, trie, codes.reshape(-1, steps))
    own = torch.stack([ref[b, b * beam:(b + 1) * beam] for b in range(3)])  # sample b, its paths
    assert torch.allclose(scores.double(), own, atol=1e-4)


def test_beam_search_never_emits_an_invalid_id() -> None:
    """Random weights, several seeds, tries and beams (also beams wider than the number of
    items): every beam with a finite score is a distinct existing ID (trie.contains), beams
    are sorted best first, and there are exactly min(beam, n_items) finite beams."""
    for seed in range(5):
        n_items = [3, 7, 24, 40, 11][seed]
        trie, full, vocab = make_trie(seed, n_items=n_items)
        gen = make_generator(vocab, 100 + seed)
        hist = random_history(vocab, [0, 4, 9, 16, 1, 7], seed=seed)
        with torch.no_grad():
            enc, mask = gen.encode(hist)
            for beam in (1, 2, 5, 16):
                for steps in (N, N + 1):
                    codes, scores = gen.beam_search(enc, mask, trie, beam=beam, steps=steps)
                    live = torch.isfinite(scores)
                    n_valid = len({tuple(r[:steps]) for r in full})
                    assert (live.sum(1) == min(beam, n_valid)).all()
                    assert trie.contains(codes[live]).all()
                    assert (scores[live] <= 1e-6).all()
                    assert (scores[:, :-1] >= scores[:, 1:]).all()
                    for b in range(6):
                        ids = {tuple(c) for c in codes[b][live[b]].tolist()}
                        assert len(ids) == int(live[b].sum())
