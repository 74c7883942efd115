"""Harmonizing ``prepare``: h5ad files with different genes, obs columns and categories ->
cellarium-ready h5ad shards (:func:`prepare_h5ad`) or one TileDB-SOMA experiment
(:func:`prepare_soma`) with one gene vocabulary and one category table per label.

Gene ids. Each input's ids are read from its var: the var index when it looks like Ensembl
(``ENS...``, >= 90% of the entries), else the first of the columns ``gene_ids``, ``gene_id``,
``ensembl_id``, ``feature_id`` that does; symbols come from the var index (when it is not
Ensembl) or ``gene_symbols`` / ``gene_symbol`` / ``feature_name`` / ``gene_name``. Ensembl
version suffixes are dropped (``ENSG00000141510.5`` -> ``ENSG00000141510``). The vocabulary
is in Ensembl ids when any input (or ``--vocab``) has them, else in symbols; an input that
lacks that kind of id is translated through the symbol <-> Ensembl pairs of the other inputs
(one-to-one pairs only), and its untranslatable genes are dropped. Without ``--vocab`` the
vocabulary is the union of the inputs' ids (genes present in >= ``min_files`` inputs),
**sorted**, so it does not depend on the order of the inputs. Genes outside the vocabulary
are dropped and counted (one line per input); genes of the vocabulary absent from an input
are zeros.

Labels. For every label column the table is the sorted union of the values seen in the
inputs, plus ``unknown``; missing values and a column missing from an input map to
``unknown`` (a warning line; an error with ``require_labels``). Every output block stores the
label columns as categoricals with the full shared category list.

Passes. Pass 1 reads only var and obs of each input (h5py + ``anndata.io.read_elem``; X,
layers and raw are never loaded) and checks what can be checked without X. Pass 2 reads one
input at a time (X + obs), validates its counts (finite non-negative integers), remaps its
genes to the vocabulary and hands its cells to the writer, so memory is bounded by one input
file plus one output shard.

Atomicity and idempotency. Everything is written into ``<OUT>.tmp-<pid>`` and renamed onto
``OUT`` at the end (``metadata.json`` last), so an interrupted run leaves only the temp
folder, which the next run removes. ``metadata.json`` holds a ``fingerprint`` of the input
paths, sizes, mtimes and the options: re-running with the same fingerprint does nothing
("up to date"); an ``OUT`` with another fingerprint is replaced only with ``overwrite``.

Cell ids. ``cell_index`` numbers the training cells 0..n-1 in input order; held-out cells
(``heldout_fraction``: each cell independently with that probability, drawn from ``seed``
and the input's position) follow after them, as in :mod:`scldm_scale.data.synthetic`.
The obs index is ``"<input stem>:<obs name>"`` (duplicate obs names made unique).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from scldm_scale.data.labels import UNKNOWN, LabelTables
from scldm_scale.data.synthetic import FORMAT as H5AD_FORMAT
from scldm_scale.data.synthetic import FORMAT_VERSION
from scldm_scale.data.validate import HELDOUT_NAME, check_counts
from scldm_scale.data.vocab import GeneVocab, write_json_atomic
from scldm_scale.errors import ScldmError

SOMA_FORMAT = "scldm-scale/soma-experiment"
HARMONIZE_VERSION = 1  # bump when the output of the same inputs and options changes
MEASUREMENT = "RNA"
X_LAYER = "data"
RESERVED_OBS = ("cell_index", "source_file")
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name")
_ENSEMBL_RE = r"^ENS[A-Z]*\d{5,}(?:\.\d+)?$"
_ENSEMBL_VERSION_RE = r"^(ENS[A-Z]*\d{5,})\.\d+$"
_ENSEMBL_MIN_FRACTION = 0.9
_INT32_MAX = np.iinfo(np.int32).max
_CORRUPT_FIX = "the file is corrupt or truncated; re-create or re-download it"


@dataclass
class PrepareResult:
    """What :func:`prepare_h5ad` / :func:`prepare_soma` did: ``up_to_date`` when nothing was written."""

    out: str
    meta: dict[str, Any]
    up_to_date: bool = False


# ---------------------------------------------------------------------------------------------
# console


class _Reporter:
    """Progress bar (rich, on stderr, transient) plus info lines (hidden by quiet) and warnings."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar = None
        self.console = None

    def start(self) -> None:
        if not self.progress:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(file=sys.stderr, highlight=False)
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.bar.start()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total) if self.bar is not None else None

    def advance(self, task, n: int = 1, description: str | None = None) -> None:
        if self.bar is not None and task is not None:
            self.bar.update(task, advance=n, **({"description": description} if description else {}))

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        if self.progress:
            self._print(line)

    def warn(self, line: str) -> None:
        self._print(f"warning: {line}")


# ---------------------------------------------------------------------------------------------
# reading inputs (never loads X in pass 1, never loads layers/raw/obsm at all)


