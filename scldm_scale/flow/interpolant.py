"""Linear interpolant for flow matching: THE place documenting the convention.

    x_t = t * x_data + (1 - t) * noise,      noise ~ N(0, I)

t = 0 is noise, t = 1 is data (alpha(t) = t, sigma(t) = 1 - t, as in SiT's linear path).
The network predicts the velocity ``d x_t / dt = x_data - noise`` and is trained with MSE.
Sampling integrates ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1 (data).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class TimeSampling(str, Enum):
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"


def _expand_like(t_n: Tensor, x: Tensor) -> Tensor:
    """(n,) -> (n, 1, ..., 1) broadcastable against x."""
    return t_n.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class LinearInterpolant:
    """x_t = alpha(t) * data + sigma(t) * noise with alpha(t) = t, sigma(t) = 1 - t."""

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def interpolate(self, noise: Tensor, data: Tensor, t_n: Tensor) -> Tensor:
        """x_t for per-sample times ``t_n`` (broadcast over trailing dims)."""
        t = _expand_like(t_n, data)
        return self.alpha(t) * data + self.sigma(t) * noise

    def target_velocity(self, noise: Tensor, data: Tensor) -> Tensor:
        """d x_t / dt = data - noise (independent of t for the linear path)."""
        return data - noise

    def sample_time(
        self,
        n: int,
        sampling: TimeSampling = TimeSampling.UNIFORM,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> Tensor:
        """n training times in [0, 1): uniform, or sigmoid(N(logit_mean, logit_std^2))."""
        draw_device = generator.device if generator is not None else device
        sampling = TimeSampling(sampling)
        if sampling == TimeSampling.UNIFORM:
            t_n = torch.rand(n, generator=generator, device=draw_device)
        else:
            t_n = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=draw_device))
        return t_n.to(device) if device is not None else t_n
