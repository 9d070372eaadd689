"""CohortIntent (paper Eqs. 8-9) against a float64 einsum multi-head attention built from the
nn.MultiheadAttention weights, with ragged key-padding masks on the history."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from genci_dist.model.intent import CohortIntent

D, HEADS = 8, 2


def mha_reference(m: nn.MultiheadAttention, q: Tensor, kv: Tensor, valid: Tensor) -> Tensor:
    """float64 attention: softmax((q Wq)(kv Wk)^T / sqrt(d_h) over valid keys) (kv Wv) Wo."""
    d, h = m.embed_dim, m.num_heads
    dh = d // h
    w, b = m.in_proj_weight.detach().double(), m.in_proj_bias.detach().double()
    qd, kvd = q.double(), kv.double()
    qp = torch.einsum("bqi,oi->bqo", qd, w[:d]) + b[:d]
    kp = torch.einsum("bki,oi->bko", kvd, w[d:2 * d]) + b[d:2 * d]
    vp = torch.einsum("bki,oi->bko", kvd, w[2 * d:]) + b[2 * d:]
    qh = qp.view(q.shape[0], q.shape[1], h, dh)
    kh = kp.view(kv.shape[0], kv.shape[1], h, dh)
    vh = vp.view(kv.shape[0], kv.shape[1], h, dh)
    scores = torch.einsum("bqhe,bkhe->bhqk", qh, kh) / dh ** 0.5
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    ctx = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), vh).reshape(q.shape[0], -1, d)
    return torch.einsum("bqi,oi->bqo", ctx, m.out_proj.weight.detach().double()) \
        + m.out_proj.bias.detach().double()


def _inputs(seed: int, lengths: list[int], s: int, n: int = 3
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    e_c = torch.randn(b, n, D, generator=g)
    h_enc = torch.randn(b, s, D, generator=g)
    e_v = torch.randn(b, D, generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).long()
    return e_c, h_enc, mask, e_v


def _module(share: bool, seed: int = 0) -> CohortIntent:
    torch.manual_seed(seed)
    mod = CohortIntent(d_model=D, heads=HEADS, dropout=0.0, share=share).eval()
    with torch.no_grad():  # non-zero biases so the bias paths are exercised too
        for m in {id(mod.refine): mod.refine, id(mod.target): mod.target}.values():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return mod


@pytest.mark.parametrize("share", [False, True])
def test_share_attention_means_one_module(share: bool) -> None:
    """share=True reuses one MultiheadAttention object for Eqs. 8 and 9, False builds two."""
    mod = CohortIntent(d_model=D, heads=HEADS, dropout=0.0, share=share)
    assert (mod.refine is mod.target) is share
    n_mha = sum(isinstance(m, nn.MultiheadAttention) for m in mod.modules())
    assert n_mha == (1 if share else 2)
    per_module = 4 * D * D + 4 * D  # in_proj (3 d×d + 3d) + out_proj (d×d + d)
    assert sum(p.numel() for p in mod.parameters()) == per_module * n_mha


@pytest.mark.parametrize("share", [False, True])
def test_eq8_and_eq9_match_float64_reference(share: bool) -> None:
    """H_STI = Attn(e_v, E_R, E_R) with E_R = Attn(E_C, H_enc, H_enc | valid history only)."""
    mod = _module(share)
    e_c, h_enc, mask, e_v = _inputs(1, [3, 7, 1, 5], s=7)
    with torch.no_grad():
        out = mod(e_c, h_enc, mask, e_v)
        e_r = mha_reference(mod.refine, e_c, h_enc, mask.bool())              # Eq. 8
        all_cohorts = torch.ones(e_c.shape[:2], dtype=torch.bool)
        ref = mha_reference(mod.target, e_v[:, None], e_r, all_cohorts)[:, 0]  # Eq. 9
        # Eq. 8 alone through the module's own first attention
        e_r_mod, _ = mod.refine(e_c, h_enc, h_enc, key_padding_mask=mask == 0)
    assert out.shape == (4, D)
    assert torch.allclose(e_r_mod.double(), e_r, atol=1e-5)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # the reference is not trivially close to a different wiring (e.g. no mask)
    e_r_unmasked = mha_reference(mod.refine, e_c, h_enc, torch.ones_like(mask, dtype=torch.bool))
    unmasked = mha_reference(mod.target, e_v[:, None], e_r_unmasked, all_cohorts)[:, 0]
    assert not torch.allclose(unmasked[:3], ref[:3], atol=1e-3)


@pytest.mark.parametrize("share", [False, True])
def test_masked_history_positions_have_no_influence(share: bool) -> None:
    """Perturbing H_enc at padded positions (by large values) leaves H_STI unchanged, while
    perturbing one valid position changes it."""
    mod = _module(share, seed=3)
    lengths = [1, 4, 6, 2, 6]
    e_c, h_enc, mask, e_v = _inputs(4, lengths, s=6)
    with torch.no_grad():
        out = mod(e_c, h_enc, mask, e_v)
        noisy = h_enc.clone()
        pad = mask == 0
        noisy[pad] = 100.0 * torch.randn(int(pad.sum()), D)
        assert torch.allclose(mod(e_c, noisy, mask, e_v), out, atol=1e-6)
        valid_hit = h_enc.clone()
        valid_hit[:, 0] += 1.0  # position 0 is valid in every row
        changed = (mod(e_c, valid_hit, mask, e_v) - out).abs().amax(1)
    assert (changed > 1e-4).all()


def test_each_sample_is_independent_of_the_batch() -> None:
    """A sample's H_STI is the same alone or in a batch with longer histories (padding to the
    batch's width does not leak into it)."""
    mod = _module(False, seed=5)
    e_c, h_enc, mask, e_v = _inputs(6, [2, 5, 3], s=5)
    with torch.no_grad():
        out = mod(e_c, h_enc, mask, e_v)
        for i, n in enumerate([2, 5, 3]):
            alone = mod(e_c[i:i + 1], h_enc[i:i + 1, :n], mask[i:i + 1, :n], e_v[i:i + 1])
            assert torch.allclose(alone[0], out[i], atol=1e-6)
