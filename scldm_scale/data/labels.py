"""Per-attribute label tables (cell_type, tissue, donor, ...) with an explicit ``unknown`` code."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from scldm_scale.data.vocab import read_json
from scldm_scale.io import write_json_atomic
from scldm_scale.errors import ScldmError

UNKNOWN = "unknown"
LABELS_FORMAT = "scldm-scale/label-tables"


class LabelTables:
    """Category tables, one per conditioning attribute; every table contains :data:`UNKNOWN`.

    Codes are positions in the table. Unseen or missing values encode to the unknown code,
    so new data never crashes the loader; :meth:`code_of` is the strict lookup for user input.
    """

    def __init__(self, categories: dict[str, Sequence[str]]) -> None:
        self._categories: dict[str, list[str]] = {}
        self._index: dict[str, pd.Index] = {}
        for attr, values in categories.items():
            vals = [str(v) for v in values]
            if UNKNOWN not in vals:
                vals.append(UNKNOWN)
            index = pd.Index(vals)
            if not index.is_unique:
                dups = index[index.duplicated()].unique().tolist()
                raise ScldmError(f"label table '{attr}': duplicate categories {dups[:5]}; make them unique")
            self._categories[str(attr)] = vals
            self._index[str(attr)] = index

    def __repr__(self) -> str:
        return f"LabelTables({dict(zip(self.attributes, self.cardinalities))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelTables) and self._categories == other._categories

    @property
    def attributes(self) -> list[str]:
        return list(self._categories)

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) for v in self._categories.values()]

    @property
    def categories(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._categories.items()}

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raise unless every label column a source reads (``data.label_columns``) has a table."""
        unknown = [c for c in columns if c not in self._index]
        if unknown:
            raise ScldmError(
                f"data.label_columns: {unknown} have no label table (tables: {self.attributes}); "
                "re-run `scldm-scale prepare` with these columns or remove them"
            )

    def unknown_code(self, attr: str) -> int:
        return int(self._table(attr).get_loc(UNKNOWN))

    def _table(self, attr: str) -> pd.Index:
        try:
            return self._index[attr]
        except KeyError:
            raise ScldmError(
                f"label attribute '{attr}' has no table (known attributes: {self.attributes}); "
                "re-run `scldm-scale prepare` with it in data.label_columns or drop it"
            ) from None

    def encode(self, attr: str, values: Iterable | pd.Series | pd.Categorical | np.ndarray) -> np.ndarray:
        """Codes (int64) of ``values``; unseen or missing (None/NaN) values map to the unknown code."""
        table = self._table(attr)
        unknown = table.get_loc(UNKNOWN)
        if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
            values = values.array
        if isinstance(values, pd.Categorical):
            cat_codes = np.asarray(values.codes, dtype=np.int64)
            lut = table.get_indexer(pd.Index(np.asarray(values.categories, dtype=object).astype(str)))
            lut = np.where(lut < 0, unknown, lut).astype(np.int64)
            out = np.full(len(cat_codes), unknown, dtype=np.int64)
            seen = cat_codes >= 0
            out[seen] = lut[cat_codes[seen]]
            return out
        if not hasattr(values, "__len__"):
            values = list(values)
        series = pd.Series(np.asarray(values, dtype=object).reshape(-1))
        missing = series.isna().to_numpy()
        codes = table.get_indexer(pd.Index(series.astype(str)))
        codes = np.where((codes < 0) | missing, unknown, codes)
        return codes.astype(np.int64)

    def decode(self, attr: str, codes: Iterable[int] | np.ndarray) -> list[str]:
        self._table(attr)
        table = self._categories[attr]
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        bad = (codes < 0) | (codes >= len(table))
        if bad.any():
            raise ScldmError(
                f"label attribute '{attr}': codes {codes[bad][:5].tolist()} out of range [0, {len(table)}); "
                "the label tables do not match the data or checkpoint"
            )
        return [table[c] for c in codes]

    def code_of(self, attr: str, value: str) -> int:
        """Strict lookup of one value (used for user-requested conditions)."""
        table = self._table(attr)
        value = str(value)
        if value not in table:
            known = self._categories[attr]
            shown = ", ".join(known[:30]) + (f", ... ({len(known)} total)" if len(known) > 30 else "")
            raise ScldmError(f"label '{attr}': unknown value {value!r}; known values: {shown}")
        return int(table.get_loc(value))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(
            path,
            {
                "format": LABELS_FORMAT,
                "attributes": self.attributes,
                "cardinalities": self.cardinalities,
                "categories": self._categories,
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelTables:
        fix = "run `scldm-scale prepare` to write it or set data.labels_path"
        obj = read_json(path, "label tables", fix)
        if not isinstance(obj, dict) or not isinstance(obj.get("categories"), dict):
            raise ScldmError(f"{os.fspath(path)}: label tables have no 'categories' mapping; {fix}")
        cats = obj["categories"]
        order = obj.get("attributes", list(cats))
        try:
            return cls({a: cats[a] for a in order})
        except (KeyError, TypeError) as e:
            raise ScldmError(f"{os.fspath(path)}: label tables are inconsistent ({e}); {fix}") from None

    @classmethod
    def from_obs(cls, obs_frames: Iterable[pd.DataFrame], columns: Sequence[str]) -> LabelTables:
        """Union of the values of ``columns`` over several obs frames, in first-seen order.

        Categorical columns contribute their category lists (in order), other columns their
        sorted unique non-missing values.
        """
        seen: dict[str, dict[str, None]] = {c: {} for c in columns}
        for i, obs in enumerate(obs_frames):
            for col in columns:
                if col not in obs.columns:
                    raise ScldmError(
                        f"obs frame {i}: column '{col}' is missing (columns: {list(obs.columns)[:20]}); "
                        "add it or remove it from data.label_columns"
                    )
                s = obs[col]
                if isinstance(s.dtype, pd.CategoricalDtype):
                    vals = [str(v) for v in s.cat.categories]
                else:
                    vals = sorted(str(v) for v in pd.unique(s.dropna()))
                for v in vals:
                    seen[col].setdefault(v, None)
        return cls({c: list(seen[c]) for c in columns})
