"""Negative-binomial log-likelihood against scipy."""

import numpy as np
import torch
from scipy import stats

from scldm_scale.nn.likelihood import nb_log_prob


def test_nb_log_prob_matches_scipy():
    rng = np.random.default_rng(0)
    counts = np.concatenate([np.zeros(50), rng.integers(0, 20, 100), rng.integers(100, 5000, 50)]).astype(np.float64)
    mu = np.concatenate([rng.uniform(0.05, 5.0, 100), rng.uniform(50.0, 5e4, 100)])
    theta = rng.uniform(0.1, 50.0, 200)
    expected = stats.nbinom.logpmf(counts, n=theta, p=theta / (theta + mu))
    got = nb_log_prob(torch.tensor(counts), torch.tensor(mu), torch.tensor(theta)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    got32 = nb_log_prob(*(torch.tensor(a, dtype=torch.float32) for a in (counts, mu, theta))).numpy()
    np.testing.assert_allclose(got32, expected, rtol=1e-3, atol=1e-3)


def test_nb_log_prob_normalizes():
    k = torch.arange(0, 2000, dtype=torch.float64)
    p = nb_log_prob(k, torch.tensor(7.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)).exp()
    assert abs(p.sum().item() - 1.0) < 1e-6
    assert abs((k * p).sum().item() - 7.5) < 1e-5
