"""Reading h5ad files piece by piece (h5py + anndata's element reader): obs / var without X, row
ranges of a matrix, and where a file keeps its raw counts (``X``, ``.raw.X`` or a layer).

CELLxGENE files keep normalized values in ``X`` and the raw counts in ``.raw.X`` (whose genes
are ``raw/var``, often more than ``var``); other files keep them in ``layers['counts']``.
:func:`find_counts` resolves ``--counts auto|X|raw|layer:NAME`` for one file by looking at a
sample of each candidate matrix (its first rows), never at a whole matrix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from scldm_scale.errors import ScldmError

CORRUPT_FIX = "the file is corrupt or truncated; re-create or re-download it"
COUNTS_CHOICES = "auto|X|raw|layer:NAME"
AUTO_LAYER = "counts"  # the layer `--counts auto` looks at, after X and .raw.X
_SAMPLE_VALUES = 200_000  # stored values looked at per candidate matrix by --counts auto


def open_h5(path: str):
    """The h5ad file ``path`` opened read-only with h5py (one-line errors for unreadable files)."""
    import h5py

    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ScldmError(f"{path}: cannot be read ({type(e).__name__}: {e}); check the path") from None
    if size == 0:
        raise ScldmError(f"{path}: file is empty (0 bytes); re-create or re-download it, or drop it from the inputs")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError with multi-line text for non-HDF5 / truncated files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ScldmError(f"{path}: not a readable h5ad file ({type(e).__name__}: {msg}); {CORRUPT_FIX}") from None
    for key in ("obs", "var"):
        if key not in f:
            f.close()
            raise ScldmError(f"{path}: h5ad file has no '{key}' group; {CORRUPT_FIX}")
    return f


def read_elem(f, key: str, path: str):
    """anndata's reader of element ``key`` (``obs``, ``var``, ``raw/var``, ``X``, ``layers/counts`` ...)."""
    from anndata.io import read_elem as _anndata_read_elem

    try:
        return _anndata_read_elem(f[key])
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ScldmError(
            f"{path}: h5ad element '{key}' cannot be read ({type(e).__name__}: {msg}); {CORRUPT_FIX} "
            "(files written by anndata < 0.8 must be re-written with a recent anndata)"
        ) from None


def matrix_shape(f, key: str, path: str) -> tuple[int, int]:
    """Shape of the matrix stored at ``key`` (sparse group or dense dataset)."""
    import h5py

    x = f[key]
    try:
        shape = x.attrs["shape"] if isinstance(x, h5py.Group) else x.shape
        return int(shape[0]), int(shape[1])
    except Exception as e:
        raise ScldmError(f"{path}: cannot read the shape of {key} ({type(e).__name__}: {e}); {CORRUPT_FIX}") from None


def read_matrix_rows(x, lo: int, hi: int) -> scipy.sparse.csr_matrix:
    """Rows ``[lo, hi)`` of an h5py matrix element (CSR group, CSC group or dense dataset) as CSR,
    reading only those rows (a CSC matrix is read whole, then sliced)."""
    import h5py

    if isinstance(x, h5py.Dataset):
        return scipy.sparse.csr_matrix(np.asarray(x[lo:hi]))
    encoding = x.attrs.get("encoding-type", "")
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    shape = tuple(int(v) for v in x.attrs["shape"])
    if encoding != "csr_matrix":
        from anndata.io import read_elem as _anndata_read_elem

        return scipy.sparse.csr_matrix(_anndata_read_elem(x))[lo:hi]
    indptr = np.asarray(x["indptr"][lo : hi + 1], dtype=np.int64)
    a, b = int(indptr[0]), int(indptr[-1])
    data = np.asarray(x["data"][a:b])
    indices = np.asarray(x["indices"][a:b])
    return scipy.sparse.csr_matrix((data, indices, indptr - a), shape=(hi - lo, shape[1]))


