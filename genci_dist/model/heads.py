"""Prediction heads on the shared sparse arch: the Eq. 10 MLP, DeepFM (also GenCI's SR
teacher), DCNv2 and DIN."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(in_dim: int, hidden: tuple[int, ...], dropout: float, out_dim: int | None = 1,
        dropout_at: str = "after") -> nn.Sequential:
    """Hidden blocks (+ a final linear to out_dim, no dropout in front of it), Xavier-uniform
    initialised with zero biases.

    dropout_at = "after": Linear→ReLU→Dropout blocks (this project's default: no dropout on
    the MLP's input). "before": Dropout→Linear→ReLU blocks, RecBole's MLPLayers as the
    official GenCI release uses them: the first block drops the MLP's input itself."""
    if dropout_at not in ("after", "before"):
        raise ValueError(f"mlp dropout_at must be 'after' or 'before', got {dropout_at!r}")
    layers: list[nn.Module] = []
    for h in hidden:
        if dropout_at == "before":
            layers += [nn.Dropout(dropout), nn.Linear(in_dim, h), nn.ReLU()]
        else:
            layers += [nn.Linear(in_dim, h), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = h
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    seq = nn.Sequential(*layers)
    for m in seq.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return seq


def fm_interaction(fields: Tensor) -> Tensor:
    """Second-order FM term 0.5 Σ_d [(Σ_f e_fd)² − Σ_f e_fd²] for fields [B, F, e] → [B]."""
    s = fields.sum(1)
    return 0.5 * (s * s - (fields * fields).sum(1)).sum(1)


class DeepFM(nn.Module):
    """logit = w·concat(fields) + b + FM(fields) + DNN(concat(fields)). The first-order term
    is a linear map of the field embeddings (no separate width-1 tables)."""

    def __init__(self, n_fields: int, dim: int, hidden: tuple[int, ...], dropout: float,
                 dropout_at: str = "after") -> None:
        super().__init__()
        self.linear = nn.Linear(n_fields * dim, 1)
        self.dnn = mlp(n_fields * dim, hidden, dropout, dropout_at=dropout_at)

    def forward(self, fields: Tensor) -> Tensor:
        flat = fields.flatten(1)
        return (self.linear(flat) + self.dnn(flat)).squeeze(-1) + fm_interaction(fields)


class DCNv2(nn.Module):
    """x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l (full-rank cross), parallel DNN, linear on both."""

    def __init__(self, n_fields: int, dim: int, layers: int, hidden: tuple[int, ...],
                 dropout: float, dropout_at: str = "after") -> None:
        super().__init__()
        d = n_fields * dim
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.dnn = mlp(d, hidden, dropout, out_dim=None, dropout_at=dropout_at)
        self.out = nn.Linear(d + (hidden[-1] if hidden else d), 1)

    def forward(self, fields: Tensor) -> Tensor:
        x0 = x = fields.flatten(1)
        for lin in self.cross:
            x = x0 * lin(x) + x
        return self.out(torch.cat([x, self.dnn(x0)], dim=1)).squeeze(-1)


class DINAttention(nn.Module):
    """Local activation unit: weight_j = MLP([h_j, q, h_j − q, h_j ⊙ q]); padded positions get
    weight 0 (no softmax, as in DIN); returns Σ_j weight_j h_j."""

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.att = mlp(4 * dim, hidden, 0.0)

    def forward(self, hist: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        """hist [B, L, e], mask [B, L] bool, query [B, e] → [B, e]."""
        q = query[:, None, :].expand_as(hist)
        w = self.att(torch.cat([hist, q, hist - q, hist * q], dim=-1)).squeeze(-1)
        w = w.masked_fill(~mask, 0.0)
        return (w[:, :, None] * hist).sum(1)
