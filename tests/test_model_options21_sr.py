"""GenCI's self-regularisation (SR) teacher options: model.sr_teacher_history (the teacher
also reads the mean-pooled history item-id embedding, as the official teacher does) and
model.sr_detach_teacher (L_SR's soft target σ(t) carries no gradient to the teacher), each
against a float64 hand computation on a real batch of the tiny dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from data_pipes.batch import Batch
from data_pipes.schema import load_manifest
from data_pipes.stream import build_loader
from genci_dist.model.build import batch_fields
from tests.test_model_task import SMALL, first_batch, make_task

HIST = dataclasses.replace(SMALL, sr_teacher_history=True)


@pytest.fixture(scope="module")
def batch(tiny_dataset: Path) -> Batch:
    b = first_batch(tiny_dataset)  # the reader's default batch holds the history's item ids
    assert 0 < int(b.labels.sum()) < b.size
    assert (b.history_lengths == 0).any() and (b.history_lengths > 1).any()
    assert (b.history_lengths < b.history.shape[1]).any()  # some rows are padded
    return b


def _capture_teacher(task: nn.Module) -> dict[str, Tensor]:
    """Records the teacher's input fields and its logit t (retaining t's gradient)."""
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        seen["fields"] = args[0].detach()
        if out.requires_grad:
            out.retain_grad()
        seen["t"] = out

    task.teacher.register_forward_hook(hook)
    return seen


# ---- sr_teacher_history ----------------------------------------------------------------------

def test_history_field_is_the_padding_masked_mean_of_the_history_items(tiny_dataset: Path,
                                                                       batch: Batch) -> None:
    """The pooled field equals, in float64 from the table's rows, Σ_{j<len} W[h_j] / len for
    each sample (the padded positions of `history` ignored) and 0 for an empty history."""
    task = make_task(tiny_dataset, HIST).eval()
    w = task.sr_history.ebc.embedding_bags["t_sr_history"].weight.detach().double()
    with torch.no_grad():
        pooled = task.sr_history(batch.sequence_features).double()
    ref = torch.zeros(batch.size, HIST.embedding_dim, dtype=torch.float64)
    for i in range(batch.size):
        n = int(batch.history_lengths[i])
        for j in range(n):
            ref[i] += w[batch.history[i, j]]
        if n:
            ref[i] /= n
    assert torch.allclose(pooled, ref, rtol=0, atol=1e-6)
    assert (pooled[batch.history_lengths == 0] == 0).all()


def test_teacher_reads_one_more_field_the_pooled_history(tiny_dataset: Path,
                                                         batch: Batch) -> None:
    """The teacher's input grows by one field of width e (its first-order linear, FM and deep
    part all see it): fields = [the F feature embeddings; the pooled history]; the Eq. 10 MLP
    is unchanged; without the option the teacher reads the F fields only."""
    n_feat = len(load_manifest(tiny_dataset)["features"])
    e = SMALL.embedding_dim
    plain = make_task(tiny_dataset, SMALL).eval()
    task = make_task(tiny_dataset, HIST).eval()
    assert plain.teacher.linear.in_features == n_feat * e and plain.sr_history is None
    assert task.teacher.linear.in_features == (n_feat + 1) * e
    assert task.teacher.dnn[0].in_features == (n_feat + 1) * e
    assert task.mlp[0].in_features == plain.mlp[0].in_features
    seen = _capture_teacher(task)
    with torch.no_grad():
        task(batch)
        fields, _, _ = task.sparse(batch.sparse_features)
        pooled = task.sr_history(batch.sequence_features)
    assert seen["fields"].shape == (batch.size, n_feat + 1, e)
    assert torch.equal(seen["fields"][:, :n_feat], fields)
    assert torch.equal(seen["fields"][:, n_feat], pooled)


def test_history_table_trains_and_batch_fields_ask_for_the_ids(tiny_dataset: Path,
                                                               batch: Batch) -> None:
    """The history table gets a gradient (through L_SR only); batch_fields asks the reader for
    the item ids only when the teacher reads them (GenCI with use_sr); a batch without them
    is refused with what to do."""
    task = make_task(tiny_dataset, HIST)
    task(batch)[0].backward()
    g = task.sr_history.ebc.embedding_bags["t_sr_history"].weight.grad
    assert g is not None and g.abs().sum() > 0
    dead = [n for n, p in task.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, dead
    assert batch_fields(HIST) == {"with_tokens": True, "with_history_ids": True}
    assert batch_fields(SMALL)["with_history_ids"] is False
    no_sr = dataclasses.replace(HIST, use_sr=False)
    assert batch_fields(no_sr)["with_history_ids"] is False
    assert make_task(tiny_dataset, no_sr).sr_history is None
    assert batch_fields(dataclasses.replace(HIST, name="deepfm"))["with_history_ids"] is False
    slim = next(iter(build_loader(tiny_dataset, "train", batch_size=batch.size, seed=0,
                                  **batch_fields(SMALL))))
    with pytest.raises(ValueError, match="sr_teacher_history.*with_history_ids=True"):
        task(slim)


# ---- sr_detach_teacher -------------------------------------------------------------------------

@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_teacher_logit_gradient_matches_the_hand_derivative(tiny_dataset: Path, batch: Batch,
                                                            detach: bool, eta: float) -> None:
    """L = ctr + μ L_NTP + η [BCE(z, σ(t)) + BCE(t, y)] (means over the B samples); only L_SR
    reads the teacher's logit t, so per sample, in float64 from the run's own z and t:
        ∂L/∂t = η/B [ −z σ(t)(1−σ(t)) + σ(t) − y ]   (soft target not detached)
        ∂L/∂t = η/B [ σ(t) − y ]                     (detached: BCE(z, σ(t)) gives t nothing)
    since ∂BCE(z, p)/∂p = −log σ(z) + log(1−σ(z)) = −z. The two differ on every sample."""
    cfg = dataclasses.replace(SMALL, eta=eta, mu=0.5, sr_detach_teacher=detach)
    task = make_task(tiny_dataset, cfg).train()  # SMALL has every dropout at 0
    seen = _capture_teacher(task)
    loss, _, z, y = task(batch)
    loss.backward()
    t = seen["t"].detach().double()
    z, y = z.double(), y.double()
    s = torch.sigmoid(t)
    soft_term = torch.zeros_like(t) if detach else -z * s * (1 - s)
    ref = eta / batch.size * (soft_term + s - y)
    got = seen["t"].grad.double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-9)
    undetached_extra = eta / batch.size * (-z * s * (1 - s))
    assert (undetached_extra.abs() > 1e-9).all()  # the check tells the two cases apart
