"""Attention: the single place that chooses the kernel.

``attention`` uses ``flash_attn_varlen_func`` (keys unpadded with the mask, queries dense)
when flash-attn is installed, the tensors are on CUDA and the dtype is fp16/bf16; otherwise
``torch.nn.functional.scaled_dot_product_attention`` with a boolean key padding mask
(which itself dispatches to the Flash / memory-efficient / math backends).

Masks are bool, True = real token. A query whose keys are all masked returns zeros. An optional
additive ``key_bias_nk`` (float, a log-prior over the keys, the same for every query and head) is
added to the attention scores; it always takes the SDPA path (flash-attn has no per-key bias).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """``flash_attn_varlen_func`` if flash-attn is importable, else None (cached)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_varlen_func


def _use_flash(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256 and _flash_varlen() is not None


def _flash_attention(q_nhqd: Tensor, k_nhkd: Tensor, v_nhkd: Tensor, key_mask_nk: Tensor | None) -> Tensor:
    """flash-attn varlen path: dense queries, keys packed by the mask."""
    n, h, q, d = q_nhqd.shape
    k = k_nhkd.shape[2]
    device = q_nhqd.device
    if key_mask_nk is None:
        key_mask_nk = torch.ones(n, k, dtype=torch.bool, device=device)
    q_Qhd = q_nhqd.transpose(1, 2).reshape(n * q, h, d)  # (n*q, h, d)
    keep_K = key_mask_nk.reshape(-1).nonzero(as_tuple=True)[0]  # (K,) real keys over the batch
    k_Khd = k_nhkd.transpose(1, 2).reshape(n * k, h, d)[keep_K]  # (K, h, d)
    v_Khd = v_nhkd.transpose(1, 2).reshape(n * k, h, d)[keep_K]  # (K, h, d)
    len_k_n = key_mask_nk.sum(dim=1, dtype=torch.int32)  # (n,)
    max_len_k = int(len_k_n.max().item()) if n else 0
    if max_len_k == 0 or q == 0:  # nothing to attend to / no query
        return torch.zeros_like(q_nhqd)
    cu_k = F.pad(torch.cumsum(len_k_n, 0, dtype=torch.int32), (1, 0))  # (n+1,)
    cu_q = torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=device)  # (n+1,)
    out_Qhd = _flash_varlen()(q_Qhd, k_Khd, v_Khd, cu_q, cu_k, q, max_len_k, dropout_p=0.0, causal=False)
    out_nhqd = out_Qhd.reshape(n, q, h, d).transpose(1, 2)  # (n, h, q, d)
    has_key_n = len_k_n > 0
    return out_nhqd * has_key_n.view(n, 1, 1, 1).to(out_nhqd.dtype)


def attention(q_nhqd: Tensor, k_nhkd: Tensor, v_nhkd: Tensor, key_mask_nk: Tensor | None = None,
              key_bias_nk: Tensor | None = None) -> Tensor:
    """Softmax attention over keys; ``key_mask_nk`` (bool, True = real key), ``key_bias_nk`` (float,
    added to the scores of every query and head). Returns (n, h, q, d)."""
    if key_bias_nk is None and _use_flash(q_nhqd):
        return _flash_attention(q_nhqd, k_nhkd, v_nhkd, key_mask_nk)
    if key_mask_nk is None and key_bias_nk is None:
        return F.scaled_dot_product_attention(q_nhqd, k_nhkd, v_nhkd)  # (n, h, q, d)
    n, k = k_nhkd.shape[0], k_nhkd.shape[2]
    if key_mask_nk is None:
        key_mask_nk = torch.ones(n, k, dtype=torch.bool, device=k_nhkd.device)
    has_key_n = key_mask_nk.any(dim=1)  # (n,)
    # rows without any real key attend to everything (no NaN) and are zeroed afterwards
    safe_mask_nk = key_mask_nk | ~has_key_n[:, None]
    if key_bias_nk is None:
        attn_mask = safe_mask_nk[:, None, None, :]  # (n, 1, 1, k) bool
    else:
        bias_nk = key_bias_nk.to(q_nhqd.dtype).masked_fill(~key_mask_nk, 0.0)  # padding bias never leaks
        attn_mask = bias_nk.masked_fill(~safe_mask_nk, float("-inf"))[:, None, None, :]  # (n, 1, 1, k) float
    out_nhqd = F.scaled_dot_product_attention(q_nhqd, k_nhkd, v_nhkd, attn_mask=attn_mask)  # (n, h, q, d)
    return out_nhqd * has_key_n.view(-1, 1, 1, 1).to(out_nhqd.dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention with a q projection, a fused kv projection and an output projection."""

    def __init__(self, d_model: int, n_heads: int, d_kv: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_kv or d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_nqd: Tensor, kv_nkd: Tensor | None = None, key_mask_nk: Tensor | None = None,
                key_bias_nk: Tensor | None = None) -> Tensor:
        kv_nkd = x_nqd if kv_nkd is None else kv_nkd
        n, q, _ = x_nqd.shape
        k = kv_nkd.shape[1]
        h, dh = self.n_heads, self.d_head
        q_nhqd = self.q_proj(x_nqd).view(n, q, h, dh).transpose(1, 2)  # (n, h, q, dh)
        k_nkhd, v_nkhd = self.kv_proj(kv_nkd).view(n, k, 2, h, dh).unbind(dim=2)  # (n, k, h, dh) x2
        out_nhqd = attention(q_nhqd, k_nkhd.transpose(1, 2), v_nkhd.transpose(1, 2), key_mask_nk,
                             key_bias_nk)  # (n, h, q, dh)
        out_nqd = out_nhqd.transpose(1, 2).reshape(n, q, h * dh)  # (n, q, d)
        return self.dropout(self.out_proj(out_nqd))  # (n, q, d)
