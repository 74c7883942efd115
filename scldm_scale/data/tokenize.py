"""Raw counts -> token batches: a cell is the set of its expressed, in-vocabulary genes.

One tokenizer serves every source (h5ad shards, SOMA, ``encode``). Two forms of a batch:

- packed (compact): the tokens of all cells concatenated plus the tokens per cell, what the VAE
  trains on (no padding at all) and what dataloader workers send (a fraction of the bytes);
- padded: every cell padded to the longest cell *of the batch* (capped at ``max_genes``) with a
  mask, never to a dataset maximum.

A cell with more than ``max_genes`` expressed genes keeps a seeded uniform subsample of them; the
packed form also carries the genes it dropped (``dropped_*``), so that training neither scores
them as unexpressed nor forgets their counts.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from scldm_scale.data.validate import check_counts
from scldm_scale.errors import ScldmError

TOKEN_KEYS = ("gene_ids_ns", "counts_ns", "mask_ns", "library_size_n", "labels_na", "cell_index_n")
# Compact (packed) form of a token batch (``tokenize_counts(..., pad=False)``): the tokens of all
# cells concatenated (``_t``, cell after cell) plus the tokens per cell, the tokens removed by the
# max_genes cap the same way (``_e``, with ``dropped_length_n``), and ``max_length`` (a host int:
# the longest cell, at least 1). Per-cell tensors come first (the first value's length is the
# number of cells). :func:`pad_token_batch` turns it into the padded batch. Dataloader workers
# hand compact batches to the main process (a third of the bytes of the padded arrays at typical
# sparsity), see Source.batches.
COMPACT_KEYS = ("length_n", "library_size_n", "labels_na", "cell_index_n", "gene_ids_t", "counts_t",
                "dropped_length_n", "dropped_gene_ids_e", "dropped_counts_e", "max_length")


def tokenize_counts(
    x_ng: scipy.sparse.csr_matrix,
    var_to_vocab_g: np.ndarray,
    labels_na: np.ndarray,
    max_genes: int,
    rng: np.random.Generator,
    cell_index_n: np.ndarray | None = None,
    where: str = "counts block",
    pad: bool = True,
) -> dict[str, torch.Tensor]:
    """Turn a CSR block of raw counts into a padded token batch.

    Args:
        x_ng: raw counts, cells x source genes (CSR; other formats are converted).
        var_to_vocab_g: vocabulary index of every source gene, -1 for genes outside it (dropped).
        labels_na: encoded labels (n, a).
        max_genes: cap on tokens per cell; cells with more expressed genes keep a seeded
            uniform subsample of ``max_genes`` of them.
        rng: generator that drives the subsampling (seed it per batch for reproducibility).
        cell_index_n: global cell ids (defaults to -1).
        where: names the data in error messages.
        pad: False returns the compact form (:data:`COMPACT_KEYS`; :func:`pad_token_batch` pads it),
            which also carries the tokens dropped by the ``max_genes`` cap.

    Returns:
        ``gene_ids_ns`` int64 (padded with 0), ``counts_ns`` float32 (0 at padding), ``mask_ns``
        bool (True = real token), ``library_size_n`` float32 (in-vocabulary total before
        subsampling), ``labels_na`` int64, ``cell_index_n`` int64. ``s`` is the longest cell of
        the batch after capping (at least 1, so an all-empty batch still has a token axis).
    """
    if max_genes < 1:
        raise ScldmError(f"data.max_genes={max_genes}: must be >= 1")
    if not scipy.sparse.isspmatrix_csr(x_ng) and not isinstance(x_ng, scipy.sparse.csr_array):
        x_ng = scipy.sparse.csr_matrix(x_ng)
    n, g = x_ng.shape
    var_to_vocab_g = np.asarray(var_to_vocab_g, dtype=np.int64)
    if var_to_vocab_g.shape != (g,):
        raise ScldmError(f"{where}: gene map has {var_to_vocab_g.shape[0]} entries but X has {g} columns")
    check_counts(x_ng, where)

    # Vectorized over the CSR arrays, no per-row work; tokens keep CSR (gene) order within a cell.
    indptr = np.asarray(x_ng.indptr, dtype=np.int64)
    data = np.asarray(x_ng.data)
    vocab_idx = var_to_vocab_g[x_ng.indices]
    keep = (data > 0) & (vocab_idx >= 0)
    if keep.all():
        data = data.astype(np.float32)
        len_n = np.diff(indptr)
    else:
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        len_n = kept_before[indptr[1:]] - kept_before[indptr[:-1]]
        vocab_idx, data = vocab_idx[keep], data[keep].astype(np.float32)
    # per-cell sums in float64 (exact: counts are integers, see check_counts) over the non-empty cells
    library_size_n = np.zeros(n, dtype=np.float32)
    filled = len_n > 0
    if filled.any():
        starts = (np.cumsum(len_n) - len_n)[filled]
        library_size_n[filled] = np.add.reduceat(data, starts, dtype=np.float64)

    over_n = len_n > max_genes
    dropped_len_n = np.zeros(n, dtype=np.int64)
    dropped_idx, dropped_data = vocab_idx[:0], data[:0]
    if over_n.any():
        # Seeded uniform subsample of max_genes tokens in each overflowing cell: rank that
        # cell's tokens by a random key and keep the max_genes smallest. Other cells keep all.
        row = np.repeat(np.arange(n, dtype=np.int64), len_n)
        cand = np.flatnonzero(over_n[row])
        key = rng.random(cand.size)
        order = np.lexsort((key, row[cand]))  # by row, then random key
        sorted_rows = row[cand][order]
        first = np.searchsorted(sorted_rows, sorted_rows, side="left")
        rank = np.arange(sorted_rows.size) - first
        sel = np.ones(row.size, dtype=bool)
        sel[cand[order[rank >= max_genes]]] = False
        dropped_idx, dropped_data = vocab_idx[~sel], data[~sel]  # cell after cell, like the kept tokens
        vocab_idx, data = vocab_idx[sel], data[sel]
        dropped_len_n = np.maximum(len_n - max_genes, 0)
        len_n = np.minimum(len_n, max_genes)

    labels_na = np.asarray(labels_na, dtype=np.int64)
    if labels_na.ndim == 1:
        labels_na = labels_na[:, None]
    if labels_na.shape[0] != n:
        raise ScldmError(f"{where}: {labels_na.shape[0]} label rows for {n} cells")
    if cell_index_n is None:
        cell_index_n = np.full(n, -1, dtype=np.int64)
    cell_index_n = np.asarray(cell_index_n, dtype=np.int64).reshape(-1)
    if cell_index_n.shape[0] != n:
        raise ScldmError(f"{where}: {cell_index_n.shape[0]} cell ids for {n} cells")

    compact = {
        "length_n": torch.from_numpy(np.asarray(len_n, dtype=np.int64)),
        "library_size_n": torch.from_numpy(library_size_n),
        "labels_na": torch.from_numpy(labels_na.copy()),
        "cell_index_n": torch.from_numpy(cell_index_n.copy()),
        "gene_ids_t": torch.from_numpy(np.ascontiguousarray(vocab_idx, dtype=np.int64)),
        "counts_t": torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
        "dropped_length_n": torch.from_numpy(dropped_len_n),
        "dropped_gene_ids_e": torch.from_numpy(np.ascontiguousarray(dropped_idx, dtype=np.int64)),
        "dropped_counts_e": torch.from_numpy(np.ascontiguousarray(dropped_data, dtype=np.float32)),
        "max_length": max(int(len_n.max()) if n else 0, 1),
    }
    return pad_token_batch(compact) if pad else compact


def pad_token_batch(compact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded token batch (:data:`TOKEN_KEYS`) of a compact one (:data:`COMPACT_KEYS`); tokens
    fill each row in order (a boolean mask assignment writes them row-major)."""
    len_n = compact["length_n"].numpy()
    n = len(len_n)
    s = max(int(len_n.max()) if n else 0, 1)
    mask_ns = np.arange(s)[None, :] < len_n[:, None]
    gene_ids_ns = np.zeros((n, s), dtype=np.int64)
    counts_ns = np.zeros((n, s), dtype=np.float32)
    gene_ids_ns[mask_ns] = compact["gene_ids_t"].numpy()
    counts_ns[mask_ns] = compact["counts_t"].numpy()
    return {
        "gene_ids_ns": torch.from_numpy(gene_ids_ns),
        "counts_ns": torch.from_numpy(counts_ns),
        "mask_ns": torch.from_numpy(mask_ns),
        "library_size_n": compact["library_size_n"],
        "labels_na": compact["labels_na"],
        "cell_index_n": compact["cell_index_n"],
    }


