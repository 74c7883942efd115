"""Flow matching: interpolant convention, loss, guidance, samplers, a tiny DiT training run."""

import math

import pytest
import torch

from scldm_scale.flow import (
    GuidanceMode,
    LinearInterpolant,
    SamplerKind,
    TimeSampling,
    drop_labels,
    flow_matching_loss,
    guided_velocity,
    integrate,
    nfe_to_steps,
)
from scldm_scale.nn.dit import DiT, DiTConfig

# --------------------------------------------------------------------------- interpolant


def test_interpolant_endpoints_and_velocity():
    ip = LinearInterpolant()
    g = torch.Generator().manual_seed(0)
    noise, data = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(ip.interpolate(noise, data, torch.zeros(3)), noise)
    torch.testing.assert_close(ip.interpolate(noise, data, torch.ones(3)), data)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    noise, data = noise.double(), data.double()
    h = 1e-6
    fd = (ip.interpolate(noise, data, t + h) - ip.interpolate(noise, data, t - h)) / (2 * h)
    torch.testing.assert_close(fd, ip.target_velocity(noise, data))
    torch.testing.assert_close(ip.target_velocity(noise, data), data - noise)
    # per-sample times broadcast over trailing dims
    torch.testing.assert_close(ip.interpolate(noise, data, t)[1], 0.5 * noise[1] + 0.5 * data[1])
    # alpha/sigma and their derivatives agree
    torch.testing.assert_close(ip.alpha(t) + ip.sigma(t), torch.ones_like(t))
    torch.testing.assert_close(ip.d_alpha(t), torch.ones_like(t))
    torch.testing.assert_close(ip.d_sigma(t), -torch.ones_like(t))


