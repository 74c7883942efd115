"""Requested conditions: which label values the generated cells carry, and how many of each.

Internally a request is a list of ``(values, n)``: ``values`` maps attributes (``cell_type``,
``tissue``, ...) to a label value for ``n`` cells; attributes a condition does not name are left
unconditioned (their null code). The public forms (:func:`normalize_conditions`):

- ``{"cell_type": {"B cell": 500, "T cell": 200}}``: counts per value of one attribute (several
  attributes in one dict each contribute their own cells);
- ``[({"cell_type": "B cell", "tissue": "blood"}, 500), ...]``: joint conditions;
- an obs DataFrame (``obs=ref.obs``): one cell per row with the row's label values, or
  ``n_cells`` cells with the same joint proportions (:func:`conditions_matching`).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from scldm_scale.data.labels import LabelTables
from scldm_scale.errors import ScldmError

Conditions = list[tuple[dict[str, str], int]]


def parse_condition(spec: str, default_n: int) -> tuple[dict[str, str], int]:
    """``cell_type=B cell,tissue=lung:200`` -> ({"cell_type": "B cell", "tissue": "lung"}, 200)."""
    body, n = spec, default_n
    if ":" in spec:
        body, _, count = spec.rpartition(":")
        try:
            n = int(count)
        except ValueError:
            raise ScldmError(f"--condition '{spec}': the part after ':' must be a cell count") from None
    values = {}
    for item in filter(None, body.split(",")):
        if "=" not in item:
            raise ScldmError(f"--condition '{spec}': expected attribute=value pairs separated by ','")
        key, _, value = item.partition("=")
        values[key.strip()] = value.strip()
    return values, n


def read_conditions_file(path: str | Path) -> Conditions:
    """A CSV (columns: the attributes + ``n_cells``) or a YAML list of {attribute: value, n_cells: N}."""
    p = Path(path)
    if not p.is_file():
        raise ScldmError(f"{p}: conditions file not found")
    if p.suffix in (".yaml", ".yml"):
        rows = OmegaConf.to_container(OmegaConf.load(p))
    else:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    if not isinstance(rows, list) or not rows:
        raise ScldmError(f"{p}: expected a non-empty list of conditions with an n_cells field")
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if "n_cells" not in row:
            raise ScldmError(f"{p}: condition {i} has no n_cells field; add the number of cells to generate")
        n = int(row.pop("n_cells"))
        out.append(({k: str(v) for k, v in row.items()}, n))
    return out


def conditions_matching(obs: pd.DataFrame, attributes: Sequence[str], n_cells: int | None = None,
                        where: str = "obs") -> Conditions:
    """Conditions reproducing the joint distribution of the label columns ``attributes`` of ``obs``:
    one cell per row, or ``n_cells`` cells in the same proportions (largest remainders get the
    leftover cells). Columns of ``attributes`` missing from ``obs`` stay unconditioned."""
    present = [a for a in attributes if a in obs.columns]
    if not present:
        raise ScldmError(f"{where}: none of the label columns {list(attributes)} are in obs "
                         f"(columns: {list(obs.columns)[:20]}); add one or pass explicit conditions")
    counts = obs.groupby(present, observed=True).size()
    if n_cells is not None:
        exact = counts / counts.sum() * n_cells
        base = np.floor(exact).astype(int)
        rest = n_cells - int(base.sum())
        order = np.argsort(-(exact - base).to_numpy(), kind="stable")[:rest]
        base.iloc[order] += 1
        counts = base
    out = []
    for key, n in counts.items():
        key = key if isinstance(key, tuple) else (key,)
        if int(n) > 0:
            out.append((dict(zip(present, map(str, key))), int(n)))
    return out


def read_obs(path: str | Path) -> pd.DataFrame:
    """The obs table of an ``.h5ad`` (read backed: X is not loaded)."""
    import anndata as ad

    if not Path(path).is_file():
        raise ScldmError(f"{path}: file not found; pass an existing .h5ad")
    backed = ad.read_h5ad(path, backed="r")
    try:
        return backed.obs.copy()
    finally:
        backed.file.close()


def normalize_conditions(conditions: Any) -> Conditions:
    """The internal list of ``(values, n)`` from the public forms (see the module docstring)."""
    if conditions is None:
        return []
    if isinstance(conditions, Mapping):
        out: Conditions = []
        for attr, per_value in conditions.items():
            if not isinstance(per_value, Mapping):
                raise ScldmError(f"conditions[{attr!r}]: expected a mapping value -> number of cells, "
                                 f"e.g. {{'{attr}': {{'B cell': 500}}}}")
            out.extend(({str(attr): str(value)}, int(n)) for value, n in per_value.items())
        return out
    out = []
    for item in conditions:
        try:
            values, n = item
        except (TypeError, ValueError):
            raise ScldmError(f"condition {item!r}: expected (dict of attribute -> value, number of cells)") from None
        out.append(({str(k): str(v) for k, v in dict(values).items()}, int(n)))
    return out


def obs_codes(labels: LabelTables, obs: pd.DataFrame) -> np.ndarray:
    """Label codes ``labels_na`` of cells described by ``obs``: a value the tables lack is ``unknown``,
    an attribute without a column is left unconditioned (its null code)."""
    columns = [labels.encode(a, obs[a]) if a in obs.columns else np.full(len(obs), null, dtype=np.int64)
               for a, null in zip(labels.attributes, labels.cardinalities)]
    return np.stack(columns, 1) if columns else np.zeros((len(obs), 0), dtype=np.int64)


def condition_codes(conditions: Conditions, labels: LabelTables, strict: bool = True
                    ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Label codes ``labels_na`` (one row per requested cell) and the matching obs table.

    Attributes a condition does not name are left unconditioned (null code = cardinality) and are
    empty in obs. ``strict``: a value missing from the label tables is an error; otherwise it maps
    to the attribute's ``unknown`` code.
    """
    attributes = labels.attributes
    null_codes = labels.cardinalities
    rows_codes, rows_obs = [], []
    for values, n in conditions:
        if n < 0:
            raise ScldmError(f"condition {values}: negative number of cells ({n})")
        extra = set(values) - set(attributes)
        if extra:
            raise ScldmError(f"condition {values}: unknown attribute(s) {sorted(extra)}; the model knows {attributes}")
        codes = [(labels.code_of(a, values[a]) if strict else int(labels.encode(a, [values[a]])[0]))
                 if a in values else null_codes[i] for i, a in enumerate(attributes)]
        rows_codes.extend([codes] * n)
        rows_obs.extend([{a: values.get(a, "") for a in attributes}] * n)
    labels_na = torch.tensor(rows_codes, dtype=torch.long).reshape(len(rows_codes), len(attributes))
    obs = pd.DataFrame(rows_obs, columns=attributes, index=[f"gen_{i}" for i in range(len(rows_obs))])
    for a in attributes:
        obs[a] = pd.Categorical(obs[a])
    return labels_na, obs
