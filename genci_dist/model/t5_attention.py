"""A leaner attention kernel for transformers' T5 on CPU, registered as `attn_implementation =
"genci_t5"` (same mathematics as transformers' `eager`, fewer memory passes).

Why by hand: T5 adds a *learned* relative-position bias to the scores. With a bias that needs a
gradient, PyTorch's SDPA cannot use its fused CPU (flash) kernel and falls back to
`_scaled_dot_product_attention_math`, which on top of eager's work runs `_safe_softmax`
(isneginf / all / where passes over the B×H×S×S scores) and scales q and k separately;
`eager` allocates a new B×H×S×S tensor for each of `* scaling`, `+ position_bias` and
`+ mask`. Here the scores are written once by the matmul and updated in place (the matmul's
backward needs q and k, not its output): bias and mask are added in one `add_` of a
pre-summed [B|1, H, Sq, Sk] term, then one softmax, one matmul. Masks are eager's float masks
(0 / dtype-min, never skipped), so a fully padded row behaves exactly as in eager.
Blocked (`BlockedBiasAttention`, `model.attention_block` samples per block): the scores of a
block of samples stay in cache from matmul to softmax to matmul; backward reuses the
probabilities kept from forward (`model.attention_keep_probs`, default) or recomputes them
block by block (flash-attention style, no B×H×Sq×Sk memory). Used for every self-attention
with the learned bias and for any attention whose scores would exceed BLOCK_BYTES; small
no-grad or bias-free cases (the decoder's cross-attention without `AbsorbedCrossAttention`,
generation steps) go to SDPA's fused kernel.

`AbsorbedCrossAttention` (model.absorb_cross_attention, on by default) replaces the decoder's
cross-attention modules: it never projects the encoder tokens to keys and values.

Measured with `genci-bench` (README "Speed"): GenCI at the ML-1M config, batch 256, 1
process × 2 threads: sdpa 46.6 → genci_t5 77.7 samples/s (padded to 50 items); 1 thread,
median of 2, other jobs running: projected cross-attention 24.7 → absorbed 39.3 samples/s
(bf16 autocast 42.1 → 57.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, T5ForConditionalGeneration
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.t5.modeling_t5 import T5Attention

NAME = "genci_t5"
BLOCK_BYTES = 64 << 20
"""Scores larger than this (all samples) always go through the blocked kernel, also without
gradient (evaluation): SDPA would first materialise bias + mask as one B×H×Sq×Sk tensor."""


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Eager's additive float mask (0 / dtype-min); a boolean "attend" mask is converted
    (defensive: the masks registered here are already float)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)


def genci_t5_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, position_bias: Tensor | None = None,
                       **_: object) -> tuple[Tensor, None]:
    """q [B, H, Sq, D], k/v [B, H, Sk, D]; bias [1|B, H, Sq, Sk]; mask float [B, 1, Sq, Sk]."""
    scale = 1.0 if scaling is None else scaling
    attention_mask = _additive(attention_mask, query.dtype)
    if (attention_mask is not None and not getattr(module, "is_decoder", True)
            and attention_mask.dim() == 4 and attention_mask.shape[2] > 1):
        # The encoder's mask only masks padded keys: eager_mask repeats one row for every
        # query. Its first row (a view) broadcasts to the same sums and is 1/Sq of the reads.
        attention_mask = attention_mask[:, :, :1]
    p = dropout if module.training else 0.0
    block = getattr(module.config, "genci_attention_block", 0)
    b, h, sq, _ = query.shape
    big = b * h * sq * key.shape[2] * query.element_size() > BLOCK_BYTES
    if (p == 0.0 and block > 0 and position_bias is not None and position_bias.shape[0] == 1
            and (big or (torch.is_grad_enabled() and position_bias.requires_grad))):
        # the B×H×Sq×Sk scores would be large, or the learned bias needs its gradient
        keep = getattr(module.config, "genci_attention_keep_probs", False)
        out = BlockedBiasAttention.apply(query, key, value, position_bias, attention_mask,
                                         scale, block, keep)
        return out.transpose(1, 2).contiguous(), None
    additive = position_bias
    if attention_mask is not None:
        additive = attention_mask if additive is None else additive + attention_mask
    if not torch.is_grad_enabled() or additive is None or not additive.requires_grad:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive,
                                             dropout_p=p, scale=scale)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3))
    if scale != 1.0:
        scores.mul_(scale)
    scores.add_(additive)
    weights = torch.softmax(scores, dim=-1)
    if p > 0.0:
        weights = F.dropout(weights, p=p, training=True)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), None


def _block(q: Tensor, k: Tensor, bias: Tensor, mask: Tensor | None, scale: float,
           out: Tensor | None = None) -> Tensor:
    """softmax(scale·q kᵀ + bias + mask) of one block of samples, in q's dtype (written into
    `out` if given: under bf16 the rounding then goes straight into it).

    Under bf16 autocast q and k are bf16: the scores leave the matmul in bf16 and are widened
    to float32 once, so bias, mask and softmax run in float32 with no mixed-dtype in-place
    adds (each of which cast a whole block twice) and the probabilities are rounded once.
    Measured on GenCI's ML-1M generator, batch 128, bf16, 1 thread, median of 4 interleaved:
    2.47 → 2.21 s per step. In float32/float64 the two conversions are no-ops."""
    s = torch.matmul(q, k.transpose(2, 3))
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if scale != 1.0:
        s.mul_(scale)
    s.add_(bias)
    if mask is not None:
        s.add_(mask)
    if out is None:
        return s.softmax(dim=-1).to(q.dtype)
    return out.copy_(s.softmax(dim=-1))


class BlockedBiasAttention(torch.autograd.Function):
    """softmax(q kᵀ·scale + bias + mask) v over blocks of `block` samples (flash-attention
    style, blocked over the batch instead of over keys): a block's B_c×H×Sq×Sk scores stay in
    cache across matmul → add → softmax → matmul instead of streaming a B×H×Sq×Sk tensor
    through memory ~6 times. Gradients: q, k, v and the shared bias [1, H, Sq, Sk] (summed
    over samples); the mask gets none.

    Backward needs the probabilities P. `keep` = store them (in q's dtype, B×H×Sq×Sk, only
    when a gradient is needed); otherwise they are recomputed block by block, which costs a
    second matmul, bias/mask adds and softmax — the softmax's exponentials are the dearest
    elementwise pass. Same numbers either way (the same `_block` computes them). Measured,
    GenCI ML-1M encoder layer, batch 128, S = 200, bf16, 1 thread, quiet machine, median of 8
    interleaved forward+backward: recompute 0.335 s, keep 0.289 s; the memory is
    1024·8·200·200·2 B = 655 MB per encoder layer for a batch of 1024 in bf16."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor,  # noqa: ANN001
                mask: Tensor | None, scale: float, block: int, keep: bool = False) -> Tensor:
        b, h, sq, _ = q.shape
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        probs = (q.new_empty((b, h, sq, k.shape[2]))
                 if keep and any(ctx.needs_input_grad[:4]) else None)
        for i in range(0, b, block):
            m = None if mask is None else mask[i:i + block]
            p = _block(q[i:i + block], k[i:i + block], bias, m, scale,
                       None if probs is None else probs[i:i + block])
            torch.matmul(p, v[i:i + block], out=out[i:i + block])
        # the mask only to recompute the probabilities
        ctx.save_for_backward(q, k, v, bias, out, mask if probs is None else None, probs)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # noqa: ANN001, ANN205
        q, k, v, bias, out, mask, probs = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)            # [B, H, Sq, 1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        acc = torch.promote_types(bias.dtype, torch.float32)   # summed over B samples
        dbias = torch.zeros(bias.shape[1:], dtype=acc, device=q.device)
        for i in range(0, q.shape[0], block):
            sl = slice(i, i + block)
            if probs is not None:
                p = probs[sl]
            else:
                p = _block(q[sl], k[sl], bias, None if mask is None else mask[sl], scale)
            dv[sl] = torch.matmul(p.transpose(2, 3), dout[sl])
            ds = torch.matmul(dout[sl], v[sl].transpose(2, 3))
            ds.sub_(delta[sl]).mul_(p)                         # dS = P ∘ (dP − rowsum(dO∘O))
            dbias += ds.sum(0)
            if scale != 1.0:
                ds.mul_(scale)
            dq[sl] = torch.matmul(ds, k[sl])
            dk[sl] = torch.matmul(ds.transpose(2, 3), q[sl])
        return dq, dk, dv, dbias.to(bias.dtype)[None], None, None, None, None


