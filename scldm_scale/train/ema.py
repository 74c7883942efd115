"""Exponential moving average of the trainable weights (fp32 shadows), sharded like the parameters.

``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step, with no communication
and no host sync. Under ZeRO-3 a parameter is partitioned over the ranks (DeepSpeed keeps this rank's
flat slice in ``param.ds_tensor``, padded so that every rank holds ``ceil(numel / world)`` elements):
the EMA then keeps the shadow of that slice only, so it costs 4 bytes per parameter / world on each
rank, like the fp32 master weights. Full weights exist only when asked for (:meth:`EMA.consolidated`,
a collective), i.e. to sample or to export.

Checkpoints hold :meth:`EMA.state_dict` of every rank (its slices under ZeRO-3, the full shadow
otherwise); :func:`ema_state_for` gives each rank what it loads, also on another number of ranks
(:func:`unpartition`, then :func:`partition`).
"""

from __future__ import annotations

import torch
from torch import nn

from scldm_scale import comm


def _partitioned(p: nn.Parameter) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _shape(p: nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


class EMA:
    """EMA of every trainable parameter of ``model``; ``sharded``: keep only this rank's ZeRO-3 slices."""

    def __init__(self, model: nn.Module, decay: float, sharded: bool = False) -> None:
        self.decay = float(decay)
        self.sharded = bool(sharded)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.sharded and not all(_partitioned(p) for p in self.params.values()):
            raise ValueError("a sharded EMA needs ZeRO-3 partitioned parameters (param.ds_tensor)")
        self.shadow = {n: self._source(p).detach().float().clone() for n, p in self.params.items()}

    def _source(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.sharded else p

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(self._source(p).detach().float(), 1.0 - self.decay)

    def checkpoint_state(self) -> dict:
        """What a checkpoint's client state holds of the EMA (:func:`ema_state_for` reads it back)."""
        state: dict = {"ema": self.state_dict(), "ema_sharded": self.sharded}
        if self.sharded:
            state["ema_shapes"] = {n: list(_shape(p)) for n, p in self.params.items()}
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shadows (its slices when sharded), on the CPU."""
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name, t in self.shadow.items():
            if state[name].shape != t.shape:
                raise ValueError(f"EMA state of {name} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[name])

    def consolidated(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """Full EMA weights (fp32, CPU) on rank ``dst``, None elsewhere. Collective when sharded."""
        if not self.sharded:
            return {n: t.detach().cpu().clone() for n, t in self.shadow.items()} if comm.rank() == dst else None
        out: dict[str, torch.Tensor] | None = {} if comm.rank() == dst else None
        for name, p in self.params.items():
            parts = comm.gather_tensor(self.shadow[name], dst=dst)
            if out is not None:
                out[name] = torch.cat([t.cpu() for t in parts])[: _numel(p)].view(_shape(p)).clone()
        return out


def partition(full: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Slice ``rank`` of ``world`` of full weights, as ZeRO-3 partitions them (flat, zero-padded)."""
    out = {}
    for name, t in full.items():
        flat = t.reshape(-1)
        size = -(-flat.numel() // world)
        padded = torch.zeros(size * world, dtype=flat.dtype)
        padded[: flat.numel()] = flat
        out[name] = padded[rank * size: (rank + 1) * size].clone()
    return out


def unpartition(slices: list[dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full weights from the slices of every rank (rank order)."""
    out = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        out[name] = torch.cat([s[name].reshape(-1) for s in slices])[:numel].view(shape).clone()
    return out


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_full_state(client_files: list) -> dict[str, torch.Tensor] | None:
    """The full EMA weights a checkpoint holds (from rank 0's copy, or from every rank's slices), or
    None when it holds no EMA. ``client_files``: one client state per saved rank, in rank order."""
    first = _load(client_files[0])
    if "ema" not in first:
        return None
    if not first.get("ema_sharded", False):
        return first["ema"]
    slices = [first["ema"]] + [_load(f)["ema"] for f in client_files[1:]]
    return unpartition(slices, {n: torch.Size(s) for n, s in first["ema_shapes"].items()})


def ema_state_for(ema: EMA, client_files: list, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The EMA state this rank loads from a checkpoint, whatever the saved and current number of
    ranks and sharding."""
    first = _load(client_files[0])
    if ema.sharded and first.get("ema_sharded", False) and len(client_files) == world:
        return (first if rank == 0 else _load(client_files[rank]))["ema"]  # same ranks: own slices
    full = saved_full_state(client_files)
    if full is None:
        raise KeyError(f"{client_files[0]}: the checkpoint holds no EMA weights; resume with train.ema_decay=0")
    return partition(full, rank, world) if ema.sharded else full
