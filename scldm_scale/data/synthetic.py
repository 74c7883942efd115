"""Synthetic single-cell atlas: negative-binomial counts with cell types, tissues and donors.

The generative model (deterministic given ``seed``):

- a shared background expression profile, log-proportions ~ Normal(0, 2.2) (lognormal, so
  a few genes dominate and most are rare, as in real data);
- per cell type: the background plus its own baseline perturbation (Normal(0, 0.35)) and a
  private set of marker genes (drawn from the better-expressed half of the genes, disjoint
  between types) up-regulated by a log-fold change in [1.5, 3];
- tissue (Normal(0, 0.25)) and donor (Normal(0, 0.1)) additive log effects;
- library sizes lognormal (median 0.75 UMIs per gene, sigma 0.55: ~12x between the 1% and
  99% quantiles), per-gene NB dispersion theta ~ LogNormal(log 1.2, 0.5);
- counts ~ Poisson(Gamma(theta, mean / theta)) (gamma-Poisson = NB), giving ~85% zeros.

Shards are generated one at a time (memory bounded by one shard plus a dense chunk of at
most 2**22 values), written into ``<out_dir>.tmp-<pid>`` and renamed at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from scldm_scale.data.labels import LabelTables
from scldm_scale.data.vocab import GeneVocab, write_json_atomic
from scldm_scale.errors import ScldmError

FORMAT = "scldm-scale/h5ad-shards"
FORMAT_VERSION = 1
LABEL_COLUMNS = ("cell_type", "tissue", "donor")
_CHUNK_VALUES = 1 << 22  # dense values generated at once


def gene_id(i: int) -> str:
    """Ensembl-like id of synthetic gene ``i`` (0-based): ``ENSSYN00000000001`` for 0."""
    return f"ENSSYN{i + 1:011d}"


def _write_h5ad(adata, path: str) -> None:
    adata.write_h5ad(path)


class _Model:
    """Parameters of the generative model, drawn once from the seed."""

    def __init__(self, n_genes: int, n_cell_types: int, n_tissues: int, n_donors: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x5C1D])
        g, t = n_genes, n_cell_types
        background_g = rng.normal(0.0, 2.2, g)
        self.type_logits_tg = background_g[None, :] + rng.normal(0.0, 0.35, (t, g))
        # markers come from the better-expressed half of the genes (detectable, like real markers)
        expressed = np.flatnonzero(background_g >= np.median(background_g))
        n_markers = max(2, len(expressed) // t)
        perm = rng.permutation(expressed)
        self.markers_t = []
        for k in range(t):
            markers = np.take(perm, np.arange(k * n_markers, (k + 1) * n_markers), mode="wrap")
            self.type_logits_tg[k, markers] += rng.uniform(1.5, 3.0, n_markers)
            self.markers_t.append(np.sort(markers))
        self.tissue_lg = rng.normal(0.0, 0.25, (n_tissues, g))
        self.donor_lg = rng.normal(0.0, 0.1, (n_donors, g))
        self.theta_g = np.exp(rng.normal(np.log(1.2), 0.5, g))
        self.type_p = rng.dirichlet(np.full(t, 5.0))
        self.log_lib_median = np.log(max(0.75 * g, 5.0))
        self.log_lib_sigma = 0.55
        self.n_tissues, self.n_donors = n_tissues, n_donors
        # continuous gene programs (cell cycle, interferon response, stress, ...): each cell has an
        # activity per program, whose mean depends on its type; the program up-regulates a gene set
        # together, so genes co-vary within a cell type as in real data
        n_programs = 4
        self.program_kg = np.zeros((n_programs, g))
        for k in range(n_programs):
            genes = rng.choice(expressed, size=max(2, len(expressed) // 10), replace=False)
            self.program_kg[k, genes] = rng.uniform(0.6, 1.4, len(genes))
        self.program_mean_tk = rng.uniform(-1.0, 1.0, (t, n_programs))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[scipy.sparse.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
        t_n = rng.choice(len(self.type_p), size=n, p=self.type_p)
        tissue_n = rng.integers(0, self.n_tissues, n)
        donor_n = rng.integers(0, self.n_donors, n)
        lib_n = np.exp(rng.normal(self.log_lib_median, self.log_lib_sigma, n))
        activity_nk = np.maximum(rng.normal(self.program_mean_tk[t_n], 0.7), 0.0)
        g = self.theta_g.shape[0]
        chunk = max(1, _CHUNK_VALUES // g)
        blocks = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits = self.type_logits_tg[t_n[lo:hi]] + self.tissue_lg[tissue_n[lo:hi]] + self.donor_lg[donor_n[lo:hi]]
            logits += activity_nk[lo:hi] @ self.program_kg
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            mu = lib_n[lo:hi, None] * p
            lam = rng.gamma(self.theta_g[None, :], mu / self.theta_g[None, :])
            blocks.append(scipy.sparse.csr_matrix(rng.poisson(lam).astype(np.int32)))
        x = scipy.sparse.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
        x.sort_indices()
        return x.astype(np.int32), t_n, tissue_n, donor_n


def _split_sizes(n: int, k: int) -> list[int]:
    base, rem = divmod(n, k)
    return [base + (1 if i < rem else 0) for i in range(k)]


def write_synthetic_atlas(
    out_dir: str | os.PathLike,
    n_cells: int,
    n_genes: int,
    n_shards: int,
    n_cell_types: int = 8,
    n_tissues: int = 4,
    n_donors: int = 6,
    heldout_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic atlas of h5ad shards, ``metadata.json``, ``vocab.json`` and ``labels.json``.

    ``n_cells`` is the total; ``round(n_cells * heldout_fraction)`` of them go to
    ``heldout.h5ad`` (cell ids after the training cells), the rest are split evenly over
    ``n_shards`` files ``shard_0000.h5ad ...``. Returns the metadata dict.
    """
    import anndata

    out_dir = os.path.abspath(os.fspath(out_dir))
    n_heldout = int(round(n_cells * heldout_fraction))
    n_train = n_cells - n_heldout
    if not 0.0 <= heldout_fraction < 1.0:
        raise ScldmError(f"heldout_fraction={heldout_fraction}: must be in [0, 1)")
    if n_genes < 10:
        raise ScldmError(f"n_genes={n_genes}: a synthetic atlas needs at least 10 genes")
    if min(n_cell_types, n_tissues, n_donors) < 1:
        raise ScldmError("n_cell_types, n_tissues and n_donors must all be >= 1")
    if n_shards < 1 or n_train < n_shards:
        raise ScldmError(f"n_shards={n_shards}: need 1 <= n_shards <= training cells ({n_train})")
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ScldmError(f"{out_dir}: already exists and is not empty; remove it, choose another path or overwrite")

    model = _Model(n_genes, n_cell_types, n_tissues, n_donors, seed)
    categories = {
        "cell_type": [f"celltype_{i}" for i in range(n_cell_types)],
        "tissue": [f"tissue_{i}" for i in range(n_tissues)],
        "donor": [f"donor_{i}" for i in range(n_donors)],
    }
    gene_ids = [gene_id(i) for i in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": [f"SYNG{i + 1}" for i in range(n_genes)]}, index=pd.Index(gene_ids))

    def make_adata(x, t_n, tissue_n, donor_n, start):
        n = x.shape[0]
        cell_index = np.arange(start, start + n, dtype=np.int64)
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(t_n, categories["cell_type"]),
                "tissue": pd.Categorical.from_codes(tissue_n, categories["tissue"]),
                "donor": pd.Categorical.from_codes(donor_n, categories["donor"]),
                "cell_index": cell_index,
            },
            index=pd.Index([f"syncell_{i:010d}" for i in cell_index]),
        )
        return anndata.AnnData(X=x, obs=obs, var=var.copy())

    sizes = _split_sizes(n_train, n_shards)
    files = [f"shard_{i:04d}.h5ad" for i in range(n_shards)]
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    bar = None
    try:
        if progress:
            from rich.console import Console
            from rich.progress import Progress

            bar = Progress(console=Console(file=sys.stderr), transient=True)
            bar.start()
            task = bar.add_task("synthetic atlas", total=n_cells)
        start = 0
        nnz = 0
        jobs = [(f, k, i) for i, (f, k) in enumerate(zip(files, sizes))]
        if n_heldout:
            jobs.append(("heldout.h5ad", n_heldout, n_shards))
        for fname, k, stream in jobs:
            rng = np.random.default_rng([seed, 1, stream])
            x, t_n, tissue_n, donor_n = model.sample(k, rng)
            nnz += x.nnz
            _write_h5ad(make_adata(x, t_n, tissue_n, donor_n, start), os.path.join(tmp, fname))
            start += k
            del x
            if bar is not None:
                bar.advance(task, k)
        GeneVocab(gene_ids, version="synthetic-1").save(os.path.join(tmp, "vocab.json"))
        LabelTables(categories).save(os.path.join(tmp, "labels.json"))
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generator": "scldm_scale.data.synthetic",
            "n_cells": n_train,  # training cells, in the shards
            "n_heldout": n_heldout,
            "n_cells_total": n_cells,
            "n_genes": n_genes,
            "n_shards": n_shards,
            "shards": [{"file": f, "n_cells": k} for f, k in zip(files, sizes)],
            "shard_sizes": sizes,
            "label_columns": list(LABEL_COLUMNS),
            "label_categories": categories,
            "heldout": {"file": "heldout.h5ad", "n_cells": n_heldout} if n_heldout else None,
            "vocab": "vocab.json",
            "labels": "labels.json",
            "seed": seed,
            "sparsity": 1.0 - nnz / float(n_cells * n_genes),
            "synthetic": {
                "n_cell_types": n_cell_types,
                "n_tissues": n_tissues,
                "n_donors": n_donors,
                "heldout_fraction": heldout_fraction,
                "markers_per_type": int(len(model.markers_t[0])),
            },
        }
        write_json_atomic(os.path.join(tmp, "metadata.json"), meta)
        if os.path.exists(out_dir):
            if os.path.isdir(out_dir) and not os.listdir(out_dir):
                os.rmdir(out_dir)
            else:  # overwrite=True: swap, then delete the old directory
                old = f"{out_dir}.old-{os.getpid()}"
                os.replace(out_dir, old)
                os.replace(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(tmp):
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.stop()
    return meta
