"""Exponential moving average of model weights (fp32 shadow copies, ZeRO-3 aware)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every trainable parameter.

    Under ZeRO-3 parameters are partitioned; ``gather`` is a context manager factory that
    materializes them (``deepspeed.zero.GatheredParameters``) for the update.
    """

    def __init__(self, model: nn.Module, decay: float, gather=None) -> None:
        self.decay = float(decay)
        self._gather = gather or (lambda params: contextlib.nullcontext())
        params = dict(model.named_parameters())
        with self._gather(list(params.values())):
            self.shadow = {name: p.detach().float().clone() for name, p in params.items() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [(n, p) for n, p in model.named_parameters() if n in self.shadow]
        with self._gather([p for _, p in params]):
            for name, p in params:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