def register() -> str:
    """Registers the kernel and eager's float masks under NAME (idempotent); returns NAME."""
    AttentionInterface.register(NAME, genci_t5_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


class AbsorbedCrossAttention(T5Attention):
    """T5's decoder cross-attention with the key and value projections moved off the encoder
    tokens (installed over `EncDecAttention` by `absorb_cross_attention`; same parameters).

    Per head h, with x the decoder states [Sq, d], E the encoder output [S, d] and W_q, W_k,
    W_v [d_kv, d] that head's rows of q, k, v:
        scores_h = (x W_qᵀ)(E W_kᵀ)ᵀ = ((x W_qᵀ) W_k) Eᵀ        out_h = P_h (E W_vᵀ) = (P_h E) W_vᵀ
    Eager projects all S encoder tokens to keys and values (2·S·d·H·d_kv multiply-adds per
    layer and sample: S = 200 at ML-1M, most of the decoder's cost) for Sq ≤ 4 queries; here
    the query is mapped into the encoder's d-space instead (Sq·H·d_kv·d), so the decoder does
    ~S/Sq times less projection work and never holds the [B, H, S, d_kv] keys/values (nor
    caches them during generation). Same function; only the order of the sums changes
    (float64 loss and gradients equal eager's to 1e-9: tests/test_speed_equivalence.py).
    T5 does not scale scores; the mask is eager's additive one (or a boolean "attend" mask),
    and a position_bias, if one is passed, is added as eager adds it."""

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None,  # noqa: D102
                key_value_states: Tensor | None = None, position_bias: Tensor | None = None,
                past_key_values: object = None, **kwargs: object
                ) -> tuple[Tensor, Tensor | None, None]:
        if key_value_states is None:   # never installed on self-attention; stay correct
            return super().forward(hidden_states, mask, key_value_states, position_bias,
                                   past_key_values, **kwargs)
        b, sq, _ = hidden_states.shape
        h, dk, d = self.n_heads, self.key_value_proj_dim, self.d_model
        enc = key_value_states
        q = self.q(hidden_states).view(b * sq, h, dk).transpose(0, 1)    # [H, B·Sq, dk]
        q = torch.bmm(q, self.k.weight.view(h, dk, d))                   # [H, B·Sq, d]
        q = q.view(h, b, sq, d).permute(1, 0, 2, 3).reshape(b, h * sq, d)
        scores = torch.bmm(q, enc.transpose(1, 2)).view(b, h, sq, -1)
        mask = _additive(mask, scores.dtype)
        if position_bias is not None:
            scores = scores + position_bias
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0.0:
            p = F.dropout(p, p=self.dropout, training=True)
        ctx = torch.bmm(p.view(b, h * sq, -1), enc)                      # [B, H·Sq, d]
        ctx = ctx.view(b, h, sq, d).permute(1, 0, 2, 3).reshape(h, b * sq, d)
        out = torch.bmm(ctx, self.v.weight.view(h, dk, d).transpose(1, 2))
        out = self.o(out.transpose(0, 1).reshape(b, sq, h * dk))         # [B, Sq, d]
        return out, None, None


def absorb_cross_attention(model: T5ForConditionalGeneration) -> None:
    """Every decoder cross-attention becomes an AbsorbedCrossAttention. The modules keep their
    parameters (a class change: nothing is re-initialised, no random numbers are drawn, and
    state dicts and checkpoints are unchanged)."""
    for block in model.decoder.block:
        block.layer[1].EncDecAttention.__class__ = AbsorbedCrossAttention
