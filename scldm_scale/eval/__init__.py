"""Evaluation of generated single-cell data (pure numpy / scipy / scikit-learn; no torch).

- :mod:`~scldm_scale.eval.representation`: the one fixed representation (log-normalize,
  reference HVGs, center, PCA) and gene alignment.
- :mod:`~scldm_scale.eval.metrics`: W2, MMD, Fréchet distance, 1-NN accuracy, PRDC, kNN
  label accuracy, per-gene moment R^2, reconstruction NB NLL / Pearson / MSE.
- :mod:`~scldm_scale.eval.baselines`: real-vs-real split and independent-genes baseline.
- :mod:`~scldm_scale.eval.evaluate`: :func:`evaluate`, :func:`compare`, :func:`format_table`.
- :mod:`~scldm_scale.eval.report`: :func:`write_report` (PNG / HTML).
"""

from scldm_scale.eval.baselines import independent_genes_baseline, label_matched_cells, real_vs_real_split
from scldm_scale.eval.evaluate import compare, evaluate, format_table
from scldm_scale.eval.metrics import (
    frechet_distance,
    gene_moment_r2,
    gene_moment_scores,
    gene_moments,
    knn_label_accuracy,
    mmd_rbf,
    nb_nll_per_cell,
    one_nn_accuracy,
    prdc,
    reconstruction_mse,
    reconstruction_pearson,
    wasserstein2,
)
from scldm_scale.eval.report import write_report
from scldm_scale.eval.representation import Representation, align_genes, fit_representation

__all__ = [
    "Representation",
    "align_genes",
    "compare",
    "evaluate",
    "fit_representation",
    "format_table",
    "frechet_distance",
    "gene_moment_r2",
    "gene_moment_scores",
    "gene_moments",
    "independent_genes_baseline",
    "knn_label_accuracy",
    "label_matched_cells",
    "mmd_rbf",
    "nb_nll_per_cell",
    "one_nn_accuracy",
    "prdc",
    "real_vs_real_split",
    "reconstruction_mse",
    "reconstruction_pearson",
    "wasserstein2",
    "write_report",
]
