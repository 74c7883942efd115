"""Cheap, early checks of user data, raising one-line :class:`ScldmError` messages.

Heavy readers (anndata, h5py) are imported inside the functions that need them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import scipy.sparse

from scldm_scale.errors import ScldmError

HELDOUT_NAME = "heldout.h5ad"
_SAMPLE_ROWS = 128  # rows read from the head and the tail of each shard by check_h5ad_shards


def check_counts(x, where: str, field: str = "X", fix: str = "") -> None:
    """Raise :class:`ScldmError` unless ``x`` (sparse or dense block) holds finite non-negative integers.

    ``field`` names the matrix in the message (``X``, ``.raw.X``, ``layers['counts']``) and ``fix``
    replaces the default advice (store raw integer counts in it).
    """
    data = x.data if scipy.sparse.issparse(x) else np.asarray(x)
    data = np.asarray(data)
    if data.size == 0:
        return
    fix = fix or f"store raw integer counts in {field}"
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ScldmError(f"{where}: {field} has non-numeric dtype {data.dtype}; {fix}")
    if np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_:
        if np.issubdtype(data.dtype, np.signedinteger) and (data < 0).any():
            raise ScldmError(f"{where}: {field} has negative values (min {data.min()}); {fix} (non-negative)")
        return
    if not np.isfinite(data).all():
        raise ScldmError(f"{where}: {field} has NaN or infinite values; {fix} (no NaN)")
    if (data < 0).any():
        raise ScldmError(
            f"{where}: {field} has negative values (min {data.min():g}); {fix}, not scaled or centered data"
        )
    frac = data != np.floor(data)
    if frac.any():
        raise ScldmError(
            f"{where}: {field} has non-integer values (e.g. {data[frac][0]:g}); {fix} "
            "(not normalized/log1p data; raw counts are often in layers['counts'] or .raw)"
        )


def resolve_shards(path: str) -> list[str]:
    """Shard files of ``path``: a directory (sorted ``shard_*.h5ad``, else ``*.h5ad`` without
    ``heldout.h5ad``), a glob (``dir/*.h5ad``), a brace pattern (``dir/shard_{0000..0009}.h5ad``)
    or a single file."""
    path = os.path.expanduser(str(path))
    if not path:
        raise ScldmError("data.path is empty; set it to a directory of h5ad shards, a glob or a brace pattern")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "shard_*.h5ad")))
        if not files:
            files = sorted(
                f for f in glob.glob(os.path.join(glob.escape(path), "*.h5ad")) if os.path.basename(f) != HELDOUT_NAME
            )
        if not files:
            raise ScldmError(
                f"{path}: directory has no .h5ad shards; point data.path at the shards "
                "(run `scldm-scale prepare` to create them)"
            )
        return files
    if "{" in path and "}" in path:
        from braceexpand import braceexpand

        files = list(braceexpand(path))
        if not files:
            raise ScldmError(f"{path}: brace pattern expands to no files; fix data.path")
        return files
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise ScldmError(f"{path}: glob matches no files; fix data.path")
        return files
    if os.path.isfile(path):
        return [path]
    raise ScldmError(
        f"{path}: no such file or directory; set data.path to a directory of h5ad shards, a glob or a brace pattern"
    )


def _read_backed(path: str):
    """Open ``path`` as a backed AnnData, mapping every reader failure to a ScldmError."""
    import anndata
    import h5py

    fix = "the file is corrupt or truncated; re-create it (scldm-scale prepare) or re-download it"
    if not os.path.isfile(path):
        raise ScldmError(f"{path}: shard file does not exist; fix data.path or re-run `scldm-scale prepare`")
    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
    except Exception as e:  # h5py raises OSError with multi-line text for non-HDF5 / truncated files
        raise ScldmError(f"{path}: not a readable h5ad file ({type(e).__name__}: {e}); {fix}") from None
    for key in ("X", "obs", "var"):
        if key not in keys:
            raise ScldmError(f"{path}: h5ad file has no '{key}' group (found {sorted(keys)}); {fix}")
    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception as e:
        raise ScldmError(f"{path}: h5ad file cannot be read ({type(e).__name__}: {e}); {fix}") from None


def _sample_rows(adata, path: str):
    n = adata.n_obs
    k = min(_SAMPLE_ROWS, n)
    try:
        blocks = [adata.X[0:k]]
        if n > k:
            blocks.append(adata.X[max(k, n - k) : n])
    except Exception as e:
        raise ScldmError(
            f"{path}: X cannot be read ({type(e).__name__}: {e}); the file is corrupt or truncated, re-create it"
        ) from None
    return blocks


def check_h5ad_shards(paths: Sequence[str], label_columns: Sequence[str]) -> None:
    """Validate h5ad shards before training reads them.

    Every shard must exist and be a readable h5ad with a non-empty X, have the label columns
    in obs (same dtype / categories as the first shard, same obs columns), share the first
    shard's var, and hold raw counts (finite, non-negative integers) in a head/tail sample of X.
    """
    import pandas as pd

    paths = [str(p) for p in paths]
    if not paths:
        raise ScldmError("no h5ad shards given; set data.path to a directory of shards, a glob or a brace pattern")
    ref_var = ref_obs_cols = ref_dtypes = None
    ref_path = paths[0]
    for path in paths:
        adata = _read_backed(path)
        try:
            if adata.n_obs == 0 or adata.n_vars == 0:
                raise ScldmError(
                    f"{path}: X is empty ({adata.n_obs} cells x {adata.n_vars} genes); remove the shard or refill it"
                )
            obs = adata.obs
            missing = [c for c in label_columns if c not in obs.columns]
            if missing:
                raise ScldmError(
                    f"{path}: obs column '{missing[0]}' is missing (columns: {list(obs.columns)[:20]}); "
                    "add it or remove it from data.label_columns"
                )
            if "cell_index" in obs.columns and not pd.api.types.is_integer_dtype(obs["cell_index"].dtype):
                raise ScldmError(
                    f"{path}: obs column 'cell_index' has dtype {obs['cell_index'].dtype}; "
                    "it must hold integer global cell ids (or drop the column)"
                )
            var = adata.var
            if ref_var is None:
                ref_var, ref_obs_cols = var, list(obs.columns)
                ref_dtypes = {c: obs[c].dtype for c in obs.columns}
            else:
                if not var.index.equals(ref_var.index):
                    raise ScldmError(
                        f"{path}: var_names differ from those of {ref_path} ({adata.n_vars} vs {len(ref_var)} genes); "
                        "all shards must share the same genes in the same order (re-run `scldm-scale prepare`)"
                    )
                if not var.equals(ref_var):
                    raise ScldmError(
                        f"{path}: var columns differ from those of {ref_path}; all shards must share an identical var "
                        "table (re-run `scldm-scale prepare`)"
                    )
                if list(obs.columns) != ref_obs_cols:
                    raise ScldmError(
                        f"{path}: obs columns {list(obs.columns)[:20]} differ from {ref_obs_cols[:20]} in {ref_path}; "
                        "all shards must have the same obs columns in the same order"
                    )
                for c in obs.columns:
                    if obs[c].dtype != ref_dtypes[c]:
                        what = "categories" if isinstance(ref_dtypes[c], pd.CategoricalDtype) else "dtype"
                        raise ScldmError(
                            f"{path}: obs column '{c}' {what} differ from those in {ref_path}; "
                            "give every shard identical category lists (set_categories to the union) and dtypes"
                        )
            for block in _sample_rows(adata, path):
                check_counts(block, path)
        finally:
            if getattr(adata, "file", None) is not None:
                adata.file.close()
