"""The speed work keeps the mathematics (issue 6): the genci_t5 attention kernel equals
transformers' eager T5 attention in float64 (loss and every gradient), a batch padded wider
gives the same loss and gradients as the same batch at its natural width (what length
bucketing relies on), generation reusing the teacher-forced cross-attention keys/values picks
the same codes as recomputing them, and encoding identical histories once is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn
from transformers import T5Config, T5ForConditionalGeneration

from data_pipes.batch import Batch
from genci_dist.bench.beam import FEATURES, random_assets, random_batch
from genci_dist.model.config import ModelConfig
from genci_dist.model.t5_attention import AbsorbedCrossAttention, absorb_cross_attention, register
from genci_dist.model.task import GenCITask

CFG = ModelConfig(d_model=16, d_ff=16, num_encoder_layers=2, num_decoder_layers=2,
                  num_heads=2, d_kv=8, attn_heads=2, attn_dropout=0.0, dropout=0.0,
                  deepfm_dropout=0.0, mlp=(16,), deepfm_mlp=(8,))


def t5(impl: str, block: int = 0, dropout: float = 0.0, absorb: bool = False,
       keep: bool = True) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    c = T5Config(vocab_size=40, d_model=16, d_ff=16, d_kv=8, num_layers=2,
                 num_decoder_layers=2, num_heads=2, dropout_rate=dropout,
                 feed_forward_proj="relu", decoder_start_token_id=0,
                 genci_attention_block=block, genci_attention_keep_probs=keep)
    c._attn_implementation = register() if impl == "genci_t5" else impl
    model = T5ForConditionalGeneration(c)
    if absorb:
        absorb_cross_attention(model)
    return model.double()


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_t5(model: T5ForConditionalGeneration, ids: Tensor, mask: Tensor,
           dec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    loss = (logits.logsumexp(-1) * torch.linspace(0.5, 1.5, logits.shape[1])).mean()
    loss.backward()
    return loss.detach(), grads(model)


def t5_inputs(seed: int, b: int, s: int, pad_from: dict[int, int]
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(encoder ids [b, s], attention mask, decoder ids [b, 4]); row r is padded from
    position pad_from[r] on (ids 0 there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (b, s), generator=g)
    mask = torch.ones_like(ids)
    for row, start in pad_from.items():
        mask[row, start:] = 0
    ids[mask == 0] = 0
    return ids, mask, torch.randint(1, 40, (b, 4), generator=g)


def assert_same_t5_step(model: T5ForConditionalGeneration, ref_model: T5ForConditionalGeneration,
                        ids: Tensor, mask: Tensor, dec: Tensor) -> dict[str, Tensor]:
    """`model` gives `ref_model`'s loss (to 1e-12) and every gradient (rtol 1e-9, atol 1e-11)
    in float64; returns the gradients by name."""
    ref_loss, ref = run_t5(ref_model, ids, mask, dec)
    loss, got = run_t5(model, ids, mask, dec)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)
    return got


@pytest.mark.parametrize(("block", "keep"), [(0, True), (1, True), (3, True), (64, True),
                                           (1, False), (3, False), (64, False)])
def test_genci_t5_kernel_equals_eager_in_float64(block: int, keep: bool) -> None:
    # row 5 has one visible token. (No fully masked row: the model never builds one — an
    # empty history is one visible pad token — and there transformers' own sdpa already
    # differs from eager in its gradients.) keep: probabilities stored for backward or
    # recomputed there.
    ids, mask, dec = t5_inputs(1, 7, 11, {1: 4, 5: 1})
    got = assert_same_t5_step(t5("genci_t5", block, keep=keep), t5("eager"), ids, mask, dec)
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in got


def test_genci_t5_kernel_under_bf16_autocast_is_as_accurate_as_eager() -> None:
    """Under bf16 autocast (train.autocast_bf16) the blocked kernel widens each block's scores
    to float32 for bias, mask and softmax: its logits stay as close to the float64 model as
    transformers' eager T5 under the same autocast (measured: max 0.025 vs 0.022, mean 0.0041
    vs 0.0042)."""
    ids, mask, dec = t5_inputs(4, 16, 24, {3: 10})
    with torch.no_grad():
        ref = t5("eager")(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    errors = {}
    for impl in ("eager", "genci_t5"):
        model = t5(impl, 4).float().train()
        with torch.autocast("cpu", dtype=torch.bfloat16):   # grad on: the blocked kernel
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        err = (logits.detach().double() - ref).abs()
        errors[impl] = (err.max().item(), err.mean().item())
    assert errors["genci_t5"][0] <= 1.5 * errors["eager"][0], errors
    assert errors["genci_t5"][1] <= 1.2 * errors["eager"][1], errors
    assert errors["eager"][1] > 1e-4, errors            # bf16 really was in use


def test_kept_probabilities_give_the_recomputed_gradients_bit_for_bit() -> None:
    """Under bf16 autocast (the ML-1M run's setting) storing the probabilities for backward
    changes no bit of the loss or of any gradient: the same `_block` computes them."""
    ids, mask, dec = t5_inputs(6, 12, 20, {2: 7, 9: 1})
    steps = {}
    for keep in (True, False):
        model = t5("genci_t5", 4, keep=keep).float().train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            steps[keep] = run_t5(model, ids, mask, dec)
    (loss_k, grads_k), (loss_r, grads_r) = steps[True], steps[False]
    assert torch.equal(loss_k, loss_r)
    assert grads_k.keys() == grads_r.keys()
    assert all(torch.equal(grads_k[n], grads_r[n]) for n in grads_r)
    assert grads_k["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs(
    ).sum() > 0


def test_genci_t5_kernel_with_dropout_and_without_grad_matches_eager() -> None:
    """Dropout > 0 and no-grad (eval, generation) take SDPA paths: still eager's maths."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 40, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    dec = torch.randint(1, 40, (5, 3), generator=g)
    with torch.no_grad():
        a = t5("eager").eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = t5("genci_t5", 2).eval()(input_ids=ids, attention_mask=mask,
                                     decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.manual_seed(5)
    la, ga = run_t5(t5("eager", dropout=0.3), ids, mask, dec)
    torch.manual_seed(5)
    lb, gb = run_t5(t5("genci_t5", 2, dropout=0.3), ids, mask, dec)
    assert torch.isfinite(lb)  # dropout masks differ between kernels; only check it trains
    assert gb.keys() == ga.keys()


@pytest.mark.parametrize("impl", ["eager", "genci_t5", "sdpa"])
def test_absorbed_cross_attention_equals_eager_in_float64(impl: str) -> None:
    """The decoder's cross-attention with its key/value projections moved onto the queries
    gives eager's loss and every gradient (float64, to 1e-9), with padded encoder rows and a
    row of one visible token; the parameters are the same tensors under the same names."""
    ids, mask, dec = t5_inputs(3, 6, 10, {1: 6, 4: 1})
    ref_model = t5("eager")
    model = t5(impl, 3, absorb=True)
    assert all(isinstance(b.layer[1].EncDecAttention, AbsorbedCrossAttention)
               for b in model.decoder.block)
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    for (n, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), n       # installing it drew no random numbers
    got = assert_same_t5_step(model, ref_model, ids, mask, dec)
    assert "decoder.block.1.layer.1.EncDecAttention.k.weight" in got
    # incremental decoding with a cache (generation) gives the same last-step logits
    with torch.no_grad():
        enc = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, :3],
                    use_cache=True)
        step = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, 3:],
                     past_key_values=out.past_key_values, use_cache=True).logits
        full = ref_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-10, atol=1e-10)


