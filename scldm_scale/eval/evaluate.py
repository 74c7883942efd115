"""Evaluate generated cells against real cells: one call, one JSON, one report.

:func:`evaluate` aligns genes, fits the fixed representation
(:mod:`scldm_scale.eval.representation`) on the reference, embeds both sets and computes
every metric of :mod:`scldm_scale.eval.metrics`. :func:`compare` does the same for several
generated sets against ONE shared representation (fit once), which is what the results
table needs (real-vs-real noise floor / model / naive baseline); :func:`format_table`
prints it.

Result keys (all floats unless noted):
``w2``, ``mmd``, ``fd``, ``nn1``, ``precision``, ``recall``, ``density``, ``coverage``
(in the representation), ``mean_r2``, ``var_r2``, ``var_ratio`` (per-gene moments over all
genes; :func:`scldm_scale.eval.metrics.gene_moment_r2`),
``knn_acc/<label>`` for every label key present in both ``obs``, ``per_condition``:
``{label: {value: {"w2", "mmd", "n_ref", "n_gen"}}}`` for values with >= 20 cells on both
sides, and bookkeeping ints ``n_ref``, ``n_gen``, ``n_genes``, ``n_hvg``, ``n_pcs``.
Counts are read from ``X`` (raw counts, dense or sparse) of both AnnData objects.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import scipy.sparse as sp

from scldm_scale.errors import ScldmError
from scldm_scale.eval import metrics as M
from scldm_scale.eval.report import write_report
from scldm_scale.io import write_bytes_atomic
from scldm_scale.eval.representation import (
    Representation,
    common_genes,
    align_genes,
    fit_representation,
)

__all__ = ["evaluate", "compare", "format_table", "read_reference", "MIN_CELLS_PER_CONDITION"]

MIN_CELLS_PER_CONDITION = 20
DEFAULT_TABLE_KEYS = ("w2", "mmd", "fd", "nn1", "knn_acc/cell_type")


# ----------------------------------------------------------------------------- helpers

def raw_counts(adata, name: str):
    x = adata.X
    if x is None:
        raise ScldmError(f"evaluate: the {name} AnnData has no X; store raw counts in X")
    if adata.n_obs == 0:
        raise ScldmError(f"evaluate: the {name} AnnData has 0 cells")
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        lo = x.data.min() if x.nnz else 0.0
    else:
        x = np.asarray(x)
        lo = x.min()
    if not np.isfinite(lo) or lo < 0:
        raise ScldmError(f"evaluate: the {name} X has negative or non-finite values; "
                         "pass raw (non-negative) counts in X, not normalized/scaled data")
    return x


def read_reference(path, max_cells: int, seed: int = 0):
    """The cells of an ``.h5ad`` in memory, subsampled (seeded, order kept) to at most ``max_cells``."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    n = backed.n_obs
    try:
        if n < 2:
            raise ScldmError(f"{path}: has {n} cell(s); need at least 2 reference cells")
        if n <= max_cells:
            return ad.read_h5ad(path)
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
        return backed[idx].to_memory()
    finally:
        backed.file.close()


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    return obj


