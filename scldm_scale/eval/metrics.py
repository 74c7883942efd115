"""Two-sample and reconstruction metrics for generated single-cell data.

Distribution metrics take two p-dimensional samples in the shared representation
(:mod:`scldm_scale.eval.representation`): ``x_np`` the real cells, ``y_np`` the generated
cells. Every O(n^2) metric first subsamples each side to at most ``max_cells`` rows
(without replacement, ``numpy.random.default_rng(seed)``; ``max_cells=None`` uses all
rows), so results are deterministic for a given ``seed``.

Gene-level and reconstruction metrics take raw counts ``*_ng`` (dense or scipy sparse) and
work on normalize-total (``target_sum`` = 1e4) + ``log1p`` expression, the same transform
as the representation.

Pure numpy / scipy / scikit-learn; POT (``ot``) is imported lazily by :func:`wasserstein2`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist, pdist, squareform
from scipy.special import gammaln

from scldm_scale.errors import ScldmError
from scldm_scale.eval.representation import column_moments, log_normalize

__all__ = [
    "subsample",
    "wasserstein2",
    "mmd_rbf",
    "frechet_distance",
    "one_nn_accuracy",
    "prdc",
    "knn_label_accuracy",
    "gene_moments",
    "gene_moment_r2",
    "gene_moment_scores",
    "nb_nll_per_cell",
    "reconstruction_pearson",
    "reconstruction_mse",
]


# ----------------------------------------------------------------------------- helpers

def _as_2d(name: str, a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ScldmError(f"{name} must be a non-empty 2-D array (cells x dims), got shape {a.shape}")
    return a


def _check_pair(x, y):
    x = _as_2d("x_np", x)
    y = _as_2d("y_np", y)
    if x.shape[1] != y.shape[1]:
        raise ScldmError(f"x_np has {x.shape[1]} dims but y_np has {y.shape[1]}; "
                         "embed both with the same representation")
    return x, y


def subsample_idx(n: int, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, size=int(max_cells), replace=False))


def subsample(x_np, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Rows of ``x_np`` subsampled to at most ``max_cells`` (seeded, order kept)."""
    rng = np.random.default_rng(seed)
    return np.asarray(x_np)[subsample_idx(len(x_np), max_cells, rng)]


def _subsample_pair(x, y, max_cells, seed):
    rng = np.random.default_rng(seed)
    ix = subsample_idx(len(x), max_cells, rng)
    iy = subsample_idx(len(y), max_cells, rng)
    return x[ix], y[iy]


# ----------------------------------------------------------------------------- distances