def test_absorbed_cross_attention_keeps_the_tasks_loss_gradients_and_codes() -> None:
    """GenCI with and without absorbed cross-attention (float32, the training dtype): the same
    loss and gradients, and generation picks the same codes at beam 1 and beam 3."""
    a_task, batch = task_and_batch(7, beam_width=3, absorb_cross_attention=True)
    b_task, _ = task_and_batch(7, beam_width=3, absorb_cross_attention=False)
    with torch.no_grad():
        for task in (a_task, b_task):
            task.eval()
        enc, mask = a_task.generator.encode(batch.history_tokens)
        for beam in (1, 3):
            ca, sa = a_task.generator.beam_search(enc, mask, a_task.trie, beam)
            cb, sb = b_task.generator.beam_search(enc, mask, b_task.trie, beam)
            assert torch.equal(ca, cb)
            torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-6)
    assert_same_step(a_task, b_task, batch, atol=1e-6)


def test_reusing_cross_kv_needs_projected_cross_attention() -> None:
    with pytest.raises(ValueError, match="absorb_cross_attention"):
        dataclasses.replace(CFG, reuse_cross_kv=True, absorb_cross_attention=True)


def task_and_batch(seed: int, **overrides: object) -> tuple[GenCITask, Batch]:
    assets = random_assets(60, 3, 4, seed)
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CFG, **overrides)
    # float32: TorchRec's EBCs pool in float32 (tolerances below are float32's)
    task = GenCITask(cfg, FEATURES, assets, torch.device("cpu"))
    batch = random_batch(12, 6, assets, 60, seed)
    return task, batch


