"""GenCITask and BaselineTask on real batches of a tiny prepared dataset (semantic IDs and
cohorts written by the tokenizer's own writers, see conftest.write_tiny_dataset): loss
composition, the four ablation switches, ntp_on, cohort lookup, and the baseline heads against
hand-computed cases (float64)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipes.batch import Batch
from data_pipes.schema import feature_specs, load_manifest
from data_pipes.stream import build_loader
from genci_dist.model.build import batch_fields, build_task, load_generation_assets
from genci_dist.model.config import ModelConfig
from genci_dist.model.heads import DCNv2, DeepFM, DINAttention, fm_interaction
from genci_dist.tokenizer.semantic_ids import load_semantic_ids

SMALL = ModelConfig(d_model=16, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                    num_heads=2, d_kv=8, mlp=(32,), deepfm_mlp=(16,), attn_heads=2,
                    dropout=0.0, deepfm_dropout=0.0, attn_dropout=0.0, din_attention_mlp=(8,))


def make_task(ds: Path, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    m = load_manifest(ds)
    torch.manual_seed(seed)
    return build_task(cfg, feature_specs(m), load_generation_assets(ds, m, cfg),
                      torch.device("cpu"))


def first_batch(ds: Path, batch_size: int = 64) -> Batch:
    return next(iter(build_loader(ds, "train", batch_size=batch_size, seed=0)))


@pytest.fixture(scope="module")
def batch(tiny_dataset: Path) -> Batch:
    b = first_batch(tiny_dataset)
    assert 0 < int(b.labels.sum()) < b.size          # both classes present
    assert (b.history_lengths == 0).any() and (b.history_lengths > 1).any()
    return b


def nonzero_grads(task: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in task.named_parameters()}


def _fail(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("an ablated branch was run")


# ---- loss composition --------------------------------------------------------------------------

def test_loss_is_ctr_plus_mu_ntp_plus_eta_sr_recomputed_in_float64(tiny_dataset: Path,
                                                                    batch: Batch) -> None:
    """loss = ctr + mu*ntp + eta*sr, and each part equals its definition recomputed from the
    task's own submodules in float64: ctr = BCE(logit, y); ntp = mean token CE of the teacher-
    forced decoder over the clicked samples; sr = BCE(logit, sigmoid(t)) + BCE(t, y) with t the
    DeepFM teacher's logit."""
    task = make_task(tiny_dataset, dataclasses.replace(SMALL, mu=0.7, eta=1.9)).eval()
    with torch.no_grad():
        loss, parts, logit, labels = task(batch)
        assert set(parts) == {"ctr", "ntp", "sr"}
        assert torch.equal(labels, batch.labels) and logit.shape == (batch.size,)
        assert loss.item() == pytest.approx(
            parts["ctr"].item() + 0.7 * parts["ntp"].item() + 1.9 * parts["sr"].item(),
            rel=1e-6)
        y, z = batch.labels.double(), logit.double()
        bce = F.binary_cross_entropy_with_logits
        assert parts["ctr"].item() == pytest.approx(bce(z, y).item(), rel=1e-5)
        enc, mask = task.generator.encode(batch.history_tokens)
        tt = batch.target_tokens
        lp = task.generator.ntp_logits(enc, mask, tt).double().log_softmax(-1)
        ce = -lp.gather(2, tt[:, :, None])[:, :, 0].mean(1)
        assert parts["ntp"].item() == pytest.approx(ce[y == 1].mean().item(), rel=1e-5)
        fields, _, _ = task.sparse(batch.sparse_features)
        t = task.teacher(fields).double()
        sr = bce(z, torch.sigmoid(t)) + bce(t, y)
        assert parts["sr"].item() == pytest.approx(sr.item(), rel=1e-5)


def test_full_model_gives_every_parameter_a_gradient(tiny_dataset: Path, batch: Batch) -> None:
    """Nothing is dead in the full model (DDP would need find_unused_parameters otherwise)."""
    task = make_task(tiny_dataset, SMALL)
    task(batch)[0].backward()
    g = nonzero_grads(task)
    assert all(g.values()), [n for n, v in g.items() if not v]
    for prefix in ("generator.t5.encoder.", "generator.t5.decoder.", "cohort_attn.",
                   "intent_emb.", "teacher.", "mlp.", "sparse.ebc."):
        assert any(n.startswith(prefix) for n in g), prefix


# ---- ablations -------------------------------------------------------------------------------

ABLATIONS = [  # switch, loss part removed, modules removed (absent or without gradient),
    #            method that must not run, parts whose value must not change
    ("use_ntp", "ntp", ("generator.t5.decoder.",), "ntp_logits", ("ctr", "sr")),
    ("use_sr", "sr", ("teacher.",), None, ("ctr", "ntp")),
    ("use_st_intent", None, ("cohort_attn.", "intent_emb."), "beam_search", ("ntp",)),
    ("use_lt_intent", None, (), "last_valid", ("ntp",)),
]


