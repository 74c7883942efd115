"""AnnData in: match a dataset's genes to the model's vocabulary, find its raw counts, tokenize.

Genes are matched by id or by symbol, whichever matches more of the vocabulary: the candidates are
``var_names`` and the usual id / symbol columns of ``var`` (``gene_ids``, ``feature_id``,
``ensembl_id``, ``gene_symbols``, ``feature_name``, ...), compared with the vocabulary's gene ids
(Ensembl version suffixes ignored) and, when the vocabulary keeps them, its gene symbols (a symbol
shared by several ids matches none of them). Genes outside the vocabulary are dropped and counted; the
summary is logged and returned (:class:`GeneMatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.data.gene_ids import ID_COLUMNS, SYMBOL_COLUMNS, strip_version
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.validate import check_counts
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GeneMatch:
    """How a dataset's genes map onto the vocabulary."""

    var_to_vocab_g: np.ndarray  # vocabulary index per var entry, -1 = dropped
    key: str  # what matched: "var_names" or "var['<column>']"
    n_var: int  # genes in the dataset
    n_matched: int  # of them, in the vocabulary
    n_vocab: int  # genes in the vocabulary

    @property
    def n_dropped(self) -> int:
        return self.n_var - self.n_matched

    def summary(self) -> dict:
        return {"matched_by": self.key, "n_var": self.n_var, "n_matched": self.n_matched,
                "n_dropped": self.n_dropped, "n_vocab": self.n_vocab}

    def describe(self) -> str:
        return (f"{self.n_matched:,} of {self.n_var:,} genes matched the model's vocabulary of {self.n_vocab:,} "
                f"(by {self.key}); {self.n_dropped:,} dropped, {self.n_vocab - self.n_matched:,} vocabulary "
                "genes absent from the data count as zero")


def symbol_map(vocab: GeneVocab, names) -> np.ndarray | None:
    """Vocabulary index of every name read as a gene symbol (-1 = none, or a symbol of several ids);
    None when the vocabulary keeps no symbols."""
    symbols = vocab.symbols
    if symbols is None:
        return None
    sym = pd.Series(symbols, dtype=object)
    keep = ((sym != "") & ~sym.duplicated(keep=False)).to_numpy()
    pos = pd.Index(sym[keep].to_numpy()).get_indexer(pd.Index(np.asarray(names, dtype=object).astype(str)))
    return np.where(pos >= 0, np.flatnonzero(keep)[pos], -1).astype(np.int64)


def match_genes(var: pd.DataFrame, vocab: GeneVocab, gene_key: str | None = None,
                where: str = "adata") -> GeneMatch:
    """Map ``var`` (its index and id / symbol columns) onto ``vocab``. ``gene_key``: a var column to
    use (or ``"var_names"``) instead of the best-matching candidate."""
    candidates: dict[str, np.ndarray] = {"var_names": np.asarray(var.index, dtype=object)}
    for col in (*ID_COLUMNS, *SYMBOL_COLUMNS):
        if col in var.columns:
            candidates[f"var['{col}']"] = np.asarray(var[col], dtype=object)
    if gene_key is not None:
        key = "var_names" if gene_key == "var_names" else f"var['{gene_key}']"
        if gene_key != "var_names" and gene_key not in var.columns:
            raise ScldmError(f"{where}: gene_key={gene_key!r} is not a var column (columns: {list(var.columns)}); "
                             "pass one of them or 'var_names'")
        if key not in candidates:
            candidates[key] = np.asarray(var[gene_key], dtype=object)
        candidates = {key: candidates[key]}
    best: GeneMatch | None = None
    for key, names in candidates.items():
        maps = [(vocab.index_map(names), key), (vocab.index_map(strip_version(names)), key)]
        by_symbol = symbol_map(vocab, names)
        if by_symbol is not None:
            maps.append((by_symbol, f"{key} as symbols"))
        for idx, how in maps:
            n = int((idx >= 0).sum())
            if best is None or n > best.n_matched:
                best = GeneMatch(idx, how, len(names), n, len(vocab))
    assert best is not None
    if best.n_matched == 0:
        shown = {k: list(v[:3]) for k, v in candidates.items()}
        raise ScldmError(f"{where}: none of its genes are in the model's vocabulary (e.g. {vocab.gene_ids[:3]}); "
                         f"tried {shown}; pass gene_key=<var column with gene ids or symbols>")
    log.info("%s: %s", where, best.describe())
    return best


def counts_matrix(adata, layer: str | None = None, where: str = "adata") -> sp.csr_matrix:
    """Raw counts as CSR: ``X`` (default), ``adata.raw.X`` (``layer="raw"``) or ``adata.layers[layer]``.

    Normalized or negative values are an error that names the fix (CELLxGENE files keep raw counts
    in ``.raw``).
    """
    if layer in (None, "X"):
        x, name = adata.X, "X"
    elif layer == "raw":
        if adata.raw is None:
            raise ScldmError(f"{where}: layer='raw' but adata.raw is None; pass layer=None (X) or a layer name")
        if adata.raw.n_vars != adata.n_vars or not adata.raw.var_names.equals(adata.var_names):
            raise ScldmError(f"{where}: adata.raw has other genes than adata.var ({adata.raw.n_vars} vs "
                             f"{adata.n_vars}); build an AnnData from adata.raw.to_adata() and encode that")
        x, name = adata.raw.X, "raw.X"
    else:
        if layer not in adata.layers:
            raise ScldmError(f"{where}: no layer {layer!r} (layers: {list(adata.layers)}); pass layer=None for X, "
                             "'raw' for adata.raw.X, or an existing layer")
        x, name = adata.layers[layer], f"layers[{layer!r}]"
    if x is None:
        raise ScldmError(f"{where}: {name} is empty; store raw counts there")
    x = sp.csr_matrix(x) if not sp.isspmatrix_csr(x) else x
    check_counts(x, f"{where} {name}")
    return x


def token_batches(x_ng: sp.csr_matrix, match: GeneMatch, labels_na: np.ndarray, max_genes: int, seed: int,
                  batch_size: int, row_offset: int = 0, where: str = "adata") -> Iterator[tuple[int, int, dict]]:
    """``(lo, hi, token batch)`` over the rows of ``x_ng`` (row ``i`` is cell ``row_offset + i`` of the
    dataset); cells with more than ``max_genes`` expressed genes are subsampled with a generator
    seeded by ``(seed, first cell of the batch)``."""
    n = x_ng.shape[0]
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        first = row_offset + lo
        batch = tokenize_counts(x_ng[lo:hi], match.var_to_vocab_g, labels_na[lo:hi], max_genes,
                                np.random.default_rng([int(seed) % 2**63, first]),
                                cell_index_n=np.arange(first, first + hi - lo), where=where)
        yield lo, hi, batch
