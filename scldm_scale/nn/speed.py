"""torch.compile for the transformer blocks of a model (``model.compile: true``).

Each block's ``forward`` is compiled on its own (the blocks are where the time goes; the rest of
the model stays eager, so packed batches of varying size recompile only the blocks, once they
are marked dynamic). The module tree and state dict do not change. Where compiling is not possible
(no dynamo support on this platform, a backend or graph failure at the first call) the block runs
eagerly after a one-line warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from scldm_scale.nn.dit import DiTBlock
from scldm_scale.nn.mcab import MCAB, SelfAttentionBlock

BLOCK_TYPES = (MCAB, SelfAttentionBlock, DiTBlock)


class _CompiledForward:
    """A block's compiled forward that falls back to the eager one if compiling fails."""

    def __init__(self, name: str, compiled: Callable, eager: Callable) -> None:
        self.name, self.compiled, self.eager = name, compiled, eager
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compile failure; a genuine error re-raises eagerly
            self.failed = True
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"model.compile: torch.compile failed for {self.name} ({type(err).__name__}: {first[:160]}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the ``forward`` of every transformer block of ``model`` in place; returns how many.

    Returns 0 (after a one-line warning) where torch.compile is not supported.
    """
    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("model.compile: torch.compile is not supported on this platform; running eagerly",
                      RuntimeWarning, stacklevel=2)
        return 0
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, BLOCK_TYPES) and not isinstance(module.forward, _CompiledForward):
            eager = module.forward
            module.forward = _CompiledForward(name or type(module).__name__, torch.compile(eager, backend=backend),
                                              eager)
            count += 1
    return count
