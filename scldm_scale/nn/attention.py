"""Attention: the kernels and the single function that chooses among them (:func:`choose_kernel`).

Call sites pass what they have, the kernel follows:

- fixed-length sequences without a mask (DiT, the latent self-attention blocks, unpooling over the
  m latent tokens): ``scaled_dot_product_attention`` with no mask, so that on a GPU it takes its
  Flash backend;
- a per-key additive bias (the pooling's expression prior) without a mask: on a GPU the bias is
  folded into two extra head dimensions (``q' = [q, 1, 1]``, ``k' = [k, b_hi, b_lo]`` scaled so
  that ``q'.k' * scale = q.k * scale + b``), which keeps SDPA mask-free (Flash backend); on CPU it
  is SDPA's float mask, as before;
- padded batches with a key mask: SDPA with the mask;
- packed variable-length sequences (:class:`~scldm_scale.nn.packing.Packing`: the pooling over a
  cell's expressed genes, the unpooling of a cell's decoded genes): flash-attn's varlen kernel
  when it is installed and the tensors are fp16/bf16 on CUDA (the bias folded as above), else the
  rows are scattered into a padded layout for SDPA with the key mask (exact: padded keys get
  probability 0, padded queries are dropped).

Masks are bool, True = real token. A query whose keys are all masked (a cell without tokens)
returns zeros. No kernel reads a device value back to the host.
"""

from __future__ import annotations

import functools
import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scldm_scale.nn.packing import Packing

_HALF = (torch.float16, torch.bfloat16)


class Kernel(str, Enum):
    SDPA = "sdpa"  # scaled_dot_product_attention, no mask (Flash / memory-efficient / math backends)
    SDPA_MASK = "sdpa_mask"  # SDPA with a boolean key mask or a float (bias) mask
    SDPA_FOLDED_BIAS = "sdpa_folded_bias"  # per-key bias folded into extra head dims, SDPA without a mask
    FLASH_VARLEN = "flash_varlen"  # flash-attn varlen on packed rows (bias folded)
    PADDED_VARLEN = "padded_varlen"  # packed rows scattered to (n, max_len), then SDPA with the key mask


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """``flash_attn_varlen_func`` if flash-attn is importable, else None (cached)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_varlen_func


def folded_head_dim(head_dim: int) -> int:
    """Head dimension with the two bias dimensions, rounded up to a multiple of 8 (fused kernels)."""
    return -(-(head_dim + 2) // 8) * 8


def choose_kernel(device_type: str, dtype: torch.dtype, head_dim: int, *, packed: bool, masked: bool,
                  biased: bool) -> Kernel:
    """The attention kernel for a call: the one place where kernels are chosen.

    ``packed``: queries or keys are packed variable-length rows; ``masked``: a key padding mask;
    ``biased``: a per-key additive bias.
    """
    gpu = device_type == "cuda"
    if packed:
        width = folded_head_dim(head_dim) if biased else head_dim
        if gpu and dtype in _HALF and width <= 256 and _flash_varlen() is not None:
            return Kernel.FLASH_VARLEN
        return Kernel.PADDED_VARLEN
    if not masked and not biased:
        return Kernel.SDPA
    if gpu and biased and not masked:
        return Kernel.SDPA_FOLDED_BIAS
    return Kernel.SDPA_MASK


# --------------------------------------------------------------------------- kernels


def _fold_bias(q: Tensor, k: Tensor, v: Tensor, bias_k: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """Append the bias to the keys (split hi + lo, so fp16/bf16 keep its precision) and ones to the
    queries; q, k, v are (..., heads, rows, d) or (rows, heads, d) with ``bias_k`` broadcastable to
    k's shape without its last dim. Returns q', k', v' and the softmax scale of the original d."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    width = folded_head_dim(d)
    scaled = bias_k.float() / scale  # q'.k' is multiplied by scale in the kernel
    hi = scaled.to(k.dtype)
    lo = (scaled - hi.float()).to(k.dtype)
    extra_k = torch.stack(torch.broadcast_tensors(hi, lo), dim=-1).expand(*k.shape[:-1], 2)  # (..., 2)
    q_f = F.pad(torch.cat([q, torch.ones_like(q[..., :2])], dim=-1), (0, width - d - 2))
    k_f = F.pad(torch.cat([k, extra_k], dim=-1), (0, width - d - 2))
    v_f = F.pad(v, (0, width - d))
    return q_f, k_f, v_f, scale