def wasserstein2(x_np, y_np, max_cells: int | None = 2000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance between the two empirical distributions.

    Uniform weights on each (subsampled) sample, cost = squared Euclidean distance
    (``scipy.spatial.distance.cdist(..., "sqeuclidean")``, exactly 0 for equal points),
    optimal transport cost from ``ot.emd2`` (network simplex); returns ``sqrt(cost)``.
    """
    import ot

    x, y = _check_pair(x_np, y_np)
    x, y = _subsample_pair(x, y, max_cells, seed)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    m = cdist(x, y, "sqeuclidean")
    cost = float(ot.emd2(a, b, m, numItermax=10_000_000))
    return float(np.sqrt(max(cost, 0.0)))


def mmd_rbf(x_np, y_np, scales=(0.5, 1, 2, 4, 8), max_cells: int | None = 2000,
            seed: int = 0) -> float:
    """Squared maximum mean discrepancy with a multi-scale RBF kernel (biased V-statistic).

    ``z`` = the pooled (subsampled) sample ``[x; y]``; ``h`` = median of the Euclidean
    distances between all distinct pairs of rows of ``z`` (1.0 if that median is 0);
    bandwidths ``sigma_s = s * h`` for ``s`` in ``scales``; kernel
    ``k(a, b) = mean_s exp(-|a - b|^2 / (2 sigma_s^2))`` (so ``k(a, a) = 1``). Returns the
    biased (V-statistic) estimate ``mean K_xx + mean K_yy - 2 mean K_xy`` (diagonals
    included), clipped at 0. It is exactly 0 for identical samples.
    """
    x, y = _check_pair(x_np, y_np)
    x, y = _subsample_pair(x, y, max_cells, seed)
    nx = len(x)
    z = np.concatenate([x, y], axis=0)
    d2_condensed = pdist(z, "sqeuclidean")
    h = float(np.sqrt(np.median(d2_condensed))) if d2_condensed.size else 0.0
    if not np.isfinite(h) or h <= 0:
        h = 1.0
    d2 = squareform(d2_condensed)
    del d2_condensed
    k = np.zeros_like(d2)
    for s in scales:
        k += np.exp(-d2 / (2.0 * (float(s) * h) ** 2))
    k /= len(scales)
    kxx = k[:nx, :nx].mean()
    kyy = k[nx:, nx:].mean()
    kxy = k[:nx, nx:].mean()
    return float(max(kxx + kyy - 2.0 * kxy, 0.0))


def frechet_distance(x_np, y_np) -> float:
    """Fréchet distance between Gaussians fitted to the two samples (the FID formula).

    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 sqrtm(S_x S_y))`` with sample covariances
    (``np.cov``, ddof=1) and ``scipy.linalg.sqrtm``. If the product is singular (non-finite
    square root), ``1e-6 * I`` is added to both covariances; a complex square root keeps its
    real part. Uses all rows (O(n p^2)).
    """
    from scipy import linalg

    x, y = _check_pair(x_np, y_np)
    if len(x) < 2 or len(y) < 2:
        raise ScldmError("frechet_distance needs at least 2 cells on each side")
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    s_x = np.atleast_2d(np.cov(x, rowvar=False))
    s_y = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(s_x @ s_y)
    if not np.all(np.isfinite(covmean)):
        off = np.eye(s_x.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_x + off) @ (s_y + off))
    covmean = np.real(covmean)
    diff = mu_x - mu_y
    fd = float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def one_nn_accuracy(x_np, y_np, max_cells: int | None = 2000, seed: int = 0) -> float:
    """Leave-one-out 1-nearest-neighbour two-sample accuracy (0.5 is ideal).

    Both sides are subsampled to the same size ``m = min(n_x, n_y, max_cells)``; every point
    of the pooled ``2m`` points is classified (real vs generated) by the label of its nearest
    *other* point (Euclidean; ties -> lowest index, real before generated). Returns the
    fraction classified correctly: ~0.5 when the samples are indistinguishable, ~1.0 when
    well separated, ~0 when every generated cell copies a real one.
    """
    x, y = _check_pair(x_np, y_np)
    m = min(len(x), len(y))
    if max_cells is not None:
        m = min(m, int(max_cells))
    if m < 1:
        raise ScldmError("one_nn_accuracy needs at least 1 cell on each side")
    x, y = _subsample_pair(x, y, m, seed)
    z = np.concatenate([x, y], axis=0)
    lab = np.r_[np.zeros(m, dtype=bool), np.ones(m, dtype=bool)]
    d2 = cdist(z, z, "sqeuclidean")
    np.fill_diagonal(d2, np.inf)
    nn = np.argmin(d2, axis=1)
    return float(np.mean(lab[nn] == lab))


def _kth_nn_radius(a: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``a`` to its k-th nearest other row."""
    d = cdist(a, a, "euclidean")
    # column 0 of the sorted row is the point itself (distance 0)
    kk = min(k, len(a) - 1)
    return np.partition(d, kk, axis=1)[:, kk]


