"""Reference points for the evaluation table.

- :func:`real_vs_real_split`: two random halves of the real data; the metrics between them
  are the noise floor a perfect generator would reach.
- :func:`independent_genes_baseline`: a naive generator that keeps every gene's marginal
  count distribution within each cell type but destroys all gene-gene structure. A model
  must beat it to have learned more than per-cell-type marginals.
- :func:`label_matched_cells`: real cells (e.g. the training cells) drawn with the requested
  labels: what a generator that reproduces the training distribution exactly scores against
  the held-out reference, with the sampling spread of a set that size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.errors import ScldmError

__all__ = ["independent_genes_baseline", "label_matched_cells", "real_vs_real_split"]

_CHUNK_CELLS = 1024


def _sample_class(x_csc: sp.csc_matrix, n_out: int, rng: np.random.Generator) -> sp.csr_matrix:
    """``n_out`` cells whose genes are drawn independently from the columns of ``x_csc``.

    Gene ``g`` of every output cell is the value of gene ``g`` in a uniformly drawn row of
    ``x_csc`` (an independent row per gene and cell). Rows are exchangeable, so drawing
    ``r ~ U{0..n-1}`` and returning the ``r``-th stored nonzero when ``r < nnz_g`` (else 0)
    is exactly a draw from that gene's empirical distribution, without densifying.
    """
    n, g = x_csc.shape
    indptr = x_csc.indptr
    nnz_g = np.diff(indptr)
    data = x_csc.data
    blocks = []
    for start in range(0, n_out, _CHUNK_CELLS):
        m = min(_CHUNK_CELLS, n_out - start)
        r = rng.integers(0, n, size=(m, g))
        hit = r < nnz_g[None, :]
        vals = np.zeros((m, g), dtype=data.dtype)
        if data.size:
            idx = indptr[:-1][None, :] + r
            vals[hit] = data[idx[hit]]
        blocks.append(sp.csr_matrix(vals))
    if not blocks:
        return sp.csr_matrix((0, g), dtype=data.dtype)
    return sp.vstack(blocks, format="csr")


def independent_genes_baseline(ref, label_key: str, conditions_obs: pd.DataFrame,
                               seed: int = 0):
    """Naive per-cell-type independent-genes generator.

    For every row of ``conditions_obs`` (one requested cell, its class in
    ``conditions_obs[label_key]``), each gene's count is drawn independently from that gene's
    empirical count distribution over the reference cells of the same class. Values are
    taken from ``ref.X``, so they are integer counts whenever the reference holds raw
    counts. Returns an AnnData with ``X`` (CSR, the reference dtype), ``obs`` = a copy of
    ``conditions_obs`` (same row order, index as strings) and ``var`` = a copy of
    ``ref.var``. Classes are processed in sorted order with ``default_rng(seed)``.
    """
    ref_lab, req_lab = _requested_labels("independent_genes_baseline", ref, label_key, conditions_obs)
    x_csr = _csr(ref.X)
    rng = np.random.default_rng(seed)
    n_out, g = len(req_lab), ref.n_vars
    rows = []
    order = []
    for lab in sorted(set(req_lab)):
        out_idx = np.flatnonzero(req_lab == lab)
        x_c = x_csr[np.flatnonzero(ref_lab == lab)].tocsc()
        x_c.sort_indices()
        rows.append(_sample_class(x_c, len(out_idx), rng))
        order.append(out_idx)
    if rows:
        x_out = sp.vstack(rows, format="csr")
        perm = np.empty(n_out, dtype=np.int64)
        perm[np.concatenate(order)] = np.arange(n_out)
        x_out = x_out[perm]
    else:
        x_out = sp.csr_matrix((0, g), dtype=x_csr.dtype)
    return _as_generated(x_out, conditions_obs, ref)


def label_matched_cells(ref, label_key: str, conditions_obs: pd.DataFrame, seed: int = 0):
    """One real cell of ``ref`` per row of ``conditions_obs``, with that row's label.

    The cells of each label are drawn without replacement (with replacement only when a label
    is asked for more cells than ``ref`` has), ``default_rng(seed)``, labels in sorted order.
    Returns an AnnData like :func:`independent_genes_baseline`'s: the drawn rows of ``ref.X``,
    ``obs`` = a copy of ``conditions_obs``, ``var`` = a copy of ``ref.var``.
    """
    ref_lab, req_lab = _requested_labels("label_matched_cells", ref, label_key, conditions_obs)
    rng = np.random.default_rng(seed)
    rows_n = np.empty(len(req_lab), dtype=np.int64)
    for lab in sorted(set(req_lab)):
        out_idx = np.flatnonzero(req_lab == lab)
        pool = np.flatnonzero(ref_lab == lab)
        rows_n[out_idx] = rng.choice(pool, size=len(out_idx), replace=len(out_idx) > len(pool))
    return _as_generated(_csr(ref.X)[rows_n], conditions_obs, ref)


def _csr(x) -> sp.csr_matrix:
    return x.tocsr() if sp.issparse(x) else sp.csr_matrix(x)


def _requested_labels(caller: str, ref, label_key: str, conditions_obs: pd.DataFrame):
    """(reference labels, requested labels) as string arrays; every requested label must occur in ``ref``."""
    if label_key not in ref.obs.columns:
        raise ScldmError(f"{caller}: reference obs has no column {label_key!r}; pick one of {list(ref.obs.columns)}")
    if label_key not in conditions_obs.columns:
        raise ScldmError(f"{caller}: conditions_obs has no column {label_key!r}; add the requested labels as that column")
    ref_lab = ref.obs[label_key].astype(str).to_numpy()
    req_lab = conditions_obs[label_key].astype(str).to_numpy()
    missing = sorted(set(req_lab) - set(ref_lab))
    if missing:
        raise ScldmError(f"{caller}: requested {label_key} value(s) {missing[:5]} have no reference cells; "
                         "request only labels present in the reference")
    return ref_lab, req_lab


def _as_generated(x_ng, conditions_obs: pd.DataFrame, ref):
    import anndata as ad

    obs = conditions_obs.copy()
    obs.index = obs.index.astype(str)
    if not obs.index.is_unique:
        obs.index = pd.Index([str(i) for i in range(len(obs))])
    return ad.AnnData(X=sp.csr_matrix(x_ng), obs=obs, var=ref.var.copy())


def real_vs_real_split(adata, seed: int = 0):
    """Two disjoint random halves ``(first, second)`` of ``adata`` (``floor(n/2)`` / rest)."""
    n = adata.n_obs
    if n < 2:
        raise ScldmError(f"real_vs_real_split: need at least 2 cells, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return adata[np.sort(perm[:half])].copy(), adata[np.sort(perm[half:])].copy()