def _write_json(path: str, obj) -> None:
    """Atomic JSON write (temp file + rename); non-finite floats become ``null``."""
    text = json.dumps(_to_jsonable(obj), indent=2, sort_keys=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def _shared_labels(reference, generated, label_keys) -> list[str]:
    keys = []
    for key in label_keys or []:
        if key in reference.obs.columns and key in generated.obs.columns:
            keys.append(key)
        else:
            warnings.warn(f"evaluate: label key {key!r} is not in both reference and generated "
                          "obs; its kNN accuracy and per-condition metrics are skipped",
                          UserWarning, stacklevel=3)
    return keys


class _RefState:
    """Everything computed once on the reference, shared by all candidates."""

    def __init__(self, reference, rep: Representation, x_ng):
        self.adata = reference
        self.rep = rep
        self.x_np = rep.transform(x_ng)
        self.mean_g, self.var_g = M.gene_moments(x_ng, rep.target_sum)


def _evaluate_one(ref: _RefState, generated, label_keys, seed, max_cells, per_condition,
                  report_path, embedding) -> dict:
    rep = ref.rep
    y_ng = raw_counts(generated, "generated")
    y_np = rep.transform(y_ng)
    x_np = ref.x_np
    res: dict = {}
    res["w2"] = M.wasserstein2(x_np, y_np, max_cells=max_cells, seed=seed)
    res["mmd"] = M.mmd_rbf(x_np, y_np, max_cells=max_cells, seed=seed)
    res["fd"] = M.frechet_distance(x_np, y_np)
    res["nn1"] = M.one_nn_accuracy(x_np, y_np, max_cells=max_cells, seed=seed)
    res.update(M.prdc(x_np, y_np, max_cells=max_cells, seed=seed))

    mean_gen_g, var_gen_g = M.gene_moments(y_ng, rep.target_sum)
    res.update(M.gene_moment_scores(ref.mean_g, ref.var_g, mean_gen_g, var_gen_g))

    labels = _shared_labels(ref.adata, generated, label_keys)
    lab_ref = {k: ref.adata.obs[k].astype(str).to_numpy() for k in labels}
    lab_gen = {k: generated.obs[k].astype(str).to_numpy() for k in labels}
    for k in labels:
        res[f"knn_acc/{k}"] = M.knn_label_accuracy(x_np, lab_ref[k], y_np, lab_gen[k],
                                                   max_cells=max_cells, seed=seed)
    if per_condition:
        pc: dict = {}
        for k in labels:
            pc[k] = {}
            values = sorted(set(lab_ref[k]) & set(lab_gen[k]))
            for v in values:
                mr, mg = lab_ref[k] == v, lab_gen[k] == v
                n_r, n_g = int(mr.sum()), int(mg.sum())
                if n_r < MIN_CELLS_PER_CONDITION or n_g < MIN_CELLS_PER_CONDITION:
                    continue
                pc[k][v] = {
                    "w2": M.wasserstein2(x_np[mr], y_np[mg], max_cells=max_cells, seed=seed),
                    "mmd": M.mmd_rbf(x_np[mr], y_np[mg], max_cells=max_cells, seed=seed),
                    "n_ref": n_r,
                    "n_gen": n_g,
                }
        res["per_condition"] = pc
    res.update({"n_ref": int(x_np.shape[0]), "n_gen": int(y_np.shape[0]),
                "n_genes": int(rep.n_genes), "n_hvg": rep.n_hvg, "n_pcs": rep.n_pcs})

    if report_path:
        rng = np.random.default_rng(seed)
        ir = M.subsample_idx(len(x_np), max_cells, rng)
        ig = M.subsample_idx(len(y_np), max_cells, rng)
        lr = lab_ref[labels[0]][ir] if labels else None
        lg = lab_gen[labels[0]][ig] if labels else None
        gene_stats = {"mean_real_g": ref.mean_g, "mean_gen_g": mean_gen_g,
                      "var_real_g": ref.var_g, "var_gen_g": var_gen_g}
        write_report(report_path, x_np[ir], y_np[ig], lr, lg, res, gene_stats,
                     embedding=embedding, seed=seed)
    return res


# ----------------------------------------------------------------------------- public API

def evaluate(reference, generated, label_keys: list[str], out_json: str | None = None,
             report_path: str | None = None, seed: int = 0, n_pcs: int = 30, n_hvg: int = 2000,
             max_cells: int = 2000, per_condition: bool = True, min_overlap: float = 0.5,
             embedding: str = "auto") -> dict:
    """Compare ``generated`` cells with ``reference`` cells (both AnnData, raw counts in X).

    Genes are aligned by ``var_names`` (:func:`align_genes`: warning when they differ,
    :class:`ScldmError` below ``min_overlap``); the representation is fitted on the
    reference; metrics as listed in the module docstring. ``out_json``: the result is also
    written there atomically. ``report_path``: a PNG (or ``.html``) report
    (:func:`write_report`, ``embedding`` = "auto" | "pca" | "umap").
    """
    reference, generated = align_genes(reference, generated, min_overlap=min_overlap)
    x_ref_ng = raw_counts(reference, "reference")
    rep = fit_representation(x_ref_ng, n_hvg=n_hvg, n_pcs=n_pcs, seed=seed,
                             var_names_g=list(reference.var_names))
    ref = _RefState(reference, rep, x_ref_ng)
    res = _evaluate_one(ref, generated, label_keys, seed, max_cells, per_condition,
                        report_path, embedding)
    if out_json:
        _write_json(out_json, res)
    return res


def compare(reference, candidates: dict, label_keys: list[str], out_json: str | None = None,
            report_dir: str | None = None, seed: int = 0, n_pcs: int = 30, n_hvg: int = 2000,
            max_cells: int = 2000, per_condition: bool = True, min_overlap: float = 0.5,
            embedding: str = "auto") -> dict:
    """Evaluate several generated sets against one reference with ONE shared representation.

    Genes: every candidate is checked against the reference as in :func:`align_genes`; all
    sets are then restricted to the genes shared by the reference and *every* candidate, and
    the representation is fitted once on that reference. Returns ``{name: result}`` (same
    keys as :func:`evaluate`). ``out_json`` gets the whole dict; ``report_dir`` gets one
    ``<name>.png`` per candidate.
    """
    import os

    if not candidates:
        raise ScldmError("compare: no candidates given; pass {name: AnnData}")
    keep = reference.var_names
    for name, cand in candidates.items():
        try:
            common = common_genes(reference.var_names, cand.var_names, min_overlap, stacklevel=3)
        except ScldmError as e:
            raise ScldmError(f"compare: candidate {name!r}: {e}") from None
        if common is not None:
            keep = keep[keep.isin(common)]
    ref_a = reference if len(keep) == reference.n_vars else reference[:, keep].copy()
    x_ref_ng = raw_counts(ref_a, "reference")
    rep = fit_representation(x_ref_ng, n_hvg=n_hvg, n_pcs=n_pcs, seed=seed,
                             var_names_g=list(ref_a.var_names))
    ref = _RefState(ref_a, rep, x_ref_ng)
    results: dict = {}
    for name, cand in candidates.items():
        cand_a = cand if cand.var_names.equals(keep) else cand[:, keep].copy()
        report_path = os.path.join(report_dir, f"{name}.png") if report_dir else None
        results[name] = _evaluate_one(ref, cand_a, label_keys, seed, max_cells, per_condition,
                                      report_path, embedding)
    if out_json:
        _write_json(out_json, results)
    return results


def format_table(results: dict, keys=DEFAULT_TABLE_KEYS) -> str:
    """Plain-text table: one row per result name, one column per key (``-`` when missing)."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, (float, np.floating)):
            return "nan" if not math.isfinite(float(v)) else f"{float(v):.4g}"
        return str(v)

    header = ["name", *keys]
    rows = [[str(name), *(fmt(r.get(k)) if isinstance(r, dict) else "-" for k in keys)]
            for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)