def prdc(x_np, y_np, k: int = 5, max_cells: int | None = 2000, seed: int = 0) -> dict:
    """Precision, recall, density and coverage (Naeem et al., 2020).

    With ``r_i`` the distance from real cell ``x_i`` to its k-th nearest real neighbour and
    ``s_j`` that of generated cell ``y_j`` among the generated cells (Euclidean, self
    excluded), and strict inequalities as in the reference implementation:
    precision = frac_j [exists i: |x_i - y_j| < r_i];
    recall = frac_i [exists j: |x_i - y_j| < s_j];
    density = (1 / (k M)) sum_j #{i: |x_i - y_j| < r_i};
    coverage = frac_i [min_j |x_i - y_j| < r_i].
    """
    x, y = _check_pair(x_np, y_np)
    x, y = _subsample_pair(x, y, max_cells, seed)
    if len(x) < 2 or len(y) < 2:
        raise ScldmError("prdc needs at least 2 cells on each side")
    r_x = _kth_nn_radius(x, k)
    r_y = _kth_nn_radius(y, k)
    d_xy = cdist(x, y, "euclidean")  # (n_real, n_gen)
    inside_real = d_xy < r_x[:, None]
    precision = float(inside_real.any(axis=0).mean())
    recall = float((d_xy < r_y[None, :]).any(axis=1).mean())
    density = float(inside_real.sum(axis=0).mean() / k)
    coverage = float((d_xy.min(axis=1) < r_x).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def knn_label_accuracy(x_real, labels_real, y_gen, labels_gen, k: int = 15,
                       max_cells: int | None = 2000, seed: int = 0) -> float:
    """Accuracy on the generated cells of a kNN classifier trained on the real cells.

    ``sklearn.neighbors.KNeighborsClassifier(n_neighbors=min(k, n_real))`` (uniform weights,
    Euclidean) fitted on ``(x_real, labels_real)``, scored on ``(y_gen, labels_gen)``.
    Labels are compared as strings; a generated label absent from the real cells is always
    wrong. Each side is subsampled to ``max_cells`` first.
    """
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _check_pair(x_real, y_gen)
    lx = np.asarray(labels_real).astype(str)
    ly = np.asarray(labels_gen).astype(str)
    if len(lx) != len(x) or len(ly) != len(y):
        raise ScldmError("knn_label_accuracy: labels must have one entry per cell "
                         f"(real {len(lx)} vs {len(x)}, generated {len(ly)} vs {len(y)})")
    rng = np.random.default_rng(seed)
    ix = subsample_idx(len(x), max_cells, rng)
    iy = subsample_idx(len(y), max_cells, rng)
    clf = KNeighborsClassifier(n_neighbors=min(int(k), len(ix)))
    clf.fit(x[ix], lx[ix])
    return float(np.mean(clf.predict(y[iy]) == ly[iy]))


# ----------------------------------------------------------------------------- gene level

def gene_moments(x_ng, target_sum: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance (ddof=0) of normalize-total + log1p expression."""
    return column_moments(log_normalize(x_ng, target_sum))


def _r2(true_g: np.ndarray, pred_g: np.ndarray) -> float:
    ss_res = float(np.sum((pred_g - true_g) ** 2))
    ss_tot = float(np.sum((true_g - true_g.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else float("nan")
    return 1.0 - ss_res / ss_tot


def gene_moment_scores(mean_ref_g: np.ndarray, var_ref_g: np.ndarray, mean_gen_g: np.ndarray,
                       var_gen_g: np.ndarray) -> dict:
    """``mean_r2``, ``var_r2`` and ``var_ratio`` from per-gene moments (see :func:`gene_moment_r2`)."""
    total_ref = float(np.sum(var_ref_g))
    return {"mean_r2": _r2(mean_ref_g, mean_gen_g), "var_r2": _r2(var_ref_g, var_gen_g),
            "var_ratio": float(np.sum(var_gen_g)) / total_ref if total_ref > 0 else float("nan")}


def gene_moment_r2(x_ref_ng, x_gen_ng, target_sum: float = 1e4) -> dict:
    """Generated vs real per-gene means and variances.

    Both count matrices (same genes, same order) are normalize-total + log1p transformed;
    per gene the mean and variance (ddof=0) over cells are computed; then
    ``R^2 = 1 - sum_g (gen_g - real_g)^2 / sum_g (real_g - mean(real))^2`` (real is the
    truth, ``sklearn.metrics.r2_score(real, gen)``), for means (``mean_r2``) and variances
    (``var_r2``): 1 is perfect; it can be negative. ``var_ratio = sum_g var_gen_g / sum_g
    var_real_g``: the total per-gene variance of the generated cells relative to the real ones
    (1 is right; > 1 noisier, < 1 smoother than the real cells). Distances fitted on a small
    reference reward extra noise (it spreads into the reference's noise PCs, which FD weighs),
    so read FD together with ``var_ratio``.
    """
    if x_ref_ng.shape[1] != x_gen_ng.shape[1]:
        raise ScldmError(f"gene_moment_r2: reference has {x_ref_ng.shape[1]} genes, generated "
                         f"{x_gen_ng.shape[1]}; align genes first")
    return gene_moment_scores(*gene_moments(x_ref_ng, target_sum), *gene_moments(x_gen_ng, target_sum))


# ----------------------------------------------------------------------------- reconstruction

def _dense_f64(name: str, a) -> np.ndarray:
    a = a.toarray() if sp.issparse(a) else np.asarray(a)
    a = a.astype(np.float64, copy=False)
    if a.ndim != 2:
        raise ScldmError(f"{name} must be 2-D (cells x genes), got shape {a.shape}")
    return a


def nb_nll_per_cell(counts_ng, mu_ng, theta_g, eps: float = 1e-8) -> float:
    """Negative-binomial NLL summed over genes, averaged over cells.

    NB with mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2 / theta``):
    ``log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta * (log(theta + eps) - log(theta + mu + eps)) + x * (log(mu + eps) - log(theta + mu + eps))``
    (the scvi-tools form, ``eps = 1e-8``). ``theta_g`` has shape ``(g,)`` or ``(n, g)``.
    """
    x = _dense_f64("counts_ng", counts_ng)
    mu = _dense_f64("mu_ng", mu_ng)
    theta = np.asarray(theta_g, dtype=np.float64)
    if mu.shape != x.shape:
        raise ScldmError(f"nb_nll_per_cell: mu_ng shape {mu.shape} != counts_ng shape {x.shape}")
    try:
        theta = np.broadcast_to(theta, x.shape)
    except ValueError:
        raise ScldmError(f"nb_nll_per_cell: theta_g shape {theta.shape} does not broadcast to "
                         f"counts shape {x.shape}; pass one dispersion per gene") from None
    log_theta_mu = np.log(theta + mu + eps)
    ll = (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0)
          + theta * (np.log(theta + eps) - log_theta_mu)
          + x * (np.log(mu + eps) - log_theta_mu))
    return float(-ll.sum(axis=1).mean())


def _paired_lognorm(x_true_ng, x_pred_ng, target_sum):
    if x_true_ng.shape != x_pred_ng.shape:
        raise ScldmError(f"reconstruction: x_true_ng shape {x_true_ng.shape} != x_pred_ng shape "
                         f"{x_pred_ng.shape}")
    a = _dense_f64("x_true_ng", log_normalize(x_true_ng, target_sum))
    b = _dense_f64("x_pred_ng", log_normalize(x_pred_ng, target_sum))
    return a, b


def reconstruction_pearson(x_true_ng, x_pred_ng, target_sum: float = 1e4) -> float:
    """Per-cell Pearson correlation across genes, averaged over cells.

    Both matrices (counts, or the predicted NB means for ``x_pred_ng``) are
    normalize-total (``target_sum``) + log1p transformed; for each cell the Pearson
    correlation between its true and predicted gene vectors is computed; cells where either
    vector is constant (undefined correlation) are skipped; the mean over the remaining
    cells is returned (``nan`` if none remain).
    """
    a, b = _paired_lognorm(x_true_ng, x_pred_ng, target_sum)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    ok = den > 0
    if not ok.any():
        return float("nan")
    r = (a * b).sum(axis=1)[ok] / den[ok]
    return float(r.mean())


def reconstruction_mse(x_true_ng, x_pred_ng, target_sum: float = 1e4) -> float:
    """Mean squared error over all cells x genes of normalize-total + log1p expression."""
    a, b = _paired_lognorm(x_true_ng, x_pred_ng, target_sum)
    return float(np.mean((a - b) ** 2))