@pytest.mark.parametrize("switch, gone_part, gone_modules, not_called, same_parts", ABLATIONS)
def test_each_ablation_removes_exactly_its_term(tiny_dataset: Path, batch: Batch, switch: str,
                                                gone_part: str | None,
                                                gone_modules: tuple[str, ...],
                                                not_called: str | None,
                                                same_parts: tuple[str, ...]) -> None:
    """With the full model's weights loaded wherever shapes agree: the ablated task's parts
    lose exactly the ablated key, the untouched parts keep their exact value, the ablated
    computation is never run, its modules are absent (or, for the T5 decoder that generation
    still uses, get no gradient) and every other parameter gets a gradient; removing an intent
    vector shrinks the Eq. 10 MLP input by d_model."""
    full = make_task(tiny_dataset, SMALL).eval()
    abl = make_task(tiny_dataset, dataclasses.replace(SMALL, **{switch: False}), seed=1).eval()
    full_sd = full.state_dict()
    own = abl.state_dict()
    shared = {k: v for k, v in full_sd.items() if k in own and own[k].shape == v.shape}
    abl.load_state_dict(shared, strict=False)
    if not_called is not None:
        setattr(abl.generator, not_called, _fail)
    with torch.no_grad():
        _, full_parts, _, _ = full(batch)
    loss, parts, _, _ = abl(batch)
    assert set(parts) == {"ctr", "ntp", "sr"} - {gone_part}
    for k in same_parts:
        assert parts[k].item() == pytest.approx(full_parts[k].item(), rel=1e-6, abs=1e-7), k
    n_feat = len(load_manifest(tiny_dataset)["features"])
    width = n_feat * SMALL.embedding_dim + 2 * SMALL.d_model
    drop = SMALL.d_model if switch in ("use_st_intent", "use_lt_intent") else 0
    assert abl.mlp[0].in_features == width - drop
    loss.backward()
    g = nonzero_grads(abl)
    for n, has in g.items():
        if n.startswith(gone_modules):
            assert switch == "use_ntp" and not has, n   # only the decoder stays, gradient-free
        else:
            assert has, n
    if switch == "use_ntp":
        assert any(n.startswith("generator.t5.decoder.") for n in g)
    elif gone_modules:
        assert not any(n.startswith(gone_modules) for n in g)
    if switch == "use_sr":
        assert abl.teacher is None


# ---- ntp_on ----------------------------------------------------------------------------------

def _swap_negative_targets(batch: Batch) -> Batch:
    """A copy whose negative samples' target tokens are replaced by a positive sample's."""
    tt = batch.target_tokens.clone()
    pos = int((batch.labels == 1).nonzero()[0])
    neg = batch.labels == 0
    differs = (tt[neg] != tt[pos]).any(1)
    assert differs.any()
    tt[neg] = tt[pos].clone()
    return dataclasses.replace(batch, target_tokens=tt)


def test_ntp_on_positive_ignores_negatives_and_all_does_not(tiny_dataset: Path,
                                                           batch: Batch) -> None:
    """ntp_on="positive": changing a negative sample's target tokens leaves L_NTP unchanged;
    "all": it changes, and L_NTP is the plain mean over every sample (float64 recompute)."""
    changed = _swap_negative_targets(batch)
    pos_task = make_task(tiny_dataset, SMALL).eval()
    all_task = make_task(tiny_dataset, dataclasses.replace(SMALL, ntp_on="all")).eval()
    with torch.no_grad():
        a, b = pos_task(batch)[1]["ntp"], pos_task(changed)[1]["ntp"]
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        c, d = all_task(batch)[1]["ntp"], all_task(changed)[1]["ntp"]
        assert abs(c.item() - d.item()) > 1e-3
        enc, mask = all_task.generator.encode(batch.history_tokens)
        tt = batch.target_tokens
        lp = all_task.generator.ntp_logits(enc, mask, tt).double().log_softmax(-1)
        assert c.item() == pytest.approx(-lp.gather(2, tt[:, :, None]).mean().item(), rel=1e-5)


def test_ntp_positive_is_zero_without_positives(tiny_dataset: Path, batch: Batch) -> None:
    """A batch without clicks: L_NTP = 0 (not NaN) and the loss still backpropagates."""
    neg = dataclasses.replace(batch, labels=torch.zeros_like(batch.labels))
    task = make_task(tiny_dataset, SMALL)
    loss, parts, _, _ = task(neg)
    assert parts["ntp"].item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in task.parameters())


# ---- cohort lookup of generated codes --------------------------------------------------------

