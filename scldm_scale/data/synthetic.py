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
most 2**22 values), written into ``<out_dir>.tmp-<pid>`` and renamed at the end, through the
prepared-dataset writer that ``prepare`` uses (:mod:`scldm_scale.data.writers`).

:func:`write_synthetic_studies` writes raw *input* files instead: several studies with their own
cell-type mix, sequencing depth, gene panel, batch effect, tissues and donors (what ``prepare``
harmonizes), with a sparse sampler fast enough for millions of cells x 20,000 genes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.stats

from scldm_scale.data.labels import LabelTables
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.data.writers import PreparedWriter, write_h5ad
from scldm_scale.errors import ScldmError
from scldm_scale.io import atomic_dir
from scldm_scale.progress import Progress

LABEL_COLUMNS = ("cell_type", "tissue", "donor")
_CHUNK_VALUES = 1 << 22  # dense values generated at once


def gene_id(i: int) -> str:
    """Ensembl-like id of synthetic gene ``i`` (0-based): ``ENSSYN00000000001`` for 0."""
    return f"ENSSYN{i + 1:011d}"


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


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ScldmError(f"{out_dir}: already exists and is not empty; remove it, choose another path or overwrite")


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

    model = _Model(n_genes, n_cell_types, n_tissues, n_donors, seed)
    categories = {
        "cell_type": [f"celltype_{i}" for i in range(n_cell_types)],
        "tissue": [f"tissue_{i}" for i in range(n_tissues)],
        "donor": [f"donor_{i}" for i in range(n_donors)],
    }
    gene_ids = [gene_id(i) for i in range(n_genes)]
    symbols = [f"SYNG{i + 1}" for i in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(gene_ids))

    def make_obs(t_n, tissue_n, donor_n, start):
        cell_index = np.arange(start, start + len(t_n), dtype=np.int64)
        return pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(t_n, categories["cell_type"]),
                "tissue": pd.Categorical.from_codes(tissue_n, categories["tissue"]),
                "donor": pd.Categorical.from_codes(donor_n, categories["donor"]),
                "cell_index": cell_index,
            },
            index=pd.Index([f"syncell_{i:010d}" for i in cell_index]),
        )

    sizes = _split_sizes(n_train, n_shards)
    files = [f"shard_{i:04d}.h5ad" for i in range(n_shards)]
    _check_out_dir(out_dir, overwrite)
    bar = Progress(n_cells, "synthetic atlas", enabled=progress)
    try:
        with atomic_dir(out_dir) as tmp_dir:
            tmp = str(tmp_dir)
            writer = PreparedWriter(tmp, var)
            start = 0
            jobs = [(f, k, i) for i, (f, k) in enumerate(zip(files, sizes))]
            if n_heldout:
                jobs.append((None, n_heldout, n_shards))
            for fname, k, stream in jobs:
                x, t_n, tissue_n, donor_n = model.sample(k, np.random.default_rng([seed, 1, stream]))
                obs = make_obs(t_n, tissue_n, donor_n, start)
                if fname is None:
                    writer.add_heldout(x, obs)
                else:
                    writer.write_shard(fname, x, obs)
                start += k
                del x
                bar.advance(k)
            meta = writer.finish(
                GeneVocab(gene_ids, version="synthetic-1", symbols=symbols),
                LabelTables(categories),
                {
                    "generator": "scldm_scale.data.synthetic",
                    "label_columns": list(LABEL_COLUMNS),
                    "label_categories": categories,
                    "seed": seed,
                    "synthetic": {
                        "n_cell_types": n_cell_types,
                        "n_tissues": n_tissues,
                        "n_donors": n_donors,
                        "heldout_fraction": heldout_fraction,
                        "markers_per_type": int(len(model.markers_t[0])),
                    },
                },
            )
    finally:
        bar.close()
    return meta


# ---------------------------------------------------------------------------------------------
# several studies as raw input files (for prepare and the atlas benchmark)

STUDY_LAYOUTS = ("X", "raw", "layer")  # counts in X; normalized X + counts in .raw.X; normalized X + layers['counts']
_DRAWS_PER_CHUNK = 1 << 22  # multinomial draws (UMIs) sampled at once
_UMI_SIGMA = 0.45  # log-scale spread of the UMIs per cell within a study