def _open_h5(path: str):
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
        raise ScldmError(f"{path}: not a readable h5ad file ({type(e).__name__}: {msg}); {_CORRUPT_FIX}") from None
    for key in ("obs", "var"):
        if key not in f:
            f.close()
            raise ScldmError(f"{path}: h5ad file has no '{key}' group; {_CORRUPT_FIX}")
    return f


def _read_elem(f, key: str, path: str):
    from anndata.io import read_elem

    try:
        return read_elem(f[key])
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ScldmError(
            f"{path}: h5ad element '{key}' cannot be read ({type(e).__name__}: {msg}); {_CORRUPT_FIX} "
            "(files written by anndata < 0.8 must be re-written with a recent anndata)"
        ) from None


def _x_shape(f, path: str) -> tuple[int, int]:
    import h5py

    if "X" not in f:
        raise ScldmError(f"{path}: h5ad file has no X; store the raw integer counts in X")
    x = f["X"]
    try:
        shape = x.attrs["shape"] if isinstance(x, h5py.Group) else x.shape
        return int(shape[0]), int(shape[1])
    except Exception as e:
        raise ScldmError(f"{path}: cannot read the shape of X ({type(e).__name__}: {e}); {_CORRUPT_FIX}") from None


@dataclass
class _GeneIds:
    """A file's gene ids of both kinds (entries None where missing); ``*_from`` names the source."""

    ensembl: np.ndarray | None
    symbol: np.ndarray | None
    ensembl_from: str = ""
    symbol_from: str = ""


def _clean(values) -> np.ndarray:
    """Object array of stripped strings, None for missing / empty entries."""
    s = pd.Series(np.asarray(values, dtype=object))
    missing = s.isna().to_numpy()
    out = s.astype(str).str.strip().to_numpy(dtype=object)
    out[missing | (out == "")] = None
    return out


def _ensembl_fraction(values: np.ndarray) -> float:
    present = pd.Series([v for v in values if v is not None], dtype=object)
    if present.empty:
        return 0.0
    return float(present.str.match(_ENSEMBL_RE).mean())


def _strip_version(values: np.ndarray) -> np.ndarray:
    s = pd.Series(values, dtype=object)
    present = s.notna()
    s[present] = s[present].str.replace(_ENSEMBL_VERSION_RE, r"\1", regex=True)
    return s.to_numpy(dtype=object)


def _gene_ids(var: pd.DataFrame) -> _GeneIds:
    index = _clean(var.index)
    ens = sym = None
    ens_from = sym_from = ""
    index_is_ensembl = _ensembl_fraction(index) >= _ENSEMBL_MIN_FRACTION
    if index_is_ensembl:
        ens, ens_from = index, "var_names"
    else:
        for col in ID_COLUMNS:
            if col in var.columns:
                vals = _clean(var[col])
                if _ensembl_fraction(vals) >= _ENSEMBL_MIN_FRACTION:
                    ens, ens_from = vals, f"var['{col}']"
                    break
    index_is_numeric = all(v is None or v.isdigit() for v in index)
    if not index_is_ensembl and not index_is_numeric:
        sym, sym_from = index, "var_names"
    else:
        for col in SYMBOL_COLUMNS:
            if col in var.columns:
                sym, sym_from = _clean(var[col]), f"var['{col}']"
                break
    if ens is not None:
        ens = _strip_version(ens)
    return _GeneIds(ens, sym, ens_from, sym_from)


def _read_var_ids(path: str) -> _GeneIds:
    f = _open_h5(path)
    try:
        var = _read_elem(f, "var", path)
    finally:
        f.close()
    return _gene_ids(var)