@pytest.mark.parametrize("mode", ["code", "prefix"])
def test_generated_codes_map_to_the_right_cohort_members(tiny_dataset: Path, mode: str) -> None:
    """cohort_ids(codes) points at the CSR cohort whose members are, by brute force over the
    semantic IDs, the items with the same level-n code (code mode) or the same prefix
    c_0..c_n (prefix mode)."""
    m = load_manifest(tiny_dataset)
    sids = load_semantic_ids(tiny_dataset, expected=m)
    task = make_task(tiny_dataset, dataclasses.replace(SMALL, cohort_mode=mode))
    codes = torch.from_numpy(sids.codes.astype("int64"))
    cids = task.cohort_ids(codes)
    assert (cids >= 0).all()
    ptr, mem = task.cohort_indptr, task.cohort_members
    for i, n in itertools.product(range(codes.shape[0]), range(codes.shape[1])):
        c = int(cids[i, n])
        got = sorted(mem[ptr[c]:ptr[c + 1]].tolist())
        if mode == "code":
            ref = [int(j) for j, r in zip(sids.item_ids, sids.codes, strict=True)
                   if r[n] == sids.codes[i, n]]
        else:
            ref = [int(j) for j, r in zip(sids.item_ids, sids.codes, strict=True)
                   if (r[:n + 1] == sids.codes[i, :n + 1]).all()]
        assert got == sorted(ref), (mode, i, n)


@pytest.mark.parametrize("mode, repr_", [("prefix", "member_mean"), ("code", "table"),
                                         ("prefix", "table")])
def test_cohort_variants_train(tiny_dataset: Path, batch: Batch, mode: str, repr_: str) -> None:
    """The other cohort settings run forward + backward with every parameter learning."""
    task = make_task(tiny_dataset, dataclasses.replace(SMALL, cohort_mode=mode,
                                                       cohort_repr=repr_))
    loss, parts, _, _ = task(batch)
    assert torch.isfinite(loss) and set(parts) == {"ctr", "ntp", "sr"}
    loss.backward()
    g = nonzero_grads(task)
    assert all(g.values()), [n for n, v in g.items() if not v]


# ---- baseline heads: hand-computed cases -------------------------------------------------------

def test_fm_interaction_hand_case_and_brute_force() -> None:
    """FM = sum_{i<j} <e_i, e_j>: a hand case (= 9) and random fields vs the pairwise sum."""
    e = torch.tensor([[[1.0, 0.0, 2.0], [-1.0, 3.0, 1.0], [2.0, 2.0, 0.0], [0.0, 1.0, -1.0]]],
                     dtype=torch.float64)
    # pairs: 1 + 2 - 2 + 4 + 2 + 2 = 9
    assert fm_interaction(e).item() == pytest.approx(9.0)
    f = torch.randn(6, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = sum((f[:, i] * f[:, j]).sum(1) for i, j in itertools.combinations(range(5), 2))
    assert torch.allclose(fm_interaction(f), ref)


def test_deepfm_hand_case() -> None:
    """DeepFM with the DNN zeroed: w.flat + b + FM. e1 = (1, 2), e2 = (3, -1), w = (0.5, 0, 0,
    -1), b = 0.25: 0.5 + 1 + 0.25 + <e1, e2> (= 1) = 2.75; with the DNN on, the logit adds the
    DNN output exactly."""
    m = DeepFM(n_fields=2, dim=2, hidden=(3,), dropout=0.0).double().eval()
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=torch.float64)
    with torch.no_grad():
        dnn = m.dnn(x.flatten(1)).item()
        m.linear.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, -1.0]]))
        m.linear.bias.fill_(0.25)
        assert m(x).item() == pytest.approx(2.75 + dnn)
        for p in m.dnn.parameters():
            p.zero_()
        assert m(x).item() == pytest.approx(2.75)


def test_dcnv2_two_cross_layers_hand_case() -> None:
    """x_{l+1} = x0 * (W_l x_l + b_l) + x_l. x0 = (1, 2); W1 = I, b1 = 0 → x1 = (2, 6);
    W2 = [[0, 1], [1, 0]], b2 = (1, -1) → W2 x1 + b2 = (7, 1), x2 = (7, 2) + (2, 6) = (9, 8);
    output reads (1, 2)·x2 + 0.5 = 25.5 (DNN branch weighted 0)."""
    m = DCNv2(n_fields=1, dim=2, layers=2, hidden=(3,), dropout=0.0).double().eval()
    with torch.no_grad():
        m.cross[0].weight.copy_(torch.eye(2))
        m.cross[0].bias.zero_()
        m.cross[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        m.cross[1].bias.copy_(torch.tensor([1.0, -1.0]))
        m.out.weight.zero_()
        m.out.weight[0, :2] = torch.tensor([1.0, 2.0])
        m.out.bias.fill_(0.5)
    assert m(torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)).item() == pytest.approx(25.5)