def pack_token_batch(padded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact (packed) batch of a padded one (:data:`TOKEN_KEYS`): the real tokens, row by row.

    A padded batch does not know the tokens its cells lost to the ``max_genes`` cap: none are
    recorded as dropped.
    """
    mask_ns = padded["mask_ns"].numpy()
    len_n = mask_ns.sum(1).astype(np.int64)
    n = len(len_n)
    return {
        "length_n": torch.from_numpy(len_n),
        "library_size_n": padded["library_size_n"],
        "labels_na": padded["labels_na"],
        "cell_index_n": padded["cell_index_n"],
        "gene_ids_t": torch.from_numpy(np.ascontiguousarray(padded["gene_ids_ns"].numpy()[mask_ns])),
        "counts_t": torch.from_numpy(np.ascontiguousarray(padded["counts_ns"].numpy()[mask_ns])),
        "dropped_length_n": torch.zeros(n, dtype=torch.int64),
        "dropped_gene_ids_e": torch.zeros(0, dtype=torch.int64),
        "dropped_counts_e": torch.zeros(0, dtype=torch.float32),
        "max_length": max(int(len_n.max()) if n else 0, 1),
    }


def pad_fraction(length_n: np.ndarray | torch.Tensor, width: int | None = None) -> float:
    """Fraction of the token slots of a padded batch that are padding: cells of ``length_n``
    tokens padded to ``width`` (default: the longest cell, as :func:`pad_token_batch` pads)."""
    len_n = np.asarray(length_n, dtype=np.float64)
    if not len(len_n):
        return 0.0
    width = max(int(len_n.max()), 1) if width is None else int(width)
    return float(1.0 - len_n.sum() / (width * len(len_n)))