def test_time_sampling():
    ip = LinearInterpolant()
    t_u = ip.sample_time(20000, TimeSampling.UNIFORM, torch.Generator().manual_seed(0))
    assert (t_u >= 0).all() and (t_u < 1).all()
    assert abs(t_u.mean().item() - 0.5) < 0.01
    t_ln = ip.sample_time(20000, "logit_normal", torch.Generator().manual_seed(0))
    assert (t_ln > 0).all() and (t_ln < 1).all()
    logit = torch.log(t_ln / (1 - t_ln))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    shifted = ip.sample_time(20000, TimeSampling.LOGIT_NORMAL, None, logit_mean=1.0, logit_std=0.5)
    assert abs(torch.log(shifted / (1 - shifted)).mean().item() - 1.0) < 0.03
    a = ip.sample_time(5, TimeSampling.UNIFORM, torch.Generator().manual_seed(3))
    b = ip.sample_time(5, TimeSampling.UNIFORM, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- loss


def test_flow_matching_loss_matches_manual_computation():
    data = torch.randn(6, 3, 2)
    seen = {}

    def velocity_fn(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t

    out = flow_matching_loss(velocity_fn, data, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the stream: noise first, then t
    noise = torch.randn(data.shape, generator=g)
    t = torch.rand(6, generator=g)
    torch.testing.assert_close(seen["t"], t)
    x_t = t[:, None, None] * data + (1 - t[:, None, None]) * noise
    torch.testing.assert_close(seen["x_t"], x_t)
    per_cell = (0.5 * x_t - (data - noise)).square().mean(dim=(1, 2))
    torch.testing.assert_close(out["loss_per_cell_n"], per_cell)
    torch.testing.assert_close(out["loss"], per_cell.mean())
    # the exact target gives zero loss
    oracle = flow_matching_loss(lambda x, t_: (x - noise) / t_[:, None, None], data, torch.Generator().manual_seed(7))
    assert oracle["loss"].item() < 1e-8


# --------------------------------------------------------------------------- guidance


class ToyCond:
    """v = x * t + sum_a E_a[label_a]; counts forward calls and batch sizes."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.emb = [torch.randn(4, 2, generator=g), torch.randn(6, 2, generator=g)]  # cards 3, 5 (+ null)
        self.calls = []

    def __call__(self, x, t, labels):
        self.calls.append(x.shape[0])
        out = x * t[:, None, None]
        for a, e in enumerate(self.emb):
            out = out + e[labels[:, a]][:, None, :]
        return out


NULL = [3, 5]
LABELS = torch.tensor([[0, 1], [2, 4], [1, 0]])


@pytest.mark.parametrize("mode", list(GuidanceMode))
def test_guidance_weight_one_is_conditional(mode):
    model = ToyCond()
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    v = guided_velocity(model, LABELS, NULL, [1.0, 1.0], mode)(x, t)
    assert torch.equal(v, model(x, t, LABELS))
    assert model.calls == [3, 3]  # no extra passes


def test_joint_guidance():
    model = ToyCond()
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    null = torch.tensor([NULL] * 3)
    v_cond, v_uncond = model(x, t, LABELS), model(x, t, null)
    model.calls.clear()
    torch.testing.assert_close(guided_velocity(model, LABELS, NULL, [0.0], "joint")(x, t), v_uncond)
    assert model.calls == [6]  # one batched forward
    v2 = guided_velocity(model, LABELS, NULL, [2.5], GuidanceMode.JOINT)(x, t)
    torch.testing.assert_close(v2, v_uncond + 2.5 * (v_cond - v_uncond))


def test_per_attribute_guidance():
    model = ToyCond()
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    v_full = model(x, t, LABELS)
    drop0, drop1 = LABELS.clone(), LABELS.clone()
    drop0[:, 0], drop1[:, 1] = 3, 5
    v0, v1 = model(x, t, drop0), model(x, t, drop1)
    model.calls.clear()
    v = guided_velocity(model, LABELS, NULL, [3.0, 0.5], GuidanceMode.PER_ATTRIBUTE)(x, t)
    assert model.calls == [9]
    torch.testing.assert_close(v, v_full + 2.0 * (v_full - v0) - 0.5 * (v_full - v1))
    model.calls.clear()
    v = guided_velocity(model, LABELS, NULL, [1.0, 0.0], GuidanceMode.PER_ATTRIBUTE)(x, t)
    assert model.calls == [6]  # attribute 0 at weight 1 needs no pass
    torch.testing.assert_close(v, v1)  # weight 0 removes attribute 1 (additive toy model)


@pytest.mark.parametrize("mode", list(GuidanceMode))
def test_guidance_interval_guides_only_inside(mode):
    model = ToyCond()
    x, t = torch.randn(4, 4, 2), torch.tensor([0.1, 0.3, 0.8, 0.9])
    weights = [2.5] if mode == GuidanceMode.JOINT else [2.5, 0.5]
    v_guided = guided_velocity(model, LABELS[[0, 1, 2, 0]], NULL, weights, mode)(x, t)
    v_cond = model(x, t, LABELS[[0, 1, 2, 0]])
    assert not torch.allclose(v_guided, v_cond)
    v = guided_velocity(model, LABELS[[0, 1, 2, 0]], NULL, weights, mode, interval=(0.3, 0.8))(x, t)
    torch.testing.assert_close(v[1:3], v_guided[1:3])  # the ends of the interval are inside
    torch.testing.assert_close(v[[0, 3]], v_cond[[0, 3]])
    model.calls.clear()
    velocity = guided_velocity(model, LABELS, NULL, weights, mode, interval=(0.3, 0.8))
    x3 = torch.randn(3, 4, 2)
    torch.testing.assert_close(velocity(x3, torch.full((3,), 0.95)), model(x3, torch.full((3,), 0.95), LABELS))
    assert model.calls[0] == 3  # no guided pass when no cell is inside the interval
    for bad in ((0.8, 0.3), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.5,)):
        with pytest.raises(ValueError, match="guidance interval"):
            guided_velocity(model, LABELS, NULL, weights, mode, interval=bad)


def test_drop_labels_rate_per_attribute():
    labels = torch.zeros(20000, 3, dtype=torch.long)
    out = drop_labels(labels, [0.1, 0.5, 0.0], [7, 8, 9], torch.Generator().manual_seed(0))
    dropped = torch.stack([out[:, a] == c for a, c in enumerate([7, 8, 9])], dim=1).float().mean(0)
    assert abs(dropped[0].item() - 0.1) < 0.01 and abs(dropped[1].item() - 0.5) < 0.015 and dropped[2] == 0
    assert ((out == 0) | (out == torch.tensor([7, 8, 9]))).all()
    assert drop_labels(torch.zeros(4, 0, dtype=torch.long), [], []).shape == (4, 0)
    with pytest.raises(ValueError):
        drop_labels(labels, [0.1], [7, 8, 9])


# --------------------------------------------------------------------------- samplers


def rotation_flow():
    """dx/dt = (1 + t) A x with A the 2D rotation generator: x(1) = R(1.5) x(0)."""
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)

    def v(x, t):
        return (1 + t)[:, None, None] * (x @ A.T)

    c, s = math.cos(1.5), math.sin(1.5)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return v, R


def test_heun_beats_euler_and_converges_at_second_order():
    v, R = rotation_flow()
    x0 = torch.randn(4, 3, 2, dtype=torch.float64)
    exact = x0 @ R.T

    def err(steps, kind):
        return (integrate(v, x0, steps, kind) - exact).abs().max().item()

    assert err(10, SamplerKind.HEUN) < 0.1 * err(10, SamplerKind.EULER)
    assert 3.0 < err(10, SamplerKind.HEUN) / err(20, SamplerKind.HEUN) < 5.0  # O(h^2)
    assert 1.5 < err(10, SamplerKind.EULER) / err(20, SamplerKind.EULER) < 2.5  # O(h)


def test_adaptive_is_accurate_to_tolerance():
    v, R = rotation_flow()
    x0 = torch.randn(4, 3, 2, dtype=torch.float64)
    calls = []

    def counted(x, t):
        calls.append(1)
        return v(x, t)

    out = integrate(counted, x0, 4, SamplerKind.ADAPTIVE, rtol=1e-7, atol=1e-7)
    assert (out - x0 @ R.T).abs().max().item() < 1e-5
    loose = len(calls)
    calls.clear()
    integrate(counted, x0, 4, "adaptive", rtol=1e-3, atol=1e-3)
    assert len(calls) < loose
    # backwards in time returns to the start
    back = integrate(v, out, 4, SamplerKind.ADAPTIVE, t0=1.0, t1=0.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=0)


def gaussian_flow(mean: float, std: float):
    """Exact linear-path velocity when the data are N(mean, std^2) per coordinate."""

    def v(x, t_n):
        t = t_n.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        var_t = t**2 * std**2 + (1 - t) ** 2  # Var(x_t)
        return mean + (t * std**2 - (1 - t)) / var_t * (x - t * mean)

    return v


@pytest.mark.parametrize("diffusion", [0.0, 1.0, 3.0])
def test_sde_sampler_keeps_the_marginals_and_forgets_the_start(diffusion):
    v = gaussian_flow(2.0, 0.5)
    x0 = torch.randn(20000, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = integrate(v, x0, 100, SamplerKind.SDE, diffusion=diffusion, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - 2.0) < 0.01
    assert abs(out.std().item() - 0.5) < 0.01
    corr = torch.corrcoef(torch.stack([x0.flatten(), out.flatten()]).float())[0, 1].item()
    # deterministic (= Euler) without diffusion; more diffusion, less memory of the initial noise
    assert corr > 0.999 if diffusion == 0 else corr < {1.0: 0.7, 3.0: 0.3}[diffusion]
    if diffusion == 0:
        torch.testing.assert_close(out, integrate(v, x0, 100, SamplerKind.EULER))


def test_sde_sampler_is_reproducible_by_generator_and_validates():
    v = gaussian_flow(0.0, 1.0)
    x0 = torch.zeros(4, 3, 2)
    run = lambda seed: integrate(v, x0, 10, "sde", generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    with pytest.raises(ValueError, match="forward in time"):
        integrate(v, x0, 10, SamplerKind.SDE, t0=1.0, t1=0.0)
    with pytest.raises(ValueError, match="diffusion must be >= 0"):
        integrate(v, x0, 10, SamplerKind.SDE, diffusion=-1.0)


def test_nfe_to_steps_and_counts():
    assert nfe_to_steps(50, SamplerKind.EULER) == 50
    assert nfe_to_steps(50, SamplerKind.HEUN) == 25
    assert nfe_to_steps(1, "heun") == 1
    assert nfe_to_steps(50, SamplerKind.SDE) == 50
    for kind, nfe in [(SamplerKind.EULER, 7), (SamplerKind.HEUN, 14), (SamplerKind.SDE, 7)]:
        calls = []
        integrate(lambda x, t: calls.append(1) or x, torch.zeros(1, 1, 1), 7, kind)
        assert len(calls) == nfe


# --------------------------------------------------------------------------- tiny DiT


def test_tiny_dit_learns_two_mode_toy_and_samples_modes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DiT(DiTConfig(n_tokens=2, d_in=2, d_model=32, depth=2, n_heads=4, label_cardinalities=[2]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        labels = torch.randint(0, 2, (64, 1), generator=g)
        data = (2.0 * labels.float() - 1.0)[:, :, None].expand(64, 2, 2) + 0.05 * torch.randn(64, 2, 2, generator=g)
        labels = drop_labels(labels, [0.2], [2], g)
        out = flow_matching_loss(lambda x, t: model(x, t, labels), data, g, TimeSampling.LOGIT_NORMAL)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    # conditional samples land near their mode (+1 for label 1, -1 for label 0)
    model.eval()
    labels = torch.tensor([[0]] * 8 + [[1]] * 8)
    x0 = torch.randn(16, 2, 2, generator=g)
    x1 = integrate(guided_velocity(model, labels, [2], [1.5], GuidanceMode.JOINT), x0, 10, SamplerKind.HEUN)
    means = x1.mean(dim=(1, 2))
    assert (means[:8] < 0).all() and (means[8:] > 0).all()
