"""Hierarchical candidate-aware intent (Eqs. 8-9): cohort → history attention with the
history's padding masked, then target → refined-cohort attention."""

from __future__ import annotations

from torch import Tensor, nn


class CohortIntent(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, share: bool) -> None:
        super().__init__()
        self.refine = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        # share = the official code's single module for both attentions (SPEC §4)
        self.target = self.refine if share else nn.MultiheadAttention(
            d_model, heads, dropout=dropout, batch_first=True)

    def forward(self, e_c: Tensor, h_enc: Tensor, mask: Tensor, e_v: Tensor) -> Tensor:
        """e_c [B, N, d] cohorts, h_enc [B, S, d], mask [B, S] (1 = valid), e_v [B, d]
        → H_STI [B, d]."""
        e_r, _ = self.refine(e_c, h_enc, h_enc, key_padding_mask=mask == 0,
                             need_weights=False)                       # Eq. 8: [B, N, d]
        h_sti, _ = self.target(e_v[:, None, :], e_r, e_r, need_weights=False)  # Eq. 9
        return h_sti[:, 0]