def widen(batch: Batch, extra_items: int) -> Batch:
    """The same samples padded to a longer history (as without length bucketing)."""
    t = batch.history_tokens
    per_item = batch.target_tokens.shape[1]
    pad = t.new_zeros(t.shape[0], extra_items * per_item)
    h = batch.history
    return dataclasses.replace(
        batch, history_tokens=torch.cat([t, pad], 1),
        history=torch.cat([h, h.new_zeros(h.shape[0], extra_items)], 1))


def loss_and_grads(task: GenCITask, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    task.zero_grad()
    loss, *_ = task(batch)
    loss.backward()
    return loss.detach(), grads(task)


def assert_same_step(task: GenCITask, ref: GenCITask, batch: Batch, ref_batch: Batch | None = None,
                     atol: float = 1e-7) -> None:
    """A training step of `task` on `batch` gives `ref`'s loss and every gradient on
    `ref_batch` (default: the same batch); float32 tolerances, rtol 1e-6 / 1e-5."""
    task.train()
    ref.train()
    got = loss_and_grads(task, batch)
    want = loss_and_grads(ref, batch if ref_batch is None else ref_batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=atol, msg=name)


def test_padding_width_does_not_change_loss_or_gradients() -> None:
    """Length bucketing only changes how far a batch is padded: the loss and all gradients
    agree (float32: rtol 1e-5, atol 1e-7) between the natural width and 9 extra padded items."""
    task, batch = task_and_batch(3)
    assert_same_step(task, task, widen(batch, 9), batch)


def test_generation_reusing_cross_kv_equals_recomputing() -> None:
    task, batch = task_and_batch(4, beam_width=3, absorb_cross_attention=False,
                                 reuse_cross_kv=True)
    gen = task.generator.eval()
    with torch.no_grad():
        enc, mask = gen.encode(batch.history_tokens)
        _, kv = gen.ntp_logits_and_cross_kv(enc, mask, batch.target_tokens, keep=True)
        assert kv is not None and len(kv) == CFG.num_decoder_layers
        for beam in (1, 3):
            plain = gen.beam_search(enc, mask, task.trie, beam)
            cached = gen.beam_search(enc, mask, task.trie, beam, cross_kv=kv)
            assert torch.equal(plain[0], cached[0])
            torch.testing.assert_close(plain[1], cached[1], rtol=1e-6, atol=1e-6)
        # the cached keys/values really are what generation uses
        junk = [(torch.randn_like(k), torch.randn_like(v)) for k, v in kv]
        other = gen.beam_search(enc, mask, task.trie, 3, cross_kv=junk)
        assert not torch.equal(other[1], plain[1])
    # and the whole task gives the same loss and gradients either way
    task_b, _ = task_and_batch(4, beam_width=3, absorb_cross_attention=False)
    assert task.cfg.reuse_cross_kv and not task_b.cfg.reuse_cross_kv
    assert_same_step(task, task_b, batch)


def test_encoding_identical_histories_once_is_exact() -> None:
    task, batch = task_and_batch(5, dedup_histories=True)
    ref, _ = task_and_batch(5)
    rows = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 5, 0, 6, 7])   # copies of rows 0 and 1
    batch = dataclasses.replace(batch, history_tokens=batch.history_tokens[rows],
                                history=batch.history[rows])
    gen = task.generator.eval()
    with torch.no_grad():
        enc, mask = gen.encode(batch.history_tokens)
        enc_ref, mask_ref = ref.generator.eval().encode(batch.history_tokens)
    torch.testing.assert_close(enc, enc_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(enc[0], enc[2]) and torch.equal(enc[1], enc[4])
    assert_same_step(task, ref, batch)


@pytest.mark.parametrize("chunk", [1, 5])
def test_generator_chunks_give_the_same_loss_and_gradients(chunk: int) -> None:
    """model.generator_chunk runs encoder, NTP decoder and generation over slices of the
    batch (12 samples here, slices of 1 and of 5 with a short last one)."""
    whole, batch = task_and_batch(6, generator_chunk=0, beam_width=2)
    sliced, _ = task_and_batch(6, generator_chunk=chunk, beam_width=2)
    assert_same_step(sliced, whole, batch)


@pytest.mark.parametrize("chunk", [0, 5])
def test_evaluation_encodes_and_generates_each_distinct_history_once(chunk: int) -> None:
    """model.dedup_eval_histories: in eval mode the encoder and generation run on the 8
    distinct histories of a 12-sample batch (rows 0 and 1 repeated, with their own targets and
    labels), in slices of `chunk`; the loss, its parts, the logits and the intents equal
    those of the per-sample pass (float32: rtol 1e-6, atol 1e-6)."""
    task, batch = task_and_batch(7, dedup_eval_histories=True, generator_chunk=chunk,
                                 beam_width=2)
    ref, _ = task_and_batch(7, dedup_eval_histories=False, generator_chunk=chunk,
                            beam_width=2)
    rows = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 5, 0, 6, 7])
    batch = dataclasses.replace(batch, history_tokens=batch.history_tokens[rows],
                                history=batch.history[rows])
    encoded: list[int] = []
    task.generator.t5.encoder.register_forward_hook(
        lambda _m, args, kwargs, _out: encoded.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    task.eval()
    ref.eval()
    with torch.no_grad():
        loss, parts, logit, _ = task(batch)
        assert sum(encoded) == 8
        want_loss, want_parts, want_logit, _ = ref(batch)
        got_intents, want_intents = task.intents(batch), ref.intents(batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert parts.keys() == want_parts.keys() == {"ctr", "ntp", "sr"}
    for k in parts:
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-6, atol=1e-6, msg=k)
    torch.testing.assert_close(logit, want_logit, rtol=1e-6, atol=1e-6)
    for k in want_intents:
        torch.testing.assert_close(got_intents[k], want_intents[k], rtol=1e-6, atol=1e-6)
    # in training mode every sample is encoded (the flag is for evaluation only)
    encoded.clear()
    task.train()
    task(batch)
    assert sum(encoded) == 12
    # a batch of empty histories only (0 tokens wide) is evaluated per sample, as before
    empty = dataclasses.replace(batch, history_tokens=batch.history_tokens[:, :0],
                                history=batch.history[:, :0],
                                history_lengths=torch.zeros_like(batch.history_lengths))
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(empty)[2], ref(empty)[2], rtol=1e-6, atol=1e-6)
