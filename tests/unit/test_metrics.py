"""Numeric checks of scldm_scale.eval.metrics against known values."""

import numpy as np
import pytest
from scipy.stats import nbinom

from scldm_scale.errors import ScldmError
from scldm_scale.eval import metrics as M


def _gauss(n, d=5, seed=0, mu=0.0, scale=1.0):
    return mu + scale * np.random.default_rng(seed).standard_normal((n, d))


def _centered(n, d=5, seed=0):
    """A standard normal sample with its sample mean removed (no mean-noise in the shift)."""
    z = _gauss(n, d, seed)
    return z - z.mean(axis=0)


# ----------------------------------------------------------------------------- W2


def test_w2_identical_is_zero():
    x = _gauss(500)
    assert M.wasserstein2(x, x.copy()) == pytest.approx(0.0, abs=1e-6)


def test_w2_shifted_gaussians_close_to_shift_norm():
    mu = np.zeros(5)
    mu[0] = 3.0
    x = _centered(2000, seed=1)
    y = _centered(2000, seed=2) + mu
    w2 = M.wasserstein2(x, y)
    assert w2 == pytest.approx(3.0, rel=0.05)
    # a pure translation of the same points is exactly |mu|
    assert M.wasserstein2(x, x + mu) == pytest.approx(3.0, abs=1e-6)


def test_w2_subsampling_is_deterministic():
    x, y = _gauss(300, seed=3), _gauss(300, seed=4, mu=1.0)
    a = M.wasserstein2(x, y, max_cells=100, seed=7)
    b = M.wasserstein2(x, y, max_cells=100, seed=7)
    assert a == b
    assert M.subsample(x, 100, seed=7).shape == (100, 5)


def test_shape_mismatch_raises():
    with pytest.raises(ScldmError):
        M.wasserstein2(_gauss(10, d=3), _gauss(10, d=4))


# ----------------------------------------------------------------------------- MMD


def test_mmd_identical_is_zero_and_shift_positive():
    x = _gauss(400, seed=5)
    assert M.mmd_rbf(x, x.copy()) < 1e-6
    same = M.mmd_rbf(x, _gauss(400, seed=6))
    shifted = M.mmd_rbf(x, _gauss(400, seed=6, mu=2.0))
    assert same < 0.01
    assert shifted > 10 * same
    assert shifted > 0.05


def test_mmd_matches_direct_formula():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 2)), rng.standard_normal((20, 2)) + 0.5
    z = np.concatenate([x, y])
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    h = np.median(d[np.triu_indices(len(z), 1)])
    k = np.mean([np.exp(-d**2 / (2 * (s * h) ** 2)) for s in (0.5, 1, 2, 4, 8)], axis=0)
    want = k[:30, :30].mean() + k[30:, 30:].mean() - 2 * k[:30, 30:].mean()
    assert M.mmd_rbf(x, y) == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- FD


def test_fd_shifted_gaussians():
    mu = np.zeros(5)
    mu[0] = 3.0
    fd = M.frechet_distance(_centered(2000, seed=1), _centered(2000, seed=2) + mu)
    assert fd == pytest.approx(9.0, rel=0.05)


def test_fd_scaled_gaussians_analytic():
    d = 5
    # N(0, I) vs N(0, 4I): d * (1 + 4 - 2 * 2) = d
    fd = M.frechet_distance(_gauss(20000, d=d, seed=1), _gauss(20000, d=d, seed=2, scale=2.0))
    assert fd == pytest.approx(d, rel=0.05)


def test_fd_identical_is_zero():
    x = _gauss(500)
    assert M.frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- 1-NN


def test_one_nn_same_distribution_is_half():
    acc = M.one_nn_accuracy(_gauss(1000, seed=1), _gauss(1000, seed=2))
    assert abs(acc - 0.5) < 0.1


def test_one_nn_separated_is_one():
    assert M.one_nn_accuracy(_gauss(500, seed=1), _gauss(500, seed=2, mu=20.0)) == pytest.approx(1.0)


def test_one_nn_copies_are_zero_and_unequal_sizes_ok():
    x = _gauss(300, seed=1)
    assert M.one_nn_accuracy(x, x.copy()) == pytest.approx(0.0)
    acc = M.one_nn_accuracy(_gauss(800, seed=1), _gauss(200, seed=2))
    assert 0.35 < acc < 0.65


# ----------------------------------------------------------------------------- PRDC


