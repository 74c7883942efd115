"""The one fixed cell representation every distribution metric is computed in.

Definition (fitted on the **reference / real cells only**, then applied unchanged to every
set that is compared with them):

1. **Normalize total**: each cell's raw counts are divided by the cell's total count over
   *all* genes and multiplied by ``target_sum`` (1e4). A cell with total 0 stays all zero.
2. **log1p**: ``log(1 + x)`` of the normalized values.
3. **Highly variable genes (HVGs)**, chosen on the reference's raw counts with scanpy's
   ``seurat_v3`` flavor (:func:`highly_variable_genes`: variance of the counts standardized
   by a loess fit of variance on mean, clipped; the ``n_hvg`` (2000) genes with the highest
   standardized variance). If the data have ``<= n_hvg`` genes, all genes are kept. The
   kept genes are stored in their original order. The same function selects the genes of
   the generation benchmark and of the in-training sample check.
4. **Center only** (no scaling to unit variance): the per-HVG mean of the log-normalized
   reference is subtracted.
5. **PCA** with ``n_pcs`` (30) components: ``sklearn.decomposition.PCA(n_components=n_pcs,
   svd_solver="auto", random_state=seed)`` fitted on the centered reference HVG matrix.
   ``n_pcs`` is clipped to ``min(n_pcs, n_ref_cells - 1, n_hvg_kept)`` so tiny references
   still work. Component ``0`` is the direction of largest variance, so the first two
   columns of the output are the usual PCA-2 view.

:meth:`Representation.transform` maps raw counts ``x_ng`` (dense or scipy sparse, the
same genes in the same order as the reference) to ``x_np`` with steps 1-2, the stored HVG
subset, the stored reference mean and the stored components: ``x_np = (log1p(norm(x))[:,
hvg] - mean_h) @ components_ph.T``. Nothing is refitted on generated data.

:func:`align_genes` puts a reference and a generated AnnData on the same genes (by
``var_names``) before any of this.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scldm_scale.errors import ScldmError

__all__ = ["Representation", "fit_representation", "align_genes", "highly_variable_genes", "log_normalize"]

_CHUNK_CELLS = 8192


def log_normalize(x_ng, target_sum: float = 1e4):
    """Normalize each cell to ``target_sum`` total counts, then ``log1p``.

    Accepts a dense array or a scipy sparse matrix; returns the same kind (CSR for sparse,
    float64 dense otherwise). Cells with total 0 stay all zero.
    """
    if sp.issparse(x_ng):
        x = sp.csr_matrix(x_ng, dtype=np.float64, copy=True)
        total_n = np.asarray(x.sum(axis=1)).ravel()
        scale_n = np.divide(target_sum, total_n, out=np.zeros_like(total_n), where=total_n > 0)
        x = sp.diags(scale_n) @ x
        x = sp.csr_matrix(x)
        np.log1p(x.data, out=x.data)
        return x
    x = np.asarray(x_ng, dtype=np.float64)
    if x.ndim != 2:
        raise ScldmError(f"expression matrix must be 2-D (cells x genes), got shape {x.shape}")
    total_n = x.sum(axis=1)
    scale_n = np.divide(target_sum, total_n, out=np.zeros_like(total_n), where=total_n > 0)
    return np.log1p(x * scale_n[:, None])


def column_moments(x_ng) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and population variance (ddof=0) of a dense or sparse matrix."""
    if sp.issparse(x_ng):
        mean_g = np.asarray(x_ng.mean(axis=0)).ravel()
        sq_g = np.asarray(x_ng.multiply(x_ng).mean(axis=0)).ravel()
        return mean_g, np.maximum(sq_g - mean_g**2, 0.0)
    x = np.asarray(x_ng, dtype=np.float64)
    return x.mean(axis=0), x.var(axis=0)


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@dataclass
class Representation:
    """A fitted log-normalize -> HVG -> center -> PCA map (see the module docstring)."""

    target_sum: float
    n_genes: int
    hvg_idx_h: np.ndarray
    mean_h: np.ndarray
    components_ph: np.ndarray
    explained_variance_ratio_p: np.ndarray
    seed: int = 0
    var_names_g: list[str] | None = field(default=None, repr=False)

    @property
    def n_pcs(self) -> int:
        return int(self.components_ph.shape[0])

    @property
    def n_hvg(self) -> int:
        return int(self.hvg_idx_h.shape[0])

    def transform(self, x_ng) -> np.ndarray:
        """Raw counts ``x_ng`` (dense or sparse, reference genes in reference order) -> ``x_np``."""
        if x_ng.ndim != 2 or x_ng.shape[1] != self.n_genes:
            raise ScldmError(
                f"Representation.transform: x_ng has shape {tuple(x_ng.shape)} but the "
                f"representation was fitted on {self.n_genes} genes; align genes first "
                "(scldm_scale.eval.align_genes)"
            )
        n = x_ng.shape[0]
        out_np = np.empty((n, self.n_pcs), dtype=np.float64)
        if sp.issparse(x_ng):
            x_ng = sp.csr_matrix(x_ng)
        for start in range(0, n, _CHUNK_CELLS):
            stop = min(start + _CHUNK_CELLS, n)
            xl = log_normalize(x_ng[start:stop], self.target_sum)
            xh = _dense(xl[:, self.hvg_idx_h]) - self.mean_h
            out_np[start:stop] = xh @ self.components_ph.T
        return out_np


