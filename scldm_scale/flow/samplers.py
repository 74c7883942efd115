"""Samplers for the flow ``dx/dt = v(x, t)``, integrated from t0 = 0 (noise) to t1 = 1 (data).

- EULER: ``num_steps`` steps, NFE = num_steps.
- HEUN: ``num_steps`` steps of Heun's 2nd-order method, every step (the last included)
  corrected: NFE = 2 * num_steps (the linear-path velocity is regular at t = 1).
- ADAPTIVE: embedded Dormand-Prince 5(4) with step-size control (rtol, atol); ``num_steps``
  only sets the initial step size. About 6 NFE per accepted step (FSAL).
- SDE: Euler-Maruyama on the SDE with the ODE's marginals (SiT's stochastic sampler),
  ``dx = [v + w(t)/2 * score] dt + sqrt(w(t)) dW`` with ``w(t) = diffusion * (1 - t)`` and the
  score of the linear path recovered from the velocity, ``score = -(x - t v) / (1 - t)``, so the
  drift is ``v - diffusion/2 * (x - t v)``. The last step adds no noise. NFE = num_steps.
  ``diffusion = 0`` is EULER.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class SamplerKind(str, Enum):
    EULER = "euler"
    HEUN = "heun"
    ADAPTIVE = "adaptive"
    SDE = "sde"


_NFE_PER_STEP = {SamplerKind.EULER: 1, SamplerKind.HEUN: 2, SamplerKind.ADAPTIVE: 6, SamplerKind.SDE: 1}


def nfe_to_steps(nfe: int, kind: SamplerKind) -> int:
    """Steps giving at most ``nfe`` function evaluations (at least 1 step)."""
    return max(1, int(nfe) // _NFE_PER_STEP[SamplerKind(kind)])


# Dormand-Prince 5(4) tableau
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


def _time(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


def _integrate_adaptive(
    f: VelocityFn, x: Tensor, t0: float, t1: float, h0: float, rtol: float, atol: float, max_steps: int = 100_000
) -> Tensor:
    span = t1 - t0
    direction = 1.0 if span >= 0 else -1.0
    t, h = t0, abs(h0)
    k1 = f(x, _time(x, t))
    for _ in range(max_steps):
        remaining = abs(t1 - t)
        if remaining <= 1e-12 * max(1.0, abs(span)):
            return x
        h = min(h, remaining)
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            xi = x + hs * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(xi, _time(x, t + _DP_C[i] * hs)))
        x_new = x + hs * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)  # = stage-7 input (FSAL)
        err = hs * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err_norm = float((err / scale).float().pow(2).mean().sqrt())
        if err_norm <= 1.0:
            t = t + hs if h < remaining else t1
            x, k1 = x_new, ks[6]
        factor = 5.0 if err_norm == 0.0 else min(5.0, max(0.2, 0.9 * err_norm ** -0.2))
        h = h * factor
    raise RuntimeError(f"adaptive sampler did not reach t={t1} within {max_steps} steps (rtol={rtol}, atol={atol})")


def _integrate_sde(f: VelocityFn, x: Tensor, t0: float, t1: float, num_steps: int, diffusion: float,
                   generator: torch.Generator | None) -> Tensor:
    if not t0 < t1:
        raise ValueError(f"the SDE sampler runs forward in time: t0={t0} must be < t1={t1}")
    if diffusion < 0:
        raise ValueError(f"diffusion must be >= 0, got {diffusion}")
    h = (t1 - t0) / num_steps
    for i in range(num_steps):
        t = t0 + i * h
        v = f(x, _time(x, t))
        x = x + h * (v - 0.5 * diffusion * (x - t * v))
        if i < num_steps - 1 and diffusion > 0:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
            x = x + math.sqrt(diffusion * (1.0 - t) * h) * noise.to(device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def integrate(
    velocity_fn: VelocityFn,
    x0_nmz: Tensor,
    num_steps: int,
    kind: SamplerKind = SamplerKind.HEUN,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    diffusion: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t_n)`` from ``t0`` to ``t1`` starting at ``x0_nmz``.

    ``diffusion`` and ``generator`` (the source of the Brownian increments, drawn on its device)
    are used by SDE only, which runs forward in time (``t0 < t1``).
    """
    kind = SamplerKind(kind)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    h = (t1 - t0) / num_steps
    if kind == SamplerKind.ADAPTIVE:
        return _integrate_adaptive(velocity_fn, x0_nmz, t0, t1, h, rtol, atol)
    if kind == SamplerKind.SDE:
        return _integrate_sde(velocity_fn, x0_nmz, t0, t1, num_steps, diffusion, generator)
    x = x0_nmz
    for i in range(num_steps):
        t = t0 + i * h
        t_next = t1 if i == num_steps - 1 else t0 + (i + 1) * h
        dt = t_next - t
        d_cur = velocity_fn(x, _time(x, t))
        x_euler = x + dt * d_cur
        if kind == SamplerKind.EULER:
            x = x_euler
        else:
            d_next = velocity_fn(x_euler, _time(x, t_next))
            x = x + dt * 0.5 * (d_cur + d_next)
    return x