def attention(q_nhqd: Tensor, k_nhkd: Tensor, v_nhkd: Tensor, key_mask_nk: Tensor | None = None,
              key_bias_nk: Tensor | None = None, kernel: Kernel | None = None) -> Tensor:
    """Softmax attention over fixed-length (or padded) keys; ``key_mask_nk`` (bool, True = real key),
    ``key_bias_nk`` (float, added to the scores of every query and head). Returns (n, h, q, d).

    ``kernel`` overrides :func:`choose_kernel` (to compare kernels); SDPA_FOLDED_BIAS needs no mask.
    """
    if kernel is None:
        kernel = choose_kernel(q_nhqd.device.type, q_nhqd.dtype, q_nhqd.shape[-1], packed=False,
                               masked=key_mask_nk is not None, biased=key_bias_nk is not None)
    if kernel == Kernel.SDPA and key_mask_nk is None and key_bias_nk is None:
        return F.scaled_dot_product_attention(q_nhqd, k_nhkd, v_nhkd)  # (n, h, q, d)
    if kernel == Kernel.SDPA_FOLDED_BIAS and key_mask_nk is None and key_bias_nk is not None:
        q_f, k_f, v_f, scale = _fold_bias(q_nhqd, k_nhkd, v_nhkd, key_bias_nk[:, None, :])
        return F.scaled_dot_product_attention(q_f, k_f, v_f, scale=scale)[..., : q_nhqd.shape[-1]]  # (n, h, q, d)
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


def _flash_attention(q_qhd: Tensor, k_khd: Tensor, v_khd: Tensor, q_pack: Packing, k_pack: Packing,
                     key_bias_k: Tensor | None) -> Tensor:
    """flash-attn varlen on packed rows; the bias folded into the head dimension. Returns (Q, h, d)."""
    d = q_qhd.shape[-1]
    scale = 1.0 / math.sqrt(d)
    if key_bias_k is not None:
        q_qhd, k_khd, v_khd, scale = _fold_bias(q_qhd, k_khd, v_khd, key_bias_k[:, None])
    out_qhd = _flash_varlen()(q_qhd, k_khd, v_khd, q_pack.cu_seqlens, k_pack.cu_seqlens, q_pack.max_len,
                              k_pack.max_len, dropout_p=0.0, softmax_scale=scale, causal=False)[..., :d]
    has_key_q = (k_pack.lengths > 0)[q_pack.seq_ids]  # (Q,) a sequence without keys gives zeros
    return torch.where(has_key_q[:, None, None], out_qhd, torch.zeros_like(out_qhd))


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask_nk: Tensor | None = None, key_bias: Tensor | None = None,
           q_pack: Packing | None = None, k_pack: Packing | None = None, kernel: Kernel | None = None) -> Tensor:
    """Attention on head-split rows: q (n, q, h, d) or packed (Q, h, d) with ``q_pack``; k, v
    (n, k, h, d) or packed (K, h, d) with ``k_pack``; ``key_bias`` (n, k) or (K,) like the keys.
    Returns the output in q's layout. ``kernel`` overrides :func:`choose_kernel` for packed rows."""
    if q_pack is None and k_pack is None:
        out_nhqd = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask_nk, key_bias)
        return out_nhqd.transpose(1, 2)  # (n, q, h, d)
    if key_mask_nk is not None:
        raise ValueError("packed keys carry their own lengths; pass no key mask with k_pack")
    n = (q_pack or k_pack).n
    q_in_pack = q_pack is not None
    if q_pack is None:  # (n, q, h, d) -> packed rows
        q_pack = Packing.fixed(n, q.shape[1], q.device)
        q = q.reshape(-1, *q.shape[2:])
    if k_pack is None:
        k_pack = Packing.fixed(n, k.shape[1], k.device)
        k, v = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        key_bias = key_bias.reshape(-1) if key_bias is not None else None
    if kernel is None:
        kernel = choose_kernel(q.device.type, q.dtype, q.shape[-1], packed=True, masked=False,
                               biased=key_bias is not None)
    if kernel == Kernel.FLASH_VARLEN:
        out_qhd = _flash_attention(q, k, v, q_pack, k_pack, key_bias)
    else:  # PADDED_VARLEN
        q_nlhd, k_nlhd, v_nlhd = q_pack.pad(q), k_pack.pad(k), k_pack.pad(v)  # (n, L, h, d)
        bias_nl = k_pack.pad(key_bias) if key_bias is not None else None
        out_nlhd = attention(q_nlhd.transpose(1, 2), k_nlhd.transpose(1, 2), v_nlhd.transpose(1, 2), k_pack.mask(),
                             bias_nl).transpose(1, 2)  # (n, Lq, h, d)
        out_qhd = q_pack.unpad(out_nlhd)  # (Q, h, d)
    return out_qhd if q_in_pack else out_qhd.view(n, -1, *out_qhd.shape[1:])