def test_din_attention_hand_case_and_padding() -> None:
    """weight_j = MLP([h_j, q, h_j - q, h_j * q]), no softmax, 0 on padding. With the score
    reading only the h block, w_j = h_j1 + h_j2 + 1: hist (1, 2), (0, -1), pad (9, 9) → 4 *
    (1, 2) + 0 * (0, -1) = (4, 8). With a hidden layer: the float64 per-position sum over valid
    positions, and padded positions (perturbed arbitrarily) have no influence."""
    att = DINAttention(dim=2, hidden=()).double()
    with torch.no_grad():
        att.att[0].weight.zero_()
        att.att[0].weight[0, :2] = 1.0
        att.att[0].bias.fill_(1.0)
    hist = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [9.0, 9.0]]], dtype=torch.float64)
    q = torch.tensor([[5.0, -3.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False]])
    assert att(hist, valid, q).tolist() == [[4.0, 8.0]]

    torch.manual_seed(0)
    deep = DINAttention(dim=3, hidden=(5,)).double()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, 3, dtype=torch.float64, generator=g)
    qq = torch.randn(4, 3, dtype=torch.float64, generator=g)
    lengths = torch.tensor([0, 1, 4, 6])
    v = torch.arange(6)[None, :] < lengths[:, None]
    out = deep(h, v, qq)
    for b in range(4):
        ref = torch.zeros(3, dtype=torch.float64)
        for j in range(int(lengths[b])):
            w = deep.att(torch.cat([h[b, j], qq[b], h[b, j] - qq[b], h[b, j] * qq[b]]))
            ref += w[0] * h[b, j]
        assert torch.allclose(out[b], ref)
    noisy = h.clone()
    noisy[~v] = 1e3
    assert torch.allclose(deep(noisy, v, qq), out)


# ---- baseline tasks --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "din"])
def test_baseline_tasks_forward_backward(tiny_dataset: Path, batch: Batch, name: str) -> None:
    """Each baseline: loss = BCE(logit, y) (float64 recompute), parts = {"ctr"}, every
    parameter gets a gradient."""
    task = make_task(tiny_dataset, dataclasses.replace(SMALL, name=name))
    loss, parts, logit, labels = task(batch)
    assert set(parts) == {"ctr"} and logit.shape == labels.shape == (batch.size,)
    ref = F.binary_cross_entropy_with_logits(logit.double(), labels.double())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    g = nonzero_grads(task)
    assert all(g.values()), [n for n, v in g.items() if not v]


def test_din_reads_the_batch_history(tiny_dataset: Path, batch: Batch) -> None:
    """DIN's interest vector equals DINAttention over history-table rows of batch.history
    (the sequence KJT is aligned with the dense history), zero for empty histories."""
    task = make_task(tiny_dataset, dataclasses.replace(SMALL, name="din")).eval()
    seen: list[Tensor] = []
    hook = task.head.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        task(batch)
        hook.remove()
        e = SMALL.embedding_dim
        interest = seen[0][:, -e:]
        w = task.history.embeddings["t_din_history"].weight
        fields, _, _ = task.sparse(batch.sparse_features)
        valid = batch.history > 0
        assert torch.equal(valid.sum(1), batch.history_lengths)
        ref = task.attention(w[batch.history], valid, fields[:, task.item_index])
    assert torch.allclose(interest, ref, atol=1e-6)
    assert (interest[batch.history_lengths == 0] == 0).all()
    assert (interest[batch.history_lengths > 0].abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", ["genci", "deepfm", "dcnv2", "din"])
def test_each_model_reads_only_its_batch_fields(tiny_dataset: Path, batch: Batch,
                                                name: str) -> None:
    """The reader builds only the history forms batch_fields names (GenCI: tokens; DIN: item
    ids): on that slimmer batch every model's loss and logits equal those on the full batch,
    and DIN fed a batch without the item ids says what is missing."""
    cfg = dataclasses.replace(SMALL, name=name)
    task = make_task(tiny_dataset, cfg).eval()
    slim = next(iter(build_loader(tiny_dataset, "train", batch_size=batch.size, seed=0,
                                  **batch_fields(cfg))))
    assert torch.equal(slim.row_ids, batch.row_ids)
    assert (slim.history.shape[1] > 0) == (name == "din")
    assert (slim.history_tokens.shape[1] > 0) == (name == "genci")
    with torch.no_grad():
        torch.manual_seed(0)
        loss, _, logit, _ = task(batch)
        torch.manual_seed(0)
        loss_slim, _, logit_slim, _ = task(slim)
    assert torch.equal(loss, loss_slim) and torch.equal(logit, logit_slim)
    if name == "din":
        no_ids = next(iter(build_loader(tiny_dataset, "train", batch_size=batch.size, seed=0,
                                        with_tokens=False, with_history_ids=False)))
        with pytest.raises(ValueError, match="with_history_ids=True"):
            task(no_ids)