def highly_variable_genes(x_ng, n_top: int) -> np.ndarray:
    """Indices (ascending) of the ``n_top`` highly variable genes of raw counts ``x_ng`` (cells x genes,
    dense or sparse): scanpy's ``seurat_v3`` flavor on the counts. All genes when there are at most
    ``n_top``; genes that are zero in every cell are never chosen."""
    import anndata as ad
    import scanpy as sc

    g = x_ng.shape[1]
    if g <= n_top:
        return np.arange(g)
    counts = sp.csr_matrix(x_ng, dtype=np.float32) if sp.issparse(x_ng) else np.asarray(x_ng, dtype=np.float32)
    expressed_g = np.asarray((counts != 0).sum(axis=0)).ravel() > 0
    if int(expressed_g.sum()) <= n_top:
        return np.flatnonzero(expressed_g)
    adata = ad.AnnData(counts[:, expressed_g] if not sp.issparse(counts) else counts[:, np.flatnonzero(expressed_g)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, inplace=False)
    chosen = np.flatnonzero(expressed_g)[np.asarray(table["highly_variable"], dtype=bool)]
    return np.sort(chosen).astype(np.int64)


def fit_representation(x_ref_ng, n_hvg: int = 2000, n_pcs: int = 30, seed: int = 0,
                       target_sum: float = 1e4,
                       var_names_g: list[str] | None = None) -> Representation:
    """Fit the fixed representation on reference raw counts ``x_ref_ng`` (dense or sparse)."""
    from sklearn.decomposition import PCA

    if x_ref_ng.ndim != 2:
        raise ScldmError(f"fit_representation: x_ref_ng must be 2-D, got shape {x_ref_ng.shape}")
    n, g = x_ref_ng.shape
    if n < 2:
        raise ScldmError(f"fit_representation: the reference has {n} cell(s); need at least 2")
    if n_hvg < 1 or n_pcs < 1:
        raise ScldmError(f"fit_representation: n_hvg ({n_hvg}) and n_pcs ({n_pcs}) must be >= 1")
    xl_ng = log_normalize(x_ref_ng, target_sum)
    hvg_idx_h = highly_variable_genes(x_ref_ng, n_hvg)
    xh = _dense(xl_ng[:, hvg_idx_h]).astype(np.float64)
    mean_h = xh.mean(axis=0)
    xh -= mean_h
    k = int(min(n_pcs, n - 1, xh.shape[1]))
    if k < n_pcs:
        warnings.warn(f"fit_representation: n_pcs clipped from {n_pcs} to {k} "
                      f"({n} reference cells, {xh.shape[1]} genes)", stacklevel=2)
    pca = PCA(n_components=k, svd_solver="auto", random_state=seed)
    pca.fit(xh)
    return Representation(
        target_sum=float(target_sum),
        n_genes=int(g),
        hvg_idx_h=hvg_idx_h.astype(np.int64),
        mean_h=mean_h,
        components_ph=np.asarray(pca.components_, dtype=np.float64),
        explained_variance_ratio_p=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        seed=int(seed),
        var_names_g=list(var_names_g) if var_names_g is not None else None,
    )


def align_genes(ref, gen, min_overlap: float = 0.5):
    """Put ``ref`` and ``gen`` (AnnData) on the same genes, in the reference order.

    Genes are matched by ``var_names`` (gene ids). Identical lists are returned untouched; the
    same set in another order is reordered silently; differing sets keep the intersection
    (in reference order) with a ``UserWarning`` counting the genes dropped on each side.
    Fewer than ``min_overlap`` x (reference genes) shared -> :class:`ScldmError`.
    Returns ``(ref, gen)`` (copies when subsetting was needed).
    """
    common = common_genes(ref.var_names, gen.var_names, min_overlap, stacklevel=3)
    if common is None:
        return ref, gen
    ref_out = ref if len(common) == ref.n_vars else ref[:, common].copy()
    return ref_out, gen[:, common].copy()


def common_genes(ref_names, gen_names, min_overlap: float = 0.5, stacklevel: int = 2):
    """Shared gene ids in reference order, or ``None`` when both lists are identical.

    Warns when the sets differ; raises :class:`ScldmError` below ``min_overlap``.
    """
    for name, names in (("reference", ref_names), ("generated", gen_names)):
        if not names.is_unique:
            raise ScldmError(f"align_genes: the {name} var_names contain duplicate gene ids; "
                             "make them unique (e.g. adata.var_names_make_unique()) or use Ensembl ids")
    if ref_names.equals(gen_names):
        return None
    common = ref_names[ref_names.isin(gen_names)]
    n_ref, n_gen, n_common = len(ref_names), len(gen_names), len(common)
    frac = n_common / max(n_ref, 1)
    if n_common == 0 or frac < min_overlap:
        raise ScldmError(
            f"align_genes: only {n_common} of {n_ref} reference genes ({frac:.1%}) are in the "
            f"generated var_names (need >= {min_overlap:.0%}); make sure both use the same gene "
            "ids (e.g. Ensembl ids in var_names)"
        )
    if not (n_common == n_ref == n_gen):
        warnings.warn(
            f"align_genes: gene sets differ; dropped {n_ref - n_common} reference genes and "
            f"{n_gen - n_common} generated genes, keeping {n_common} shared genes",
            UserWarning, stacklevel=stacklevel + 1,
        )
    return common