def test_prdc_identical_and_disjoint():
    x = _gauss(500, seed=1)
    r = M.prdc(x, x.copy(), k=5)
    assert r["precision"] == pytest.approx(1.0)
    assert r["recall"] == pytest.approx(1.0)
    assert r["coverage"] == pytest.approx(1.0)
    assert r["density"] == pytest.approx(1.0, abs=0.05)
    far = M.prdc(x, _gauss(500, seed=2, mu=50.0), k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_same_distribution_high():
    r = M.prdc(_gauss(1000, seed=1), _gauss(1000, seed=2), k=5)
    assert r["precision"] > 0.85 and r["recall"] > 0.85 and r["coverage"] > 0.85
    assert 0.8 < r["density"] < 1.2


# ----------------------------------------------------------------------------- kNN labels


def _classes(n_per, seed):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0] * 5, [10.0] + [0.0] * 4, [0.0, 10.0, 0.0, 0.0, 0.0]])
    x = np.concatenate([c + rng.standard_normal((n_per, 5)) for c in centers])
    lab = np.repeat(np.array(["a", "b", "c"]), n_per)
    return x, lab


def test_knn_label_accuracy_perfect_and_chance():
    x, lx = _classes(200, seed=1)
    y, ly = _classes(100, seed=2)
    assert M.knn_label_accuracy(x, lx, y, ly) == pytest.approx(1.0)
    ly_shuffled = np.random.default_rng(0).permutation(ly)
    acc = M.knn_label_accuracy(x, lx, y, ly_shuffled)
    assert abs(acc - 1 / 3) < 0.1
    # unseen generated labels are always wrong
    assert M.knn_label_accuracy(x, lx, y, np.full(len(y), "zzz")) == 0.0


# ----------------------------------------------------------------------------- gene moments


def test_gene_moment_r2():
    rng = np.random.default_rng(0)
    mu_g = rng.gamma(2.0, 2.0, size=50)
    x = rng.poisson(mu_g, size=(400, 50))
    y = rng.poisson(mu_g, size=(400, 50))
    r = M.gene_moment_r2(x, x.copy())
    assert r == {"mean_r2": 1.0, "var_r2": 1.0, "var_ratio": 1.0}
    r = M.gene_moment_r2(x, y)
    assert r["mean_r2"] > 0.95 and r["var_r2"] > 0.8 and abs(r["var_ratio"] - 1.0) < 0.05
    # same means, more / less per-cell noise: the total variance ratio moves past 1 on either side
    noisy = rng.negative_binomial(1.0, 1.0 / (1.0 + mu_g), size=(400, 50))  # NB(theta=1): var mu + mu^2
    smooth = np.tile(np.round(mu_g).astype(int), (400, 1))  # no variation at all
    assert M.gene_moment_r2(x, noisy)["var_ratio"] > 1.5
    assert M.gene_moment_r2(x, smooth)["var_ratio"] < 0.05
    bad = M.gene_moment_r2(x, rng.poisson(mu_g[::-1], size=(400, 50)))
    assert bad["mean_r2"] < 0.5


def test_gene_moments_sparse_matches_dense():
    import scipy.sparse as sp

    x = np.random.default_rng(1).poisson(1.0, size=(60, 30))
    md, vd = M.gene_moments(x)
    ms, vs = M.gene_moments(sp.csr_matrix(x))
    np.testing.assert_allclose(md, ms, atol=1e-10)
    np.testing.assert_allclose(vd, vs, atol=1e-10)


# ----------------------------------------------------------------------------- reconstruction


def test_nb_nll_matches_scipy():
    rng = np.random.default_rng(0)
    mu = rng.gamma(2.0, 1.0, size=(20, 15))
    theta = rng.gamma(2.0, 1.0, size=15)
    x = rng.poisson(mu)
    # scipy nbinom(n=theta, p=theta/(theta+mu))
    want = -nbinom.logpmf(x, theta[None], theta[None] / (theta[None] + mu)).sum(1).mean()
    assert M.nb_nll_per_cell(x, mu, theta) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ScldmError):
        M.nb_nll_per_cell(x, mu[:, :3], theta)


def test_reconstruction_pearson_and_mse():
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(50, 40)).astype(float)
    assert M.reconstruction_pearson(x, x) == pytest.approx(1.0)
    assert M.reconstruction_mse(x, x) == pytest.approx(0.0)
    # the prediction is compared after normalize_total: a rescaled copy is perfect
    assert M.reconstruction_pearson(x, 7.0 * x) == pytest.approx(1.0)
    assert M.reconstruction_mse(x, 7.0 * x) == pytest.approx(0.0, abs=1e-12)
    noise = rng.poisson(3.0, size=(50, 40)).astype(float)
    assert abs(M.reconstruction_pearson(x, noise)) < 0.2
    assert M.reconstruction_mse(x, noise) > 0.1