class StudySampler:
    """Counts of one study: a cell of type ``t`` in program state ``k`` draws its UMIs from one
    multinomial profile over the study's gene panel (``T * K`` profiles), so sampling costs
    ``O(UMIs)`` instead of ``O(genes)`` per cell: sorted uniforms (exponential spacings) are mapped
    to genes through the profiles' cumulative sums with a guide table, and repeated genes are
    counted as runs."""

    def __init__(self, logits_rg: np.ndarray) -> None:
        n_rows, g = logits_rg.shape
        p = np.exp(logits_rg - logits_rg.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        self.n_rows, self.g = n_rows, g
        self.p_rg = p / p.sum(axis=1, keepdims=True)
        self.table = (cdf + np.arange(n_rows)[:, None]).ravel()  # row r's cdf shifted into [r, r + 1]
        self.m = 4 * g  # guide buckets per row: about 0.25 extra comparisons per draw
        buckets = np.arange(self.m) / self.m
        guide = [np.searchsorted(cdf[r], buckets, side="right") + r * g for r in range(n_rows)]
        self.guide = np.concatenate(guide).astype(np.int32 if n_rows * g < np.iinfo(np.int32).max else np.int64)

    def expected_genes(self, umis: float) -> float:
        """Mean distinct genes of a cell with ``umis`` draws, over the profiles."""
        return float((1.0 - np.exp(-umis * self.p_rg)).sum(axis=1).mean())

    def umis_for(self, genes: float, sigma: float = 0.0) -> float:
        """Mean UMIs per cell that give ``genes`` distinct genes on average, when a cell's UMIs are the
        mean times a mean-one lognormal factor of log-scale ``sigma`` (8-point quadrature)."""
        z = scipy.stats.norm.ppf((np.arange(8) + 0.5) / 8)
        factors = np.exp(sigma * z - sigma**2 / 2)
        lo, hi = float(genes), 100.0 * float(genes)  # a cell has at least as many UMIs as genes
        for _ in range(25):
            mid = np.sqrt(lo * hi)
            mean_genes = np.mean([self.expected_genes(mid * f) for f in factors])
            lo, hi = (mid, hi) if mean_genes < genes else (lo, mid)
        return float(np.sqrt(lo * hi))

    def sample(self, row_n: np.ndarray, umis_n: np.ndarray, rng: np.random.Generator) -> scipy.sparse.csr_matrix:
        """CSR int32 counts (cells x panel genes) of cells with profiles ``row_n`` and ``umis_n`` UMIs."""
        n = len(row_n)
        umis_n = np.asarray(umis_n, dtype=np.int64)
        draws = int(umis_n.sum())
        with_end = umis_n + 1
        q = rng.standard_exponential(draws + n)
        np.cumsum(q, out=q)
        ends = np.cumsum(with_end) - 1
        total = q[ends]
        base = np.concatenate([[0.0], total[:-1]])
        keep = np.ones(draws + n, dtype=bool)
        keep[ends] = False  # each cell's last spacing only normalizes its uniforms
        q = q[keep]
        del keep
        q -= np.repeat(base, umis_n)
        q *= np.repeat(1.0 / (total - base), umis_n)
        np.minimum(q, 1.0 - 2.0**-40, out=q)  # < 1 also after rounding
        q += np.repeat(np.asarray(row_n, dtype=np.float64), umis_n)  # sorted uniforms of each cell in [row, row + 1)
        gene = self.guide[(q * self.m).astype(np.int64)].astype(np.int64)  # first gene of the bucket (row * g + gene)
        todo = np.flatnonzero(self.table[gene] <= q)
        while len(todo):
            gene[todo] += 1
            todo = todo[self.table[gene[todo]] <= q[todo]]
        del q
        first = np.ones(draws, dtype=bool)  # a new (cell, gene) run starts here
        first[1:] = gene[1:] != gene[:-1]
        starts = np.concatenate([[0], np.cumsum(umis_n)[:-1]])
        first[starts[umis_n > 0]] = True
        at = np.flatnonzero(first)
        del first
        counts = np.diff(np.append(at, draws)).astype(np.int32)
        nnz_n = np.diff(np.append(np.searchsorted(at, starts), len(at)))  # cells without UMIs: 0
        indptr = np.concatenate([[0], np.cumsum(nnz_n)]).astype(np.int64)
        rows = np.repeat(np.asarray(row_n, dtype=np.int64), nnz_n)
        indices = (gene[at] - rows * self.g).astype(np.int32)
        return scipy.sparse.csr_matrix((counts, indices, indptr), shape=(n, self.g))


def _stack_rows(blocks: list[scipy.sparse.csr_matrix]) -> scipy.sparse.csr_matrix:
    """The blocks stacked by rows; each block is freed once copied (memory: about one copy of the rows)."""
    nnz = sum(b.nnz for b in blocks)
    n, g = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
    data, indices = np.empty(nnz, dtype=np.int32), np.empty(nnz, dtype=np.int32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    at = row = 0
    while blocks:
        b = blocks.pop(0)
        data[at : at + b.nnz], indices[at : at + b.nnz] = b.data, b.indices
        indptr[row + 1 : row + 1 + b.shape[0]] = b.indptr[1:] + at
        at, row = at + b.nnz, row + b.shape[0]
    return scipy.sparse.csr_matrix((data, indices, indptr), shape=(n, g))


def _normalized(x: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """log1p(counts per 10,000), float32: what CELLxGENE files keep in X (shares the index arrays of ``x``)."""
    lib = np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0)
    data = np.log1p(x.data.astype(np.float32) / np.repeat(lib, np.diff(x.indptr)).astype(np.float32) * 1e4)
    return scipy.sparse.csr_matrix((data, x.indices, x.indptr), shape=x.shape, copy=False)


def write_synthetic_studies(
    out_dir: str | os.PathLike,
    n_cells: int,
    n_genes: int = 20_000,
    n_studies: int = 8,
    genes_per_cell: float = 500.0,
    n_cell_types: int = 12,
    n_tissues: int = 6,
    layouts: Sequence[str] = ("X",),
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write ``n_studies`` raw input files ``study_00.h5ad ...`` of ``n_cells`` cells in total.

    Studies differ as real ones do: cell-type mix (Dirichlet(0.7) per study), sequencing depth
    (expressed genes per cell spread over a factor 1.6 / 0.6 between studies, ``genes_per_cell`` on
    average over all cells), gene panel (study 0 measures
    every gene, the others 75-100% of them), a per-gene batch effect, 1-2 tissues and 2-6 donors of
    their own. Counts are multinomial given a cell's profile (cell type x one of 3 gene-program
    states, shared across studies) with lognormal library sizes. var: Ensembl-like ids with the
    symbols in ``feature_name``; obs: cell_type, tissue, donor, study. ``layouts`` cycles over the
    studies: ``X`` (counts in X), ``raw`` (log1p-normalized X, counts in .raw.X, as CELLxGENE files)
    or ``layer`` (normalized X, counts in ``layers['counts']``).

    Studies are generated and written one at a time (memory: one study), into
    ``<out_dir>.tmp-<pid>`` renamed at the end. Returns the file paths.
    """
    import anndata

    out_dir = os.path.abspath(os.fspath(out_dir))
    if n_genes < 10 or n_studies < 1 or n_cells < n_studies or genes_per_cell <= 0:
        raise ScldmError(
            f"synthetic studies: need n_genes >= 10, 1 <= n_studies <= n_cells and genes_per_cell > 0 "
            f"(got {n_genes}, {n_studies}, {n_cells}, {genes_per_cell})"
        )
    bad = [v for v in layouts if v not in STUDY_LAYOUTS]
    if bad or not layouts:
        raise ScldmError(f"layouts={list(layouts)}: choose from {list(STUDY_LAYOUTS)}")
    rng = np.random.default_rng([seed, 0x57D1])
    g, t, n_programs, n_states = n_genes, n_cell_types, 4, 3
    background_g = rng.normal(0.0, 2.2, g)
    type_tg = background_g[None, :] + rng.normal(0.0, 0.35, (t, g))
    expressed = np.flatnonzero(background_g >= np.median(background_g))
    n_markers = max(2, min(50, len(expressed) // t))
    for k in range(t):
        markers = rng.choice(expressed, size=n_markers, replace=False)
        type_tg[k, markers] += rng.uniform(1.5, 3.0, n_markers)
    program_pg = np.zeros((n_programs, g))
    for k in range(n_programs):
        genes = rng.choice(expressed, size=max(2, len(expressed) // 10), replace=False)
        program_pg[k, genes] = rng.uniform(0.6, 1.4, len(genes))
    activity_tsp = rng.uniform(0.0, 1.5, (t, n_states, n_programs))
    profile_rg = (type_tg[:, None, :] + activity_tsp @ program_pg).reshape(t * n_states, g)
    ids = np.array([gene_id(i) for i in range(g)], dtype=object)
    symbols = np.array([f"SYNG{i + 1}" for i in range(g)], dtype=object)
    sizes = np.maximum(1, np.round(rng.dirichlet(np.full(n_studies, 4.0)) * n_cells).astype(np.int64))
    sizes[np.argmax(sizes)] += n_cells - int(sizes.sum())
    # sequencing depth: studies spread over x0.6 - x1.6, scaled so that cells average genes_per_cell genes
    depth_s = rng.permutation(np.geomspace(0.6, 1.6, n_studies))
    depth_s /= float((depth_s * sizes).sum() / sizes.sum())
    cell_types = [f"celltype_{i}" for i in range(t)]
    tissues = [f"tissue_{i}" for i in range(n_tissues)]

    _check_out_dir(out_dir, overwrite)
    bar = Progress(n_cells, "synthetic studies", enabled=progress)
    paths = []
    try:
        with atomic_dir(out_dir) as tmp_dir:
            tmp = str(tmp_dir)
            for s in range(n_studies):
                srng = np.random.default_rng([seed, 0x57D2, s])
                name = f"study_{s:02d}"
                panel = np.arange(g) if s == 0 else np.sort(srng.choice(g, int(g * srng.uniform(0.75, 1.0)), replace=False))
                logits_rg = profile_rg[:, panel] + srng.normal(0.0, 0.2, len(panel))[None, :]
                sampler = StudySampler(logits_rg)
                umis = sampler.umis_for(genes_per_cell * depth_s[s], sigma=_UMI_SIGMA)
                mix = srng.dirichlet(np.full(t, 0.7))
                my_tissues = srng.choice(n_tissues, size=int(srng.integers(1, 3)), replace=False)
                donors = [f"{name}_donor_{j}" for j in range(int(srng.integers(2, 7)))]
                n = int(sizes[s])
                type_n = srng.choice(t, size=n, p=mix)
                row_n = type_n * n_states + srng.integers(0, n_states, n)
                factor_n = np.exp(srng.normal(-_UMI_SIGMA**2 / 2, _UMI_SIGMA, n))  # mean one
                umis_n = np.maximum(1, np.round(umis * factor_n)).astype(np.int64)
                per_chunk = max(1, int(_DRAWS_PER_CHUNK // max(1.0, float(umis_n.mean()))))
                blocks = []
                for lo in range(0, n, per_chunk):
                    blocks.append(sampler.sample(row_n[lo : lo + per_chunk], umis_n[lo : lo + per_chunk], srng))
                    bar.advance(min(per_chunk, n - lo))
                counts = _stack_rows(blocks)
                obs = pd.DataFrame(
                    {
                        "cell_type": pd.Categorical.from_codes(type_n, cell_types),
                        "tissue": pd.Categorical([tissues[i] for i in srng.choice(my_tissues, size=n)]),
                        "donor": pd.Categorical.from_codes(srng.integers(0, len(donors), n), donors),
                        "study": pd.Categorical([name] * n),
                    },
                    index=pd.Index([f"{name}_cell{i:07d}" for i in range(n)]),
                )
                var = pd.DataFrame({"feature_name": symbols[panel]}, index=pd.Index(ids[panel]))
                layout = layouts[s % len(layouts)]
                if layout == "X":
                    adata = anndata.AnnData(X=counts, obs=obs, var=var)
                else:
                    adata = anndata.AnnData(X=_normalized(counts), obs=obs, var=var)
                    if layout == "raw":
                        adata.raw = anndata.AnnData(X=counts, obs=obs, var=var)
                    else:
                        adata.layers["counts"] = counts
                path = os.path.join(tmp, f"{name}.h5ad")
                write_h5ad(adata, path)
                paths.append(os.path.join(out_dir, f"{name}.h5ad"))
                del adata, counts
    finally:
        bar.close()
    return paths
