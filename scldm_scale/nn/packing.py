"""Packed variable-length sequences: the rows of n sequences concatenated along one axis.

A cell's expressed genes are a set of variable size. Instead of padding every cell of a batch to
the longest one, the per-token work runs on one ``(T, d)`` stream of real tokens, and a
:class:`Packing` says which rows belong to which cell (``cu_seqlens`` offsets, the layout of
flash-attn's varlen kernels). Only attention needs the per-cell grouping; kernels that want a
padded ``(n, L, ...)`` layout get it from :meth:`Packing.pad`.

Every field is derived on the device from the lengths, except ``max_len``: a host int (kernels
need it as a shape), given by the caller, so building and using a packing never reads a device
value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """Layout of n sequences packed along the first axis of a ``(T, ...)`` tensor."""

    cu_seqlens: Tensor  # (n+1,) int32: row offsets of the sequences (flash-attn's cu_seqlens)
    seq_ids: Tensor  # (T,) int64: sequence of each row
    positions: Tensor  # (T,) int64: position of each row within its sequence
    lengths: Tensor  # (n,) int64
    max_len: int  # longest sequence (host int); the padded layout is (n, max_len)

    @staticmethod
    def from_lengths(length_n: Tensor, max_len: int, total: int) -> Packing:
        """Sequences of ``length_n`` rows each (in order), ``total`` rows in all, the longest ``max_len``.

        ``total`` and ``max_len`` are host ints (the packed tensor's first dimension and the
        batch's longest cell, known on the host where the batch was built).
        """
        length_n = length_n.long()
        n = length_n.shape[0]
        offsets_n1 = F.pad(torch.cumsum(length_n, 0), (1, 0))  # (n+1,)
        seq_ids = torch.repeat_interleave(torch.arange(n, device=length_n.device), length_n, output_size=total)  # (T,)
        positions = torch.arange(total, device=length_n.device) - offsets_n1[seq_ids]  # (T,)
        return Packing(offsets_n1.int(), seq_ids, positions, length_n, int(max_len))

    @staticmethod
    def fixed(n: int, length: int, device: torch.device | str | None = None) -> Packing:
        """n sequences of ``length`` rows each (a dense ``(n, length, ...)`` tensor, flattened)."""
        rows = torch.arange(n * length, device=device)
        return Packing(
            torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=device),
            rows // length if length else rows,
            rows % length if length else rows,
            torch.full((n,), length, dtype=torch.long, device=device),
            int(length),
        )

    @property
    def n(self) -> int:
        return self.lengths.shape[0]

    @property
    def total(self) -> int:
        return self.seq_ids.shape[0]

    def mask(self) -> Tensor:
        """(n, max_len) bool, True at real rows of the padded layout."""
        return torch.arange(self.max_len, device=self.lengths.device) < self.lengths[:, None]

    def pad(self, x_t: Tensor, fill: float = 0.0) -> Tensor:
        """(T, ...) -> (n, max_len, ...), ``fill`` at the padding."""
        out = x_t.new_full((self.n, self.max_len, *x_t.shape[1:]), fill)
        out[self.seq_ids, self.positions] = x_t  # in place into the new tensor (autograd records it)
        return out  # (n, L, ...)

    def unpad(self, x_nl: Tensor) -> Tensor:
        """(n, max_len, ...) -> (T, ...): the real rows, in packed order."""
        return x_nl[self.seq_ids, self.positions]  # (T, ...)

    def segment_sum(self, x_t: Tensor) -> Tensor:
        """(T, ...) -> (n, ...): the sum over each sequence's rows."""
        return x_t.new_zeros((self.n, *x_t.shape[1:])).index_add(0, self.seq_ids, x_t)  # (n, ...)

    def segment_logsumexp(self, x_t: Tensor) -> Tensor:
        """(T,) -> (n,): log-sum-exp over each sequence's rows (-inf for an empty or all -inf one)."""
        max_n = torch.full((self.n,), float("-inf"), dtype=x_t.dtype, device=x_t.device)
        max_n = max_n.scatter_reduce(0, self.seq_ids, x_t.detach(), "amax")  # (n,)
        shift_n = torch.where(torch.isfinite(max_n), max_n, torch.zeros_like(max_n))
        sum_n = self.segment_sum(torch.exp(x_t - shift_n[self.seq_ids]))  # (n,)
        return torch.log(sum_n) + shift_n  # (n,)