# --------------------------------------------------------------------------- module


class MultiheadAttention(nn.Module):
    """Multi-head attention. Self-attention projects q, k and v with one fused matrix (``qkv_proj``);
    cross-attention (``cross=True``) has a q projection and a fused kv projection of the key stream.

    Self-attention state dicts from before the fused projection (``q_proj`` + ``kv_proj``) load too.
    """

    def __init__(self, d_model: int, n_heads: int, d_kv: int | None = None, dropout: float = 0.0,
                 cross: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.cross = cross or (d_kv is not None and d_kv != d_model)
        if self.cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_kv or d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
            self.register_load_state_dict_pre_hook(_fuse_legacy_qkv)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_nqd: Tensor, kv_nkd: Tensor | None = None, key_mask_nk: Tensor | None = None,
                key_bias_nk: Tensor | None = None, q_pack: Packing | None = None,
                kv_pack: Packing | None = None, q_index: Tensor | None = None) -> Tensor:
        """Queries ``x_nqd`` attend to ``kv_nkd`` (cross) or to themselves. A tensor is (n, rows, d), or
        packed (rows, d) when its :class:`Packing` is given. Returns the queries' layout, width d.

        ``q_index`` (cross-attention): ``x_nqd`` is a table of query features and the queries are its
        rows ``q_index``; the q projection runs once per table row (queries that repeat across
        cells, such as gene embeddings, are projected once)."""
        h, dh = self.n_heads, self.d_head
        if self.cross:
            if kv_nkd is None:
                raise ValueError("cross-attention needs the key stream kv_nkd")
            q = self.q_proj(x_nqd)  # (n, q, d) or (Q, d) or a (G, d) table
            q = (q if q_index is None else q[q_index]).unflatten(-1, (h, dh))  # (n, q, h, dh) or (Q, h, dh)
            k, v = self.kv_proj(kv_nkd).unflatten(-1, (2, h, dh)).unbind(-3)  # (n, k, h, dh) or (K, h, dh) x2
        else:
            if kv_nkd is not None or q_index is not None:
                raise ValueError("self-attention takes no separate key stream nor query table; "
                                 "build it with cross=True")
            q, k, v = self.qkv_proj(x_nqd).unflatten(-1, (3, h, dh)).unbind(-3)  # (n, q, h, dh) x3
            kv_pack = q_pack
        out = attend(q, k, v, key_mask_nk, key_bias_nk, q_pack, kv_pack)  # q's layout, (..., h, dh)
        return self.dropout(self.out_proj(out.flatten(-2)))  # (n, q, d) or (Q, d)


def _fuse_legacy_qkv(module: MultiheadAttention, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: a self-attention saved with separate ``q_proj`` / ``kv_proj`` becomes ``qkv_proj``."""
    for kind in ("weight", "bias"):
        q_key, kv_key = f"{prefix}q_proj.{kind}", f"{prefix}kv_proj.{kind}"
        if q_key in state_dict and kv_key in state_dict:
            state_dict[f"{prefix}qkv_proj.{kind}"] = torch.cat([state_dict.pop(q_key), state_dict.pop(kv_key)], 0)