def _label_strings(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as str, missing mask) of an obs column of any dtype."""
    s = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
    missing = s.isna().to_numpy()
    return s.astype(str).to_numpy(dtype=object), missing


# ---------------------------------------------------------------------------------------------
# pass 1: scan var and obs of every input


@dataclass
class _FileInfo:
    path: str
    name: str  # source_file value
    stem: str  # obs name prefix
    n_obs: int
    n_vars: int
    has_ensembl: bool
    has_symbol: bool
    missing_labels: list[str]
    n_kept: int = 0
    n_heldout: int = 0


@dataclass
class _Scan:
    files: list[_FileInfo]
    label_values: dict[str, set[str]]
    ens_to_sym: dict[str, dict[str, None]] = field(default_factory=dict)  # ordered symbol lists
    sym_to_ens: dict[str, dict[str, None]] = field(default_factory=dict)


def _source_names(paths: list[str]) -> list[str]:
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):
        root = os.path.commonpath(paths)
        names = [os.path.relpath(p, root) for p in paths]
    return names


def _stem(name: str) -> str:
    return name[: -len(".h5ad")] if name.endswith(".h5ad") else name


def _scan(paths: list[str], labels: Sequence[str], require_labels: bool, report: _Reporter) -> _Scan:
    names = _source_names(paths)
    scan = _Scan(files=[], label_values={c: set() for c in labels})
    task = report.task("reading var/obs", len(paths))
    for path, name in zip(paths, names):
        f = _open_h5(path)
        try:
            n_obs, n_vars = _x_shape(f, path)
            var = _read_elem(f, "var", path)
            obs = _read_elem(f, "obs", path)
        finally:
            f.close()
        if len(var) != n_vars or len(obs) != n_obs:
            raise ScldmError(
                f"{path}: X is {n_obs} x {n_vars} but obs has {len(obs)} rows and var {len(var)}; {_CORRUPT_FIX}"
            )
        if n_obs == 0 or n_vars == 0:
            raise ScldmError(
                f"{path}: h5ad file is empty ({n_obs} cells x {n_vars} genes); drop it from the inputs or refill it"
            )
        ids = _gene_ids(var)
        if ids.ensembl is None and ids.symbol is None:
            raise ScldmError(
                f"{path}: no gene ids found in var (index and columns {list(var.columns)[:10]} are empty); "
                "put Ensembl ids or gene symbols in var_names"
            )
        if ids.ensembl is not None and ids.symbol is not None:
            for e, s in zip(ids.ensembl, ids.symbol):
                if e is not None and s is not None:
                    scan.ens_to_sym.setdefault(e, {}).setdefault(s, None)
                    scan.sym_to_ens.setdefault(s, {}).setdefault(e, None)
        missing = [c for c in labels if c not in obs.columns]
        for col in labels:
            if col in missing:
                if require_labels:
                    raise ScldmError(
                        f"{path}: obs column '{col}' is missing (columns: {list(obs.columns)[:20]}); add it, "
                        f"drop it from --labels, or leave out --require-labels to label these cells '{UNKNOWN}'"
                    )
                report.warn(f"{path}: obs column '{col}' is missing; its {n_obs} cells are labelled '{UNKNOWN}'")
                continue
            values, miss = _label_strings(obs[col])
            scan.label_values[col].update(pd.unique(values[~miss]).tolist())
        scan.files.append(
            _FileInfo(path, name, _stem(name), n_obs, n_vars, ids.ensembl is not None, ids.symbol is not None, missing)
        )
        del var, obs
        report.advance(task)
    return scan


# ---------------------------------------------------------------------------------------------
# plan: id space, vocabulary, label tables, cell ids


@dataclass
class _Plan:
    space: str  # "ensembl" | "symbol"
    vocab: GeneVocab
    vocab_index: pd.Index  # normalized vocabulary ids (version-stripped)
    sym_to_ens: dict[str, str]
    ens_to_sym: dict[str, str]
    labels: LabelTables
    label_columns: list[str]
    source_names: list[str]
    var: pd.DataFrame
    heldout_fraction: float
    seed: int
    n_train: int = 0
    n_heldout: int = 0


def _file_keys(ids: _GeneIds, plan_space: str, sym_to_ens: dict[str, str], ens_to_sym: dict[str, str]):
    """Ids of a file's genes in the vocabulary's id space (None = cannot be identified), and their source."""
    if plan_space == "ensembl":
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


def _check_unique(keys: np.ndarray, source: str, path: str) -> None:
    present = pd.Index([k for k in keys if k is not None])
    if not present.is_unique:
        dups = present[present.duplicated()].unique().tolist()
        raise ScldmError(
            f"{path}: duplicated gene ids in {source} ({len(dups)} ids, e.g. {dups[0]!r}); make them unique "
            "(sum or drop the duplicated genes, or use Ensembl ids) before prepare"
        )


def _one_to_one(a_to_b: dict[str, dict[str, None]], b_to_a: dict[str, dict[str, None]]) -> dict[str, str]:
    out = {}
    for a, bs in a_to_b.items():
        if len(bs) == 1:
            b = next(iter(bs))
            if len(b_to_a.get(b, ())) == 1:
                out[a] = b
    return out


def _heldout_mask(seed: int, file_pos: int, n: int, fraction: float) -> np.ndarray:
    if fraction <= 0.0:
        return np.zeros(n, dtype=bool)
    return np.random.default_rng([seed, 0x4E1D, file_pos]).random(n) < fraction


def _plan(
    scan: _Scan,
    vocab: GeneVocab | None,
    min_files: int,
    labels: Sequence[str],
    heldout_fraction: float,
    seed: int,
    report: _Reporter,
) -> _Plan:
    files = scan.files
    if vocab is not None:
        space = "ensembl" if _ensembl_fraction(_clean(vocab.gene_ids)) >= _ENSEMBL_MIN_FRACTION else "symbol"
    else:
        space = "ensembl" if any(fi.has_ensembl for fi in files) else "symbol"
    sym_to_ens = _one_to_one(scan.sym_to_ens, scan.ens_to_sym)
    ens_to_sym = _one_to_one(scan.ens_to_sym, scan.sym_to_ens)

    task = report.task("building the gene vocabulary", 2 * len(files))
    if vocab is None:
        n_files_of: dict[str, int] = {}
        for fi in files:
            keys, source = _file_keys(_read_var_ids(fi.path), space, sym_to_ens, ens_to_sym)
            _check_unique(keys, source, fi.path)
            for k in keys:
                if k is not None:
                    n_files_of[k] = n_files_of.get(k, 0) + 1
            report.advance(task)
        gene_ids = sorted(k for k, n in n_files_of.items() if n >= min_files)
        if not gene_ids:
            raise ScldmError(
                f"--min-files {min_files}: no gene is present in {min_files} or more of the {len(files)} inputs; "
                "lower --min-files"
            )
        digest = hashlib.sha256("\n".join(gene_ids).encode()).hexdigest()[:12]
        vocab = GeneVocab(gene_ids, version=f"prepare-{digest}")
        vocab_index = pd.Index(gene_ids)
    else:
        normalized = _strip_version(_clean(vocab.gene_ids)) if space == "ensembl" else _clean(vocab.gene_ids)
        vocab_index = pd.Index(normalized)
        if not vocab_index.is_unique:
            dups = vocab_index[vocab_index.duplicated()].unique().tolist()
            raise ScldmError(
                f"--vocab: ids {dups[:3]} occur more than once once Ensembl versions are dropped; "
                "keep one version per gene"
            )
        report.advance(task, len(files))

    n_train = n_heldout = 0
    for pos, fi in enumerate(files):
        ids = _read_var_ids(fi.path)
        keys, source = _file_keys(ids, space, sym_to_ens, ens_to_sym)
        _check_unique(keys, source, fi.path)
        fi.n_kept = int((_vocab_map(keys, vocab_index) >= 0).sum())
        if fi.n_kept == 0:
            shown = [k for k in keys if k is not None][:3]
            if not shown:  # nothing could be translated: show the file's own ids
                own = next(v for v in (ids.symbol, ids.ensembl) if v is not None)
                shown = [k for k in own if k is not None][:3]
            raise ScldmError(
                f"{fi.path}: none of its {fi.n_vars} genes are in the gene vocabulary (ids from {source}, e.g. "
                f"{shown} vs {vocab.gene_ids[:3]}); use Ensembl ids or symbols matching the other inputs / --vocab, "
                "or drop the file"
            )
        fi.n_heldout = int(_heldout_mask(seed, pos, fi.n_obs, heldout_fraction).sum())
        n_heldout += fi.n_heldout
        n_train += fi.n_obs - fi.n_heldout
        report.advance(task)
    if n_train == 0:
        raise ScldmError(
            f"--heldout-fraction {heldout_fraction}: every cell was held out, none is left for training; lower it"
        )

    var = pd.DataFrame(index=pd.Index(vocab.gene_ids))
    if space == "ensembl":
        symbols = [next(iter(scan.ens_to_sym.get(g, {"": None}))) for g in vocab_index]
        if any(symbols):
            var["gene_symbol"] = pd.Series(symbols, index=var.index, dtype=object)
    categories = {c: sorted(scan.label_values[c]) for c in labels}
    return _Plan(
        space=space, vocab=vocab, vocab_index=vocab_index, sym_to_ens=sym_to_ens, ens_to_sym=ens_to_sym,
        labels=LabelTables(categories), label_columns=list(labels), source_names=[fi.name for fi in files],
        var=var, heldout_fraction=heldout_fraction, seed=seed, n_train=n_train, n_heldout=n_heldout,
    )


def _vocab_map(keys: np.ndarray, vocab_index: pd.Index) -> np.ndarray:
    """Vocabulary index of every key (int64), -1 for None or ids outside the vocabulary."""
    present = np.array([k is not None for k in keys], dtype=bool)
    out = np.full(len(keys), -1, dtype=np.int64)
    if present.any():
        out[present] = vocab_index.get_indexer(pd.Index(keys[present].astype(str)))
    return out


# ---------------------------------------------------------------------------------------------
# pass 2: harmonize one input


def _harmonize_file(fi: _FileInfo, pos: int, plan: _Plan, train_start: int, heldout_start: int):
    """Read one input and return ``(x_train, obs_train, x_heldout, obs_heldout, n_dropped)``.

    X blocks are CSR int32 with exactly the vocabulary's columns; obs has the label columns
    (categoricals with the full tables), ``cell_index`` and ``source_file``.
    """
    path = fi.path
    f = _open_h5(path)
    try:
        shape = _x_shape(f, path)
        x = _read_elem(f, "X", path)
        obs = _read_elem(f, "obs", path)
        var = _read_elem(f, "var", path)
    finally:
        f.close()
    if shape != (fi.n_obs, fi.n_vars) or len(obs) != fi.n_obs:
        raise ScldmError(f"{path}: changed while prepare was reading it (shape {shape}); re-run prepare")
    keys, _ = _file_keys(_gene_ids(var), plan.space, plan.sym_to_ens, plan.ens_to_sym)
    var_to_vocab = _vocab_map(keys, plan.vocab_index)

    if not scipy.sparse.issparse(x):
        x = np.asarray(x)
        check_counts(x, path)
        x = scipy.sparse.csr_matrix(x)
    else:
        x = scipy.sparse.csr_matrix(x)
        check_counts(x, path)
    if x.data.size and x.data.max() > _INT32_MAX:
        raise ScldmError(f"{path}: X has counts above {_INT32_MAX} (max {x.data.max():g}); store raw UMI counts in X")
    keep = np.flatnonzero(var_to_vocab >= 0)
    x = x[:, keep]
    data = x.data if np.issubdtype(x.data.dtype, np.integer) else np.rint(x.data)
    x = scipy.sparse.csr_matrix(
        (data.astype(np.int32), var_to_vocab[keep][x.indices].astype(np.int32), x.indptr),
        shape=(fi.n_obs, len(plan.vocab)),
    )
    x.eliminate_zeros()
    x.sort_indices()

    cols: dict[str, Any] = {}
    for col in plan.label_columns:
        cats = plan.labels.categories[col]
        if col in obs.columns:
            values, miss = _label_strings(obs[col])
            values[miss] = UNKNOWN
        else:
            values = np.full(fi.n_obs, UNKNOWN, dtype=object)
        cols[col] = pd.Categorical(values, categories=cats)
    held = _heldout_mask(plan.seed, pos, fi.n_obs, plan.heldout_fraction)
    cell_index = np.empty(fi.n_obs, dtype=np.int64)
    cell_index[~held] = train_start + np.arange(int((~held).sum()), dtype=np.int64)
    cell_index[held] = heldout_start + np.arange(int(held.sum()), dtype=np.int64)
    cols["cell_index"] = cell_index
    cols["source_file"] = pd.Categorical.from_codes(np.full(fi.n_obs, pos), categories=plan.source_names)
    names = pd.Index([f"{fi.stem}:{n}" for n in obs.index.astype(str)])
    if not names.is_unique:
        from anndata.utils import make_index_unique

        names = make_index_unique(names)
    out_obs = pd.DataFrame(cols, index=names)
    n_dropped = fi.n_vars - len(keep)
    if held.any():
        return x[~held], out_obs.iloc[~held], x[held], out_obs.iloc[held], n_dropped
    return x, out_obs, None, None, n_dropped


# ---------------------------------------------------------------------------------------------
# writers


def _write_shard(adata, path: str) -> None:
    adata.write_h5ad(path)


def _shard_sizes(n: int, shard_size: int) -> list[int]:
    q, r = divmod(n, shard_size)
    return [shard_size] * q + ([r] if r else [])


class _ShardWriter:
    """Cuts the stream of cells into ``shard_size``-cell h5ad shards (buffer < one shard)."""

    def __init__(self, root: str, sizes: list[int], var: pd.DataFrame) -> None:
        width = max(4, len(str(len(sizes) - 1)))
        self.files = [f"shard_{i:0{width}d}.h5ad" for i in range(len(sizes))]
        self.root, self.sizes, self.var = root, sizes, var
        self.k = 0
        self.parts: list[tuple[scipy.sparse.csr_matrix, pd.DataFrame]] = []
        self.buffered = 0
        self.nnz = 0

    def add(self, x: scipy.sparse.csr_matrix, obs: pd.DataFrame) -> None:
        pos, n = 0, x.shape[0]
        while pos < n:
            take = min(self.sizes[self.k] - self.buffered, n - pos)
            self.parts.append((x[pos : pos + take], obs.iloc[pos : pos + take]))
            self.buffered += take
            pos += take
            if self.buffered == self.sizes[self.k]:
                self._flush()

    def _flush(self) -> None:
        import anndata

        x = scipy.sparse.vstack([p[0] for p in self.parts], format="csr") if len(self.parts) > 1 else self.parts[0][0]
        obs = pd.concat([p[1] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][1]
        x = scipy.sparse.csr_matrix(x, dtype=np.int32)
        self.nnz += x.nnz
        _write_shard(anndata.AnnData(X=x, obs=obs, var=self.var.copy()), os.path.join(self.root, self.files[self.k]))
        self.parts, self.buffered = [], 0
        self.k += 1

    def close(self) -> None:
        if self.buffered or self.k != len(self.sizes):
            raise RuntimeError(f"shard writer: {self.k} of {len(self.sizes)} shards written, {self.buffered} buffered")


class _HeldoutWriter:
    """Held-out cells of each input into a part file; parts concatenated on disk at the end."""

    def __init__(self, root: str, var: pd.DataFrame) -> None:
        self.root, self.var = root, var
        self.parts_dir = os.path.join(root, "heldout-parts")
        self.parts: list[str] = []
        self.n = 0

    def add(self, x: scipy.sparse.csr_matrix, obs: pd.DataFrame) -> None:
        import anndata

        os.makedirs(self.parts_dir, exist_ok=True)
        path = os.path.join(self.parts_dir, f"part_{len(self.parts):06d}.h5ad")
        _write_shard(anndata.AnnData(X=x, obs=obs, var=self.var.copy()), path)
        self.parts.append(path)
        self.n += x.shape[0]

    def close(self) -> str | None:
        if not self.parts:
            return None
        out = os.path.join(self.root, HELDOUT_NAME)
        if len(self.parts) == 1:
            os.replace(self.parts[0], out)
        else:
            from anndata.experimental import concat_on_disk

            concat_on_disk(self.parts, out, merge="same")
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return HELDOUT_NAME


class _SomaWriter:
    """One SOMA experiment written cell block by cell block; ``soma_joinid`` = ``cell_index``.

    The shapes are known up front (training cells x vocabulary), so the experiment is created
    once with its final domain and full enumerations, and each input is a plain write of its
    obs rows and X coordinates (no registration pass over the growing experiment).
    """

    def __init__(self, uri: str, n_cells: int, plan: _Plan) -> None:
        import pyarrow as pa
        import tiledbsoma as soma

        self.uri = uri
        self.nnz = 0
        dict_t = pa.dictionary(pa.int32(), pa.large_string(), ordered=False)
        fields = [("obs_id", pa.large_string())]
        fields += [(c, dict_t) for c in plan.label_columns]
        fields += [("cell_index", pa.int64()), ("source_file", dict_t)]
        enums = {c: pa.array(plan.labels.categories[c], type=pa.large_string()) for c in plan.label_columns}
        enums["source_file"] = pa.array(plan.source_names, type=pa.large_string())
        g = len(plan.vocab)
        var_cols = {
            "soma_joinid": np.arange(g, dtype=np.int64),
            "var_id": pa.array(plan.vocab.gene_ids, pa.large_string()),
        }
        var_fields = [("var_id", pa.large_string())]
        if "gene_symbol" in plan.var.columns:
            var_cols["gene_symbol"] = pa.array(plan.var["gene_symbol"].tolist(), pa.large_string())
            var_fields.append(("gene_symbol", pa.large_string()))
        with soma.Experiment.create(uri) as exp:
            obs = exp.add_new_dataframe(
                "obs", schema=pa.schema(fields), index_column_names=["soma_joinid"], domain=[(0, n_cells - 1)]
            )
            obs.extend_enumeration_values(enums)
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(MEASUREMENT, soma.Measurement)
            var = rna.add_new_dataframe(
                "var", schema=pa.schema(var_fields), index_column_names=["soma_joinid"], domain=[(0, g - 1)]
            )
            var.write(pa.table(var_cols))
            rna.add_new_collection("X").add_new_sparse_ndarray(X_LAYER, type=pa.int32(), shape=(n_cells, g))
        self.labels = plan.label_columns
        self.enums = enums
        self.exp = soma.Experiment.open(uri, "w")  # reopened: writes see the extended enumerations

    def add(self, x: scipy.sparse.csr_matrix, obs: pd.DataFrame) -> None:
        import pyarrow as pa

        rows = obs["cell_index"].to_numpy(np.int64)
        table = {"soma_joinid": rows, "obs_id": pa.array(obs.index.astype(str).tolist(), pa.large_string())}
        for c in [*self.labels, "source_file"]:
            codes = pa.array(np.asarray(obs[c].cat.codes, dtype=np.int32))
            table[c] = pa.DictionaryArray.from_arrays(codes, self.enums[c])
        table["cell_index"] = rows
        self.exp.obs.write(pa.table(table))
        coo = x.tocoo()
        self.exp.ms[MEASUREMENT].X[X_LAYER].write(
            pa.table(
                {
                    "soma_dim_0": rows[coo.row].astype(np.int64),
                    "soma_dim_1": coo.col.astype(np.int64),
                    "soma_data": coo.data.astype(np.int32),
                }
            )
        )
        self.nnz += x.nnz

    def close(self) -> None:
        if self.exp is not None:
            self.exp.close()
            self.exp = None


# ---------------------------------------------------------------------------------------------
# driver


def _expand_inputs(inputs: Sequence[str | os.PathLike], out: str) -> list[str]:
    paths: list[str] = []
    for item in inputs:
        p = os.path.abspath(os.path.expanduser(os.fspath(item)))
        if os.path.isdir(p):
            found = sorted(
                f for f in glob.glob(os.path.join(glob.escape(p), "*.h5ad")) if os.path.basename(f) != HELDOUT_NAME
            )
            if not found:
                raise ScldmError(f"{p}: input directory has no .h5ad files; give h5ad files or a folder holding them")
            paths += found
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise ScldmError(f"{p}: input file not found; check the path")
    if not paths:
        raise ScldmError("prepare: no input h5ad files given")
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise ScldmError(f"{p}: given twice as input; list each input once")
        seen.add(p)
        if p == out or p.startswith(out + os.sep):
            raise ScldmError(f"{p}: input lies inside the output {out}; choose another OUT")
    return paths


def _fingerprint(kind: str, paths: list[str], options: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    inputs = []
    for p in paths:
        st = os.stat(p)
        inputs.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    payload = {"harmonize_version": HARMONIZE_VERSION, "kind": kind, "inputs": inputs, "options": options}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest, inputs


def _existing(out: str, meta_file: str, fingerprint: str) -> tuple[str, dict | None]:
    """``("absent" | "up_to_date" | "other" | "incomplete", metadata)`` of an existing OUT."""
    if not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return "absent", None
    meta_path = os.path.join(out, meta_file)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return "other", None
    if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
        return "other", meta if isinstance(meta, dict) else None
    listed = [s.get("file") for s in meta.get("shards", [])] + [meta["vocab"], meta["labels"]]
    if meta.get("heldout"):
        listed.append(meta["heldout"]["file"])
    if meta.get("format") == SOMA_FORMAT:
        listed += ["obs", "ms"]
    if not all(isinstance(n, str) and os.path.exists(os.path.join(out, n)) for n in listed):
        return "incomplete", meta
    return "up_to_date", meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: str, report: _Reporter) -> None:
    """Remove ``<OUT>.tmp-<pid>`` / ``<OUT>.old-<pid>`` left by interrupted runs (dead pids only)."""
    pattern = re.compile(re.escape(os.path.basename(out)) + r"\.(tmp|old)-(\d+)$")
    for p in glob.glob(glob.escape(out) + ".*-*"):
        m = pattern.match(os.path.basename(p))
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        report.info(f"removing {p} left by an interrupted prepare")
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)


def _swap_in(tmp: str, out: str) -> None:
    if os.path.lexists(out):
        if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
            os.rmdir(out)
        else:
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
            return
    os.replace(tmp, out)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare(
    kind: str,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    shard_size: int,
    labels: Sequence[str],
    vocab_path: str | os.PathLike | None,
    min_files: int,
    heldout_fraction: float,
    seed: int,
    overwrite: bool,
    require_labels: bool,
    progress: bool,
) -> PrepareResult:
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    labels = [str(c) for c in labels]
    if shard_size < 1:
        raise ScldmError(f"--shard-size {shard_size}: must be >= 1")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ScldmError(f"--heldout-fraction {heldout_fraction}: must be in [0, 1)")
    if min_files < 1:
        raise ScldmError(f"--min-files {min_files}: must be >= 1")
    if vocab_path and min_files != 1:
        raise ScldmError("--min-files applies to a vocabulary built from the inputs; drop it or drop --vocab")
    bad = [c for c in labels if c in RESERVED_OBS]
    if bad:
        raise ScldmError(f"--labels: '{bad[0]}' is written by prepare itself; remove it from --labels")
    if len(set(labels)) != len(labels):
        raise ScldmError(f"--labels {labels}: a column is listed twice; list each once")
    paths = _expand_inputs(inputs, out)
    vocab = GeneVocab.load(vocab_path) if vocab_path else None
    options = {
        "shard_size": shard_size if kind == "h5ad" else None,
        "labels": labels,
        "vocab_sha256": _file_sha256(os.fspath(vocab_path)) if vocab_path else None,
        "min_files": min_files,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "require_labels": require_labels,
    }
    fingerprint, fp_inputs = _fingerprint(kind, paths, options)
    state, old_meta = _existing(out, "metadata.json", fingerprint)
    report = _Reporter(progress)
    if state == "up_to_date":
        return PrepareResult(out, old_meta, up_to_date=True)
    if state != "absent" and not overwrite:
        what = {
            "other": "holds other data or a prepare output of other inputs/options",
            "incomplete": "is a prepare output with missing files",
        }[state]
        raise ScldmError(f"{out}: already exists and {what}; pass --overwrite to replace it, or choose another OUT")
    _remove_stale(out, report)

    tmp = f"{out}.tmp-{os.getpid()}"
    report.start()
    try:
        scan = _scan(paths, labels, require_labels, report)
        plan = _plan(scan, vocab, min_files, labels, heldout_fraction, seed, report)
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        sizes = _shard_sizes(plan.n_train, shard_size)
        writer = _ShardWriter(tmp, sizes, plan.var) if kind == "h5ad" else _SomaWriter(tmp, plan.n_train, plan)
        heldout = _HeldoutWriter(tmp, plan.var)
        task = report.task("harmonizing", plan.n_train + plan.n_heldout)
        train_start, heldout_start = 0, plan.n_train
        dropped: dict[str, int] = {}
        try:
            for pos, fi in enumerate(scan.files):
                report.advance(task, 0, description=f"harmonizing {fi.name}")
                x, obs, x_held, obs_held, n_dropped = _harmonize_file(fi, pos, plan, train_start, heldout_start)
                report.info(
                    f"{fi.path}: kept {fi.n_vars - n_dropped} of {fi.n_vars} genes ({n_dropped} not in the vocabulary)"
                )
                dropped[fi.name] = n_dropped
                if x.shape[0]:
                    writer.add(x, obs)
                if x_held is not None:
                    heldout.add(x_held, obs_held)
                train_start += x.shape[0]
                heldout_start += 0 if x_held is None else x_held.shape[0]
                del x, obs, x_held, obs_held
                report.advance(task, fi.n_obs)
            writer.close()
        finally:
            if kind == "soma":
                writer.close()
        heldout_file = heldout.close()
        plan.vocab.save(os.path.join(tmp, "vocab.json"))
        plan.labels.save(os.path.join(tmp, "labels.json"))
        g = len(plan.vocab)
        categories = plan.labels.categories
        meta: dict[str, Any] = {
            "format": H5AD_FORMAT if kind == "h5ad" else SOMA_FORMAT,
            "format_version": FORMAT_VERSION,
            "generator": "scldm_scale.data.harmonize",
            "n_cells": plan.n_train,  # training cells (shards / experiment)
            "n_heldout": plan.n_heldout,
            "n_cells_total": plan.n_train + plan.n_heldout,
            "n_genes": g,
            "gene_id_space": plan.space,
            "label_columns": labels,
            "label_categories": categories,
            "heldout": {"file": heldout_file, "n_cells": heldout.n} if heldout_file else None,
            "vocab": "vocab.json",
            "labels": "labels.json",
            "seed": seed,
            "sparsity": 1.0 - writer.nnz / float(max(1, plan.n_train * g)),
            "nnz": int(writer.nnz),
            "inputs": [
                {
                    **fp,
                    "mtime": fp["mtime_ns"] / 1e9,
                    "source_file": fi.name,
                    "n_cells": fi.n_obs,
                    "n_heldout": fi.n_heldout,
                    "n_genes": fi.n_vars,
                    "n_genes_kept": fi.n_vars - dropped[fi.name],
                    "n_genes_dropped": dropped[fi.name],
                    "missing_label_columns": fi.missing_labels,
                }
                for fp, fi in zip(fp_inputs, scan.files)
            ],
            "options": options,
            "fingerprint": fingerprint,
        }
        if kind == "h5ad":
            meta["n_shards"] = len(sizes)
            meta["shards"] = [{"file": f, "n_cells": k} for f, k in zip(writer.files, sizes)]
            meta["shard_sizes"] = sizes
        else:
            meta["shards"] = []
            meta["soma"] = {"experiment": ".", "measurement": MEASUREMENT, "X_layer": X_LAYER,
                            "obs_id": "obs_id", "var_id": "var_id"}
        write_json_atomic(os.path.join(tmp, "metadata.json"), meta)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        report.stop()
    return PrepareResult(out, meta)


def prepare_h5ad(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    shard_size: int = 10_000,
    labels: Sequence[str] = ("cell_type",),
    vocab_path: str | os.PathLike | None = None,
    min_files: int = 1,
    heldout_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    require_labels: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Harmonize h5ad ``inputs`` into cellarium-ready shards at ``out``.

    Layout (as :func:`scldm_scale.data.synthetic.write_synthetic_atlas`)::

        OUT/shard_0000.h5ad ...  shard_size cells each (the last may be smaller); X CSR int32 with
                                 the vocabulary's columns, var = vocabulary ids (+ gene_symbol),
                                 obs = label columns (full category tables), cell_index, source_file
        OUT/heldout.h5ad         held-out cells (only with heldout_fraction > 0)
        OUT/vocab.json           the gene vocabulary (GeneVocab)
        OUT/labels.json          one category table per label column, each with 'unknown' (LabelTables)
        OUT/metadata.json        counts, shard list, label categories, inputs (size, mtime, genes
                                 kept/dropped), options and the fingerprint (written last)

    ``vocab_path`` fixes the vocabulary (an existing ``vocab.json``); otherwise it is the sorted
    union of the inputs' ids present in >= ``min_files`` inputs. Returns a :class:`PrepareResult`
    (``up_to_date=True`` when ``out`` already holds this exact output).
    """
    return _prepare(
        "h5ad", inputs, out, shard_size=shard_size, labels=labels, vocab_path=vocab_path, min_files=min_files,
        heldout_fraction=heldout_fraction, seed=seed, overwrite=overwrite, require_labels=require_labels,
        progress=progress,
    )


