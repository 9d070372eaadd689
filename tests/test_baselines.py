"""DeepFM, DCNv2 and DIN heads against small hand-computed cases (float64)."""

from __future__ import annotations

import pytest
import torch

from genci_dist.model.heads import DCNv2, DeepFM, DINAttention, fm_interaction


def test_fm_interaction_hand_case() -> None:
    # fields e1 = (1, 2), e2 = (3, -1), e3 = (0, 4): Σ_{i<j} <e_i, e_j>
    # <e1,e2> = 3 - 2 = 1, <e1,e3> = 8, <e2,e3> = -4 → 5
    fields = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]]], dtype=torch.float64)
    assert fm_interaction(fields).item() == pytest.approx(5.0)


def test_deepfm_is_linear_plus_fm_plus_dnn() -> None:
    torch.manual_seed(0)
    m = DeepFM(n_fields=3, dim=2, hidden=(4,), dropout=0.0).double().eval()
    fields = torch.randn(5, 3, 2, dtype=torch.float64)
    flat = fields.flatten(1)
    ref = (m.linear(flat) + m.dnn(flat)).squeeze(-1) + fm_interaction(fields)
    assert torch.allclose(m(fields), ref)
    with torch.no_grad():  # zero the deep part and the linear weights: only bias + FM remain
        for p in [*m.dnn.parameters(), m.linear.weight]:
            p.zero_()
        m.linear.bias.fill_(0.5)
    one = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]]], dtype=torch.float64)
    assert m(one).item() == pytest.approx(5.5)


def test_dcnv2_cross_layer_hand_case() -> None:
    m = DCNv2(n_fields=1, dim=2, layers=1, hidden=(3,), dropout=0.0).double().eval()
    with torch.no_grad():
        m.cross[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        m.cross[0].bias.copy_(torch.tensor([0.5, -1.0]))
        m.out.weight.zero_()
        m.out.weight[0, :2] = torch.tensor([1.0, 1.0])   # read the cross output only
        m.out.bias.zero_()
    x = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    # x1 = x0 * (W x0 + b) + x0 = (2, 3) * ((2, 5) + (0.5, -1)) + (2, 3) = (7, 15)
    assert m(x).item() == pytest.approx(22.0)


def test_din_attention_weights_and_padding() -> None:
    att = DINAttention(dim=2, hidden=()).double()
    with torch.no_grad():  # weight_j = <h_j, q> through the hidden-less MLP's last linear
        lin = att.att[0]
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 6:8] = 1.0     # the h ⊙ q block of [h, q, h - q, h ⊙ q]
    hist = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False]])
    q = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    # weights: <(1,0),(3,1)> = 3, <(0,2),(3,1)> = 2, padded → 0: 3*(1,0) + 2*(0,2) = (3, 4)
    assert att(hist, valid, q).tolist() == [[3.0, 4.0]]