def sample_values(x, max_values: int = _SAMPLE_VALUES) -> np.ndarray:
    """Stored values of the first rows of a matrix element (about ``max_values`` of them)."""
    import h5py

    if isinstance(x, h5py.Dataset):
        n_rows = max(1, max_values // max(1, x.shape[1])) if x.ndim == 2 else 1
        return np.asarray(x[:n_rows]).ravel()
    data = x["data"]
    return np.asarray(data[: min(len(data), max_values)])


def integer_valued(values: np.ndarray) -> bool:
    """True when ``values`` are all finite non-negative integers (integer or float dtype)."""
    values = np.asarray(values)
    if values.size == 0:
        return True
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.unsignedinteger):
        return True
    if np.issubdtype(values.dtype, np.signedinteger):
        return bool((values >= 0).all())
    if not np.issubdtype(values.dtype, np.floating):
        return False
    return bool(np.isfinite(values).all() and (values >= 0).all() and (values == np.floor(values)).all())


def _not_counts(values: np.ndarray) -> str:
    """What makes ``values`` not counts, e.g. ``non-integer values (e.g. 0.53)``."""
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        return f"non-numeric values ({values.dtype})"
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        return "NaN or infinite values"
    if (values < 0).any():
        return f"negative values (e.g. {values[values < 0][0]:g})"
    return f"non-integer values (e.g. {values[values != np.floor(values)][0]:g})"


@dataclass(frozen=True)
class Counts:
    """Where one file keeps its raw counts."""

    field: str  # "X" | "raw" | "layer:NAME" (what --counts names)
    matrix: str  # h5 element of the matrix: X, raw/X, layers/NAME
    var: str  # h5 element of its genes: var or raw/var

    @property
    def label(self) -> str:
        """As written in messages: ``X``, ``.raw.X``, ``layers['NAME']``."""
        if self.field == "raw":
            return ".raw.X"
        if self.field.startswith("layer:"):
            return f"layers['{self.field[len('layer:'):]}']"
        return "X"


def parse_counts(spec: str) -> str:
    """Validate a ``--counts`` value; returns it normalized (``auto``, ``X``, ``raw`` or ``layer:NAME``)."""
    spec = str(spec).strip()
    if spec in ("auto", "X", "raw"):
        return spec
    if spec.startswith("layer:") and spec[len("layer:"):]:
        return spec
    raise ScldmError(f"--counts {spec!r}: choose one of {COUNTS_CHOICES} (e.g. --counts layer:counts)")


def _candidate(field: str) -> Counts:
    if field == "X":
        return Counts("X", "X", "var")
    if field == "raw":
        return Counts("raw", "raw/X", "raw/var")
    return Counts(field, f"layers/{field[len('layer:'):]}", "var")


def _layers(f) -> list[str]:
    return list(f["layers"].keys()) if "layers" in f else []


def find_counts(f, path: str, spec: str) -> tuple[Counts, str]:
    """Where ``path`` keeps its raw counts under ``--counts spec``, and why (a phrase for the log line).

    ``auto`` takes the first of ``X``, ``.raw.X``, ``layers['counts']`` whose sampled values are
    integers; a named field must exist (its values are checked when the file is read).
    """
    spec = parse_counts(spec)
    where = f"present: X{' + .raw' if 'raw' in f else ''}, layers {_layers(f)}"
    if spec != "auto":
        counts = _candidate(spec)
        if counts.matrix not in f:
            raise ScldmError(
                f"{path}: --counts {spec} but the file has no {counts.label} ({where}); "
                "name a field the file has, or use --counts auto"
            )
        if counts.var not in f:
            raise ScldmError(f"{path}: {counts.label} has no {counts.var} with its genes; {CORRUPT_FIX}")
        return counts, f"--counts {spec}"
    skipped = []
    for field in ("X", "raw", f"layer:{AUTO_LAYER}"):
        counts = _candidate(field)
        if counts.matrix not in f or counts.var not in f:
            skipped.append(f"no {counts.label}")
            continue
        try:
            values = sample_values(f[counts.matrix])
        except Exception as e:  # h5py errors of truncated files
            msg = str(e).splitlines()[0] if str(e) else ""
            raise ScldmError(f"{path}: {counts.label} cannot be read ({type(e).__name__}: {msg}); {CORRUPT_FIX}") from None
        if integer_valued(values):
            reason = "integer-valued" + (f"; {', '.join(skipped)}" if skipped else "")
            return counts, reason
        skipped.append(f"{counts.label} holds {_not_counts(values)}")
    raise ScldmError(
        f"{path}: no raw integer counts found ({'; '.join(skipped)}; layers: {_layers(f)}); store the raw counts "
        "in X, .raw.X or a layer and pass --counts layer:NAME if it is another layer"
    )
