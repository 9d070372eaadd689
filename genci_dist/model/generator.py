"""The generative part: a T5 encoder-decoder over semantic-ID tokens (no pretrained weights),
the long-term intent H_LTI (Eq. 5), the NTP loss and constrained beam search over the trie.

Token layout (data_pipes.schema.TokenVocab): 0 = padding and decoder start; the code of level
n is token offsets[n] + code. A history of h items is h*T tokens, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from data_pipes.schema import TokenVocab
from genci_dist.model.config import ModelConfig
from genci_dist.model.t5_attention import absorb_cross_attention, register
from genci_dist.tokenizer.trie import SemanticIdTrie


def build_t5(cfg: ModelConfig, vocab: TokenVocab) -> T5ForConditionalGeneration:
    t5cfg = T5Config(vocab_size=vocab.size, d_model=cfg.d_model, d_ff=cfg.d_ff,
                     d_kv=cfg.d_kv, num_layers=cfg.num_encoder_layers,
                     num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                     dropout_rate=cfg.t5_dropout, feed_forward_proj="relu",
                     pad_token_id=0, decoder_start_token_id=0, eos_token_id=0,
                     genci_attention_block=cfg.attention_block,
                     genci_attention_keep_probs=cfg.attention_keep_probs)
    t5cfg._attn_implementation = register() if cfg.attention == "genci_t5" else cfg.attention
    t5 = T5ForConditionalGeneration(t5cfg)
    if cfg.absorb_cross_attention:
        absorb_cross_attention(t5)
    return t5


def distinct_rows(tokens: Tensor) -> tuple[Tensor, Tensor] | None:
    """(distinct rows, inverse index) of history tokens [B, S] when some row repeats, else
    None (also for B ≤ 1 and for 0-wide rows, which torch.unique rejects). A per-sample
    function of the history then runs on the distinct rows and `out[inverse]` gives every
    sample's result (gradients of the copies add up)."""
    if tokens.shape[0] < 2 or tokens.shape[1] == 0:
        return None
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return (uniq, inverse) if uniq.shape[0] < tokens.shape[0] else None


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: TokenVocab) -> None:
        super().__init__()
        self.vocab = vocab
        self.t5 = build_t5(cfg, vocab)
        self.offsets = vocab.offsets()
        self.dedup = cfg.dedup_histories

    def encode(self, history_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """history_tokens [B, S] (any integer dtype) → (H_enc [B, S', d], mask [B, S'] long).

        An empty history is encoded as one visible padding token, so its H_LTI is the
        (learned) encoding of "no history" rather than an average over masked garbage.
        With dedup_histories, each distinct row is encoded once and its output indexed back
        (the encoder is per-sample, so this is exact; gradients of copies add up)."""
        if history_tokens.shape[1] == 0:
            history_tokens = history_tokens.new_zeros(history_tokens.shape[0], 1)
        if self.dedup and (rows := distinct_rows(history_tokens)) is not None:
            enc, mask = self._encode(rows[0])
            return enc[rows[1]], mask[rows[1]]
        return self._encode(history_tokens)

    def _encode(self, history_tokens: Tensor) -> tuple[Tensor, Tensor]:
        mask = (history_tokens != 0).long()
        mask[:, 0] |= (mask.sum(1) == 0).long()
        enc = self.t5.encoder(input_ids=history_tokens, attention_mask=mask).last_hidden_state
        return enc, mask

    @staticmethod
    def last_valid(enc: Tensor, mask: Tensor) -> Tensor:
        """H_LTI (Eq. 5): the encoder state at P = max{i | m_i = 1}. [B, d]."""
        pos = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
        return enc[torch.arange(enc.shape[0], device=enc.device), pos]

    def ntp_logits(self, enc: Tensor, mask: Tensor, target_tokens: Tensor) -> Tensor:
        """Teacher-forced decoder logits [B, T, V] for the target tokens [B, T]."""
        start = target_tokens.new_zeros(target_tokens.shape[0], 1)
        dec_in = torch.cat([start, target_tokens[:, :-1]], dim=1)
        return self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                       attention_mask=mask, decoder_input_ids=dec_in, use_cache=False).logits

    def ntp_logits_and_cross_kv(self, enc: Tensor, mask: Tensor, target_tokens: Tensor,
                                keep: bool) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
        """ntp_logits, and with `keep` the decoder's cross-attention (keys, values) per layer
        ([B, H, S, d_kv] each, still in the graph) for `beam_search(cross_kv=...)`."""
        if not keep:
            return self.ntp_logits(enc, mask, target_tokens), None
        start = target_tokens.new_zeros(target_tokens.shape[0], 1)
        dec_in = torch.cat([start, target_tokens[:, :-1]], dim=1)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                      attention_mask=mask, decoder_input_ids=dec_in, past_key_values=cache,
                      use_cache=True)
        cross = out.past_key_values.cross_attention_cache
        return out.logits, [(layer.keys, layer.values) for layer in cross.layers]

    @staticmethod
    def ntp_loss(logits: Tensor, target_tokens: Tensor, weights: Tensor) -> Tensor:
        """Token cross-entropy averaged over the samples with weight 1 (positives by default).
        Zero (with a graph) when the batch has none."""
        ce = F.cross_entropy(logits.transpose(1, 2), target_tokens.long(),
                             reduction="none").mean(1)
        return (ce * weights).sum() / weights.sum().clamp(min=1.0)

    @torch.no_grad()
    def beam_search(self, enc: Tensor, mask: Tensor, trie: SemanticIdTrie, beam: int,
                    steps: int | None = None,
                    cross_kv: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """Constrained beam search reusing H_enc and a decoder KV cache; `cross_kv` (from
        `ntp_logits_and_cross_kv` on the same H_enc) saves recomputing the cross-attention
        keys/values of every decoder layer.

        Returns (codes [B, beam, steps], scores [B, beam]) sorted best first; score = sum of
        per-step log-softmax over the codes the trie allows. Only paths of existing items are
        ever kept (a beam with no valid path has score -inf)."""
        steps = trie.depth if steps is None else steps
        b = enc.shape[0]
        enc_b = enc.repeat_interleave(beam, 0)
        mask_b = mask.repeat_interleave(beam, 0)
        enc_out = BaseModelOutput(last_hidden_state=enc_b)
        cross = DynamicCache()
        for i, (k_i, v_i) in enumerate(cross_kv or []):
            cross.update(k_i.detach().repeat_interleave(beam, 0),
                         v_i.detach().repeat_interleave(beam, 0), i)
        cache = EncoderDecoderCache(DynamicCache(), cross)
        for i in range(len(cross_kv or [])):
            cache.is_updated[i] = True
        nodes = torch.zeros(b * beam, dtype=torch.long, device=enc.device)
        scores = torch.full((b, beam), float("-inf"), device=enc.device)
        scores[:, 0] = 0.0  # all beams start identical: keep one alive
        codes = torch.zeros(b, beam, 0, dtype=torch.long, device=enc.device)
        step_ids = torch.zeros(b * beam, 1, dtype=torch.long, device=enc.device)
        for d in range(steps):
            out = self.t5(encoder_outputs=enc_out, attention_mask=mask_b,
                          decoder_input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            k = trie.widths[d]
            logits = out.logits[:, -1, self.offsets[d]:self.offsets[d] + k].float()
            allowed = trie.allowed(d, nodes.clamp(min=0)) & (nodes >= 0)[:, None]
            logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            logp = logp.masked_fill(~allowed, float("-inf")).view(b, beam, k)
            total = (scores[:, :, None] + logp).view(b, beam * k)
            top, idx = total.topk(min(beam, beam * k), dim=1)
            if top.shape[1] < beam:
                pad = beam - top.shape[1]
                top = torch.cat([top, top.new_full((b, pad), float("-inf"))], 1)
                idx = torch.cat([idx, idx.new_zeros(b, pad)], 1)
            src_beam, code = idx // k, idx % k
            flat_src = (src_beam + torch.arange(b, device=enc.device)[:, None] * beam).view(-1)
            if beam > 1:
                cache.reorder_cache(flat_src)
            codes = torch.cat([codes.gather(1, src_beam[:, :, None].expand(-1, -1, d)),
                               code[:, :, None]], dim=2)
            parent = nodes[flat_src]
            nodes = trie.child(d, parent.clamp(min=0), code.view(-1))
            nodes = torch.where((parent >= 0) & torch.isfinite(top.view(-1)), nodes,
                                torch.full_like(nodes, -1))
            scores = top
            step_ids = (code.view(-1, 1) + self.offsets[d])
        return codes, scores
