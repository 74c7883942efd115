"""Gene vocabulary: a saved, versioned list of gene ids every source maps its var onto."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from scldm_scale.errors import ScldmError
from scldm_scale.io import write_json_atomic

VOCAB_FORMAT = "scldm-scale/gene-vocab"


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Read a JSON file, raising a one-line :class:`ScldmError` naming ``path`` when missing/corrupt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ScldmError(f"{path}: {what} not found; {fix}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScldmError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e}); {fix}") from None


class GeneVocab:
    """Ordered, duplicate-free list of gene ids (Ensembl ids preferred); index = token id.

    ``symbols`` optionally holds the gene symbol of every id (``""`` where unknown), e.g. from the
    ``feature_name`` column of CELLxGENE files, so that written files can carry both.
    """

    def __init__(self, gene_ids: Sequence[str], version: str = "1", symbols: Sequence[str | None] | None = None) -> None:
        ids = [str(g) for g in gene_ids]
        index = pd.Index(ids)
        if not index.is_unique:
            dups = index[index.duplicated()].unique().tolist()
            raise ScldmError(
                f"gene vocabulary: {len(dups)} duplicate gene ids (e.g. {dups[:5]}); make var_names unique "
                "(e.g. use Ensembl ids) before building the vocabulary"
            )
        if len(ids) == 0:
            raise ScldmError("gene vocabulary: no gene ids given; the source var must list at least one gene")
        self._gene_ids = ids
        self._index = index
        self.version = str(version)
        self._symbols: list[str] | None = None
        if symbols is not None:
            syms = ["" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s) for s in symbols]
            if len(syms) != len(ids):
                raise ScldmError(f"gene vocabulary: {len(syms)} gene symbols for {len(ids)} gene ids; give one per id")
            self._symbols = syms if any(syms) else None

    def __len__(self) -> int:
        return len(self._gene_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self._gene_ids == other._gene_ids and self.version == other.version

    def __repr__(self) -> str:
        return f"GeneVocab(n_genes={len(self)}, version={self.version!r})"

    @property
    def gene_ids(self) -> list[str]:
        return list(self._gene_ids)

    @property
    def symbols(self) -> list[str] | None:
        """Gene symbol of every id (``""`` where unknown), or None when the vocabulary has none."""
        return None if self._symbols is None else list(self._symbols)

    def index_map(self, var_names: Sequence[str] | pd.Index | np.ndarray) -> np.ndarray:
        """Vocabulary index of every var entry (int64), -1 where the gene is not in the vocabulary."""
        names = pd.Index(np.asarray(var_names, dtype=object).astype(str))
        return self._index.get_indexer(names).astype(np.int64)

    @classmethod
    def from_var(
        cls, var_names: Sequence[str] | pd.Index | np.ndarray, version: str = "1", symbols: Sequence | None = None
    ) -> GeneVocab:
        return cls(list(np.asarray(var_names, dtype=object).astype(str)), version=version,
                   symbols=None if symbols is None else list(symbols))

    def save(self, path: str | os.PathLike) -> None:
        obj: dict[str, Any] = {"format": VOCAB_FORMAT, "version": self.version, "n_genes": len(self),
                               "gene_ids": self._gene_ids}
        if self._symbols is not None:
            obj["gene_symbols"] = self._symbols
        write_json_atomic(path, obj)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        fix = "run `scldm-scale prepare` to write it or set data.vocab_path"
        obj = read_json(path, "gene vocabulary", fix)
        if not isinstance(obj, dict) or not isinstance(obj.get("gene_ids"), list):
            raise ScldmError(f"{os.fspath(path)}: gene vocabulary has no 'gene_ids' list; {fix}")
        symbols = obj.get("gene_symbols")
        if symbols is not None and not isinstance(symbols, list):
            raise ScldmError(f"{os.fspath(path)}: 'gene_symbols' must be a list of strings; {fix}")
        try:
            return cls(obj["gene_ids"], version=str(obj.get("version", "1")), symbols=symbols)
        except ScldmError as e:
            raise ScldmError(f"{os.fspath(path)}: {e}") from None
