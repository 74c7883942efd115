"""Gene ids of heterogeneous inputs: which var field holds Ensembl ids and which symbols, and the
translation of a file's genes into the vocabulary's id space.

A file's ids are read from its var: the var index when it looks like Ensembl (``ENS...``, >= 90%
of the entries), else the first of :data:`ID_COLUMNS` that does; symbols come from the var index
(when it is not Ensembl) or the first of :data:`SYMBOL_COLUMNS` (``feature_name`` in CELLxGENE
files). Ensembl version suffixes are dropped (``ENSG00000141510.5`` -> ``ENSG00000141510``). A
file that lacks the vocabulary's kind of id is translated through the symbol <-> Ensembl pairs
of the other inputs (one-to-one pairs only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from scldm_scale.errors import ScldmError

ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name")
ENSEMBL_MIN_FRACTION = 0.9
_ENSEMBL_RE = r"^ENS[A-Z]*\d{5,}(?:\.\d+)?$"
_ENSEMBL_VERSION_RE = r"^(ENS[A-Z]*\d{5,})\.\d+$"


@dataclass
class GeneIds:
    """A file's gene ids of both kinds (entries None where missing); ``*_from`` names the source."""

    ensembl: np.ndarray | None
    symbol: np.ndarray | None
    ensembl_from: str = ""
    symbol_from: str = ""


def clean(values) -> np.ndarray:
    """Object array of stripped strings, None for missing / empty entries."""
    s = pd.Series(np.asarray(values, dtype=object))
    missing = s.isna().to_numpy()
    out = s.astype(str).str.strip().to_numpy(dtype=object)
    out[missing | (out == "")] = None
    return out


def ensembl_fraction(values: np.ndarray) -> float:
    present = pd.Series([v for v in values if v is not None], dtype=object)
    if present.empty:
        return 0.0
    return float(present.str.match(_ENSEMBL_RE).mean())


def strip_version(values: np.ndarray) -> np.ndarray:
    s = pd.Series(values, dtype=object)
    present = s.notna()
    s[present] = s[present].str.replace(_ENSEMBL_VERSION_RE, r"\1", regex=True)
    return s.to_numpy(dtype=object)


def gene_ids(var: pd.DataFrame) -> GeneIds:
    """The Ensembl ids and symbols of a var table (see the module docstring)."""
    index = clean(var.index)
    ens = sym = None
    ens_from = sym_from = ""
    index_is_ensembl = ensembl_fraction(index) >= ENSEMBL_MIN_FRACTION
    if index_is_ensembl:
        ens, ens_from = index, "var_names"
    else:
        for col in ID_COLUMNS:
            if col in var.columns:
                vals = clean(var[col])
                if ensembl_fraction(vals) >= ENSEMBL_MIN_FRACTION:
                    ens, ens_from = vals, f"var['{col}']"
                    break
    index_is_numeric = all(v is None or v.isdigit() for v in index)
    if not index_is_ensembl and not index_is_numeric:
        sym, sym_from = index, "var_names"
    else:
        for col in SYMBOL_COLUMNS:
            if col in var.columns:
                sym, sym_from = clean(var[col]), f"var['{col}']"
                break
    if ens is not None:
        ens = strip_version(ens)
    return GeneIds(ens, sym, ens_from, sym_from)


def add_pairs(ids: GeneIds, ens_to_sym: dict[str, dict[str, None]], sym_to_ens: dict[str, dict[str, None]]) -> None:
    """Record a file's Ensembl <-> symbol pairs (ordered sets, first seen first)."""
    if ids.ensembl is None or ids.symbol is None:
        return
    for e, s in zip(ids.ensembl, ids.symbol):
        if e is not None and s is not None:
            ens_to_sym.setdefault(e, {}).setdefault(s, None)
            sym_to_ens.setdefault(s, {}).setdefault(e, None)


def one_to_one(a_to_b: dict[str, dict[str, None]], b_to_a: dict[str, dict[str, None]]) -> dict[str, str]:
    """The pairs ``a -> b`` where ``a`` has one ``b`` and that ``b`` one ``a``."""
    out = {}
    for a, bs in a_to_b.items():
        if len(bs) == 1:
            b = next(iter(bs))
            if len(b_to_a.get(b, ())) == 1:
                out[a] = b
    return out


def file_keys(ids: GeneIds, space: str, sym_to_ens: dict[str, str], ens_to_sym: dict[str, str]):
    """Ids of a file's genes in the vocabulary's id space (None = cannot be identified), and their source."""
    if space == "ensembl":
        if ids.ensembl is not None:
            return ids.ensembl, ids.ensembl_from
        return np.array([sym_to_ens.get(s) if s is not None else None for s in ids.symbol], dtype=object), (
            f"{ids.symbol_from} (symbols translated to Ensembl ids)"
        )
    if ids.symbol is not None:
        return ids.symbol, ids.symbol_from
    return np.array([ens_to_sym.get(e) if e is not None else None for e in ids.ensembl], dtype=object), (
        f"{ids.ensembl_from} (Ensembl ids translated to symbols)"
    )


def check_unique(keys: np.ndarray, source: str, path: str) -> None:
    present = pd.Index([k for k in keys if k is not None])
    if not present.is_unique:
        dups = present[present.duplicated()].unique().tolist()
        raise ScldmError(
            f"{path}: duplicated gene ids in {source} ({len(dups)} ids, e.g. {dups[0]!r}); make them unique "
            "(sum or drop the duplicated genes, or use Ensembl ids) before prepare"
        )


def vocab_map(keys: np.ndarray, vocab_index: pd.Index) -> np.ndarray:
    """Vocabulary index of every key (int64), -1 for None or ids outside the vocabulary."""
    present = np.array([k is not None for k in keys], dtype=bool)
    out = np.full(len(keys), -1, dtype=np.int64)
    if present.any():
        out[present] = vocab_index.get_indexer(pd.Index(keys[present].astype(str)))
    return out