def prepare_soma(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str] = ("cell_type",),
    vocab_path: str | os.PathLike | None = None,
    min_files: int = 1,
    heldout_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    require_labels: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Harmonize h5ad ``inputs`` into one TileDB-SOMA experiment at ``out``.

    ``OUT`` itself is the experiment (``tiledbsoma.Experiment.open(OUT)``); the json files
    sit in the same folder, beside the TileDB members (TileDB ignores files that are not
    group members), so ``data.path=OUT`` finds ``vocab.json`` / ``labels.json`` as for shards::

        OUT/obs                  soma_joinid == cell_index (0..n_cells-1); obs_id = "<input stem>:<obs name>";
                                 label columns (enumerations = the full label tables), cell_index,
                                 source_file (enumeration of the input names)
        OUT/ms/RNA/var           soma_joinid == vocabulary index; var_id = vocabulary ids (+ gene_symbol)
        OUT/ms/RNA/X/data        sparse int32 raw counts, shape (n_cells, n_genes)
        OUT/vocab.json  OUT/labels.json  OUT/metadata.json (format scldm-scale/soma-experiment)
        OUT/heldout.h5ad         held-out cells as h5ad (only with heldout_fraction > 0)

    The experiment is written input by input into ``<OUT>.tmp-<pid>`` and renamed at the end.
    """
    return _prepare(
        "soma", inputs, out, shard_size=1, labels=labels, vocab_path=vocab_path, min_files=min_files,
        heldout_fraction=heldout_fraction, seed=seed, overwrite=overwrite, require_labels=require_labels,
        progress=progress,
    )
