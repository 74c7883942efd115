"""Flow-matching training loss (convention in ``scldm_scale.flow.interpolant``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from scldm_scale.flow.interpolant import LinearInterpolant, TimeSampling


def flow_matching_loss(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    data_nmz: Tensor,
    generator: torch.Generator | None,
    time_sampling: TimeSampling = TimeSampling.UNIFORM,
    interpolant: LinearInterpolant | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> dict:
    """MSE between ``velocity_fn(x_t, t)`` and the target velocity ``data - noise``.

    Noise and t are drawn from ``generator`` (a per-rank stream). Returns
    ``{"loss": scalar, "loss_per_cell_n": (n,)}``, the per-cell loss averaged over tokens and dims.
    """
    interpolant = interpolant or LinearInterpolant()
    n = data_nmz.shape[0]
    draw_device = generator.device if generator is not None else data_nmz.device
    noise_nmz = torch.randn(data_nmz.shape, generator=generator, device=draw_device, dtype=data_nmz.dtype)
    noise_nmz = noise_nmz.to(data_nmz.device)
    t_n = interpolant.sample_time(
        n, time_sampling, generator, device=data_nmz.device, logit_mean=logit_mean, logit_std=logit_std
    )
    x_t_nmz = interpolant.interpolate(noise_nmz, data_nmz, t_n)  # (n, m, z)
    v_nmz = velocity_fn(x_t_nmz, t_n)  # (n, m, z)
    target_nmz = interpolant.target_velocity(noise_nmz, data_nmz)  # (n, m, z)
    loss_per_cell_n = (v_nmz.float() - target_nmz.float()).pow(2).flatten(1).mean(dim=1)  # (n,)
    return {"loss": loss_per_cell_n.mean(), "loss_per_cell_n": loss_per_cell_n}
