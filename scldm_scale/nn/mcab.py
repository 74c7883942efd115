"""Transformer blocks: MCAB (cross-attention, pooling and unpooling) and self-attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scldm_scale.nn.attention import MultiheadAttention
from scldm_scale.nn.packing import Packing


class MLP(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        d_hidden = int(d_model * mlp_ratio)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_nqd: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x_nqd))))  # (n, q, d)


class MCAB(nn.Module):
    """Multi-head Cross-Attention Block: pre-norm cross-attention then MLP on the query stream.

    Pooling: m learned queries over a cell's gene tokens (permutation invariant).
    Unpooling: one query per gene over the m latent tokens (permutation equivariant).
    ``key_bias_nk`` is an optional log-prior over the keys added to the attention scores.
    Either stream may be packed rows of variable-length cells (``q_pack`` / ``kv_pack``), so that
    the per-row work (norms, projections, MLP) runs on real rows only; padded batches use
    ``key_mask_nk`` instead. ``query_mask_nq`` (bool, True = real query) leaves masked query rows
    at their attention output (no MLP update). With ``q_index`` the query stream is a table whose
    rows ``q_index`` are the queries: its norm and q projection run once per table row.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_kv = nn.LayerNorm(d_model)
        self.attn = MultiheadAttention(d_model, n_heads, dropout=dropout, cross=True)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, q_nqd: Tensor, kv_nkd: Tensor, key_mask_nk: Tensor | None = None,
                key_bias_nk: Tensor | None = None, query_mask_nq: Tensor | None = None,
                q_pack: Packing | None = None, kv_pack: Packing | None = None,
                q_index: Tensor | None = None) -> Tensor:
        attn = self.attn(self.ln_q(q_nqd), self.ln_kv(kv_nkd), key_mask_nk, key_bias_nk, q_pack, kv_pack,
                         q_index)  # (n, q, d) or packed (Q, d)
        if q_index is not None:  # q_nqd was a table of query features: the queries are its rows q_index
            q_nqd = q_nqd[q_index]  # (n, q, d) or (Q, d)
        q_nqd = q_nqd + attn  # (n, q, d) or (Q, d)
        out_nqd = q_nqd + self.mlp(self.ln_mlp(q_nqd))  # (n, q, d) or (Q, d)
        if query_mask_nq is None:
            return out_nqd
        return torch.where(query_mask_nq.unsqueeze(-1), out_nqd, q_nqd)  # (n, q, d)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: self-attention then MLP."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, x_nmd: Tensor, key_mask_nm: Tensor | None = None) -> Tensor:
        x_nmd = x_nmd + self.attn(self.ln_attn(x_nmd), key_mask_nk=key_mask_nm)  # (n, m, d), fused qkv
        x_nmd = x_nmd + self.mlp(self.ln_mlp(x_nmd))  # (n, m, d)
        return x_nmd
