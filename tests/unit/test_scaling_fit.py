"""Power-law fits: recovery of a known exponent, bootstrap coverage at the nominal rate."""

import numpy as np
import pytest

from scldm_scale.scaling.fit import bootstrap_fit, expanded_tail, fit_loglinear, fit_many, fit_power_law

TRUE = dict(a=40.0, alpha=0.3, c=3.0)


def _points(rng, n=12, noise=0.01, lo=1e3, hi=1e7):
    x = np.geomspace(lo, hi, n)
    y = (TRUE["a"] * x ** -TRUE["alpha"] + TRUE["c"]) * np.exp(rng.normal(0.0, noise, n))
    return x, y


@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_a_known_exponent_within_5_percent(seed):
    x, y = _points(np.random.default_rng(seed), n=16, noise=0.005)  # 0.5% noise on each loss
    fit = fit_power_law(x, y)
    assert abs(fit.law.alpha / TRUE["alpha"] - 1) < 0.05
    assert abs(fit.law.c / TRUE["c"] - 1) < 0.05
    assert fit.rmse_log < 0.01


def test_exact_points_are_fitted_exactly_and_many_at_once():
    x = np.geomspace(10, 1e5, 6)
    laws = [(5.0, 0.5, 1.0), (100.0, 0.1, 0.0), (2.0, 1.2, 10.0)]
    y = np.stack([a * x ** -alpha + c for a, alpha, c in laws])
    params = fit_many(x, y)
    np.testing.assert_allclose(params, np.array(laws), rtol=2e-3, atol=1e-3)
    # weight 0 leaves a point out; fewer than 3 distinct X values cannot be fitted
    w = np.ones_like(y)
    w[0, :4] = 0
    assert np.isnan(fit_many(x, y, w)[0]).all()
    assert fit_power_law([1, 2, 2], [3, 2, 2]) is None


def test_bootstrap_intervals_cover_the_truth_at_the_nominal_rate():
    """Many synthetic data sets (seeded): the 90% intervals of alpha and c contain the truth ~90% of the time."""
    rng = np.random.default_rng(123)
    level, reps = 0.9, 150
    hits = {"alpha": 0, "c": 0}
    widths = []
    for rep in range(reps):
        x, y = _points(rng, n=10, noise=0.02)
        fit = bootstrap_fit(x, y, n_boot=200, level=level, seed=rep)
        for key in hits:
            lo, hi = fit.intervals[key]
            hits[key] += lo <= TRUE[key] <= hi
        widths.append(np.subtract(*fit.intervals["alpha"][::-1]))
    for key, n in hits.items():
        rate = n / reps
        # binomial sd at 150 repetitions is 0.025: the rate must be within ~3 sd of the nominal 0.9
        assert 0.82 <= rate <= 0.97, (key, rate)
    assert np.median(widths) < 0.5 * TRUE["alpha"]  # and the intervals are informative


def test_band_and_tail_and_loglinear():
    rng = np.random.default_rng(0)
    x, y = _points(rng, n=8, noise=0.01)
    fit = bootstrap_fit(x, y, n_boot=300, level=0.95, seed=0)
    lo, hi = fit.band(x)
    assert (lo <= fit.law(x) + 1e-9).all() and (fit.law(x) <= hi + 1e-9).all() and (hi > lo).all()
    assert expanded_tail(0.95, 1000) == pytest.approx(0.025, abs=1e-3)  # many dof: the plain percentile
    assert expanded_tail(0.95, 3) < 0.01  # few dof: wider
    slope, intercept = fit_loglinear([1, 10, 100], [3, 30 ** 1, 300])
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(np.log(3))
    slope, _ = fit_loglinear([1e3, 1e4, 1e5, 1e6], 7.0 * np.array([1e3, 1e4, 1e5, 1e6]) ** 0.4)
    assert slope == pytest.approx(0.4)
