"""Transformer blocks: MCAB (cross-attention, pooling and unpooling) and self-attention."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scldm_scale.nn.attention import MultiheadAttention
from scldm_scale.nn.packing import Packing


def rowwise(fn: Callable[..., Tensor], n_chunks: int, *rows: Tensor) -> Tensor:
    """``fn`` of a row-wise computation on packed rows (tensors whose first axis is the row) applied
    to ``n_chunks`` consecutive slices of the rows (all at once when ``n_chunks`` <= 1, or when the
    first tensor is not rows ``(R, d)`` / ``(R,)``). Chunks keep the temporary buffers of the
    forward and backward passes small; the result is the same. The number of chunks, not their
    size, is fixed, so every step calls the same modules in the same order whatever the batch
    (DeepSpeed ZeRO-3 records that order to prefetch parameters)."""
    if n_chunks <= 1 or rows[0].dim() > 2:
        return fn(*rows)
    return torch.cat([fn(*parts) for parts in zip(*(x.tensor_split(n_chunks) for x in rows))])  # (R, ...)


class _GeluLinearFunction(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` keeping only ``h`` for the backward pass."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, weight = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])  # (rows, d_out)
        if ctx.needs_input_grad[1]:
            grad_w = grad_y2.T @ F.gelu(h).reshape(-1, h.shape[-1])  # (d_out, d_hidden)
        if ctx.needs_input_grad[2]:
            grad_b = grad_y2.sum(0)
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_y @ weight, h)  # (..., d_hidden)
        return grad_h, grad_w, grad_b


class GeluLinear(nn.Linear):
    """``nn.Linear`` of ``gelu(input)`` that recomputes the GELU in the backward pass (one pointwise
    op) instead of keeping it: the MLP's saved activations shrink by its widest tensor. Same
    parameters and state dict as ``nn.Linear``."""

    def forward(self, h: Tensor) -> Tensor:
        return _GeluLinearFunction.apply(h, self.weight, self.bias)


class MLP(nn.Module):
    """Two-layer GELU MLP (the GELU recomputed in the backward pass, see :class:`GeluLinear`)."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        d_hidden = int(d_model * mlp_ratio)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = GeluLinear(d_hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_nqd: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.fc1(x_nqd)))  # (n, q, d), GELU between the two


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
    ``row_chunks`` > 1 runs the MLP on packed query rows in that many chunks (the same result;
    smaller temporary buffers in the forward and backward passes).
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
                q_index: Tensor | None = None, row_chunks: int = 0) -> Tensor:
        attn = self.attn(self.ln_q(q_nqd), self.ln_kv(kv_nkd), key_mask_nk, key_bias_nk, q_pack, kv_pack,
                         q_index)  # (n, q, d) or packed (Q, d)
        if q_index is not None:  # q_nqd was a table of query features: the queries are its rows q_index
            q_nqd = q_nqd[q_index]  # (n, q, d) or (Q, d)
        q_nqd = q_nqd + attn  # (n, q, d) or (Q, d)
        if q_pack is None:
            row_chunks = 0  # (n, q, d) queries: all at once
        out_nqd = rowwise(lambda x_cd: x_cd + self.mlp(self.ln_mlp(x_cd)), row_chunks, q_nqd)  # (n, q, d) or (Q, d)
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
