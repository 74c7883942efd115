"""The plan of ``prepare``, from a first pass that reads only var and obs of every input (h5py +
anndata's element reader; no count matrix is loaded): where each file keeps its counts, the gene
vocabulary, the label tables, which cells are held out and the global order of the training cells.

Vocabulary. In Ensembl ids when any input (or ``--vocab``) has them, else in symbols (see
:mod:`scldm_scale.data.gene_ids`); without ``--vocab`` it is the union of the inputs' ids present
in >= ``min_files`` inputs, **sorted**, so it does not depend on the order of the inputs. In
Ensembl space the vocabulary keeps one symbol per id (the first seen, e.g. from ``feature_name``).

Labels. For every label column the table is the sorted union of the values seen in the inputs,
plus ``unknown``; missing values and a column missing from an input map to ``unknown`` (a warning
line; an error with ``require_labels``). A column that no input has is an error naming the columns
that exist (almost always a typo).

Cells. Held-out cells are drawn per input (each cell independently with probability
``heldout_fraction``, from ``seed`` and the input's position). The training cells, numbered in
input order, get their output positions from one permutation seeded by ``seed``: position ``i``
is row ``i`` of the concatenated output shards (and its ``cell_index``), so consecutive cells -
any shard, any chunk of SOMA joinids - mix all input files. The permutation takes 4 bytes per
training cell (8 above 2**31 cells).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scldm_scale.data.gene_ids import (
    ENSEMBL_MIN_FRACTION,
    GeneIds,
    add_pairs,
    check_unique,
    clean,
    ensembl_fraction,
    file_keys,
    gene_ids,
    one_to_one,
    strip_version,
    vocab_map,
)
from scldm_scale.data.inputs import Counts, find_counts, matrix_shape, open_h5, read_elem
from scldm_scale.data.labels import UNKNOWN, LabelTables
from scldm_scale.data.reporter import Reporter
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError


@dataclass
class FileInfo:
    path: str
    name: str  # source_file value
    stem: str  # obs name prefix
    counts: Counts  # where the raw counts are
    n_obs: int
    n_vars: int  # genes of the counts matrix
    has_ensembl: bool
    has_symbol: bool
    missing_labels: list[str]
    n_kept: int = 0
    n_heldout: int = 0


@dataclass
class Scan:
    files: list[FileInfo]
    label_values: dict[str, set[str]]
    ens_to_sym: dict[str, dict[str, None]] = field(default_factory=dict)  # ordered symbol lists
    sym_to_ens: dict[str, dict[str, None]] = field(default_factory=dict)


@dataclass
class Plan:
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
    train_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # per input, in input order
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # input training cell -> position
    files: list[FileInfo] = field(default_factory=list)

    def positions(self, file_pos: int) -> np.ndarray:
        """Output positions of input ``file_pos``'s training cells, in the input's order."""
        return self.order[self.train_offsets[file_pos] : self.train_offsets[file_pos + 1]]

    def heldout_start(self, file_pos: int) -> int:
        """``cell_index`` of input ``file_pos``'s first held-out cell (held-out cells follow in input order)."""
        return self.n_train + sum(fi.n_heldout for fi in self.files[:file_pos])


def source_names(paths: list[str]) -> list[str]:
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):
        root = os.path.commonpath(paths)
        names = [os.path.relpath(p, root) for p in paths]
    return names


def _stem(name: str) -> str:
    return name[: -len(".h5ad")] if name.endswith(".h5ad") else name


def label_strings(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as str, missing mask) of an obs column of any dtype."""
    s = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
    missing = s.isna().to_numpy()
    return s.astype(str).to_numpy(dtype=object), missing


def heldout_mask(seed: int, file_pos: int, n: int, fraction: float) -> np.ndarray:
    if fraction <= 0.0:
        return np.zeros(n, dtype=bool)
    return np.random.default_rng([seed, 0x4E1D, file_pos]).random(n) < fraction


def read_var_ids(path: str, counts: Counts) -> GeneIds:
    """Gene ids of the genes of ``path``'s counts matrix (``var``, or ``raw/var`` for ``.raw.X``)."""
    f = open_h5(path)
    try:
        var = read_elem(f, counts.var, path)
    finally:
        f.close()
    return gene_ids(var)


def scan_inputs(
    paths: list[str], labels: Sequence[str], require_labels: bool, counts_spec: str, report: Reporter
) -> Scan:
    """Pass 1: shapes, counts location, gene ids and label values of every input."""
    names = source_names(paths)
    scan = Scan(files=[], label_values={c: set() for c in labels})
    obs_columns: dict[str, None] = {}
    task = report.task("reading var/obs", len(paths))
    for path, name in zip(paths, names):
        f = open_h5(path)
        try:
            counts, why = find_counts(f, path, counts_spec)
            n_obs, n_vars = matrix_shape(f, counts.matrix, path)
            var = read_elem(f, counts.var, path)
            obs = read_elem(f, "obs", path)
            main_var = read_elem(f, "var", path) if counts.var != "var" else None
        finally:
            f.close()
        report.info(f"{path}: counts from {counts.label} ({why})")
        if len(var) != n_vars or len(obs) != n_obs:
            raise ScldmError(
                f"{path}: {counts.label} is {n_obs} x {n_vars} but obs has {len(obs)} rows and {counts.var} "
                f"{len(var)}; the file is corrupt or truncated; re-create or re-download it"
            )
        if n_obs == 0 or n_vars == 0:
            raise ScldmError(
                f"{path}: h5ad file is empty ({n_obs} cells x {n_vars} genes); drop it from the inputs or refill it"
            )
        ids = gene_ids(var)
        if ids.ensembl is None and ids.symbol is None:
            raise ScldmError(
                f"{path}: no gene ids found in {counts.var} (index and columns {list(var.columns)[:10]} are empty); "
                "put Ensembl ids or gene symbols in var_names"
            )
        add_pairs(ids, scan.ens_to_sym, scan.sym_to_ens)
        if main_var is not None:  # .raw.X: symbols may sit only in var (e.g. feature_name)
            add_pairs(gene_ids(main_var), scan.ens_to_sym, scan.sym_to_ens)
        obs_columns.update(dict.fromkeys(str(c) for c in obs.columns))
        missing = [c for c in labels if c not in obs.columns]
        if missing and require_labels:
            raise ScldmError(
                f"{path}: obs column '{missing[0]}' is missing (columns: {list(obs.columns)[:20]}); add it, "
                f"drop it from --labels, or leave out --require-labels to label these cells '{UNKNOWN}'"
            )
        for col in labels:
            if col not in missing:
                values, miss = label_strings(obs[col])
                scan.label_values[col].update(pd.unique(values[~miss]).tolist())
        scan.files.append(
            FileInfo(path, name, _stem(name), counts, n_obs, n_vars, ids.ensembl is not None, ids.symbol is not None,
                     missing)
        )
        del var, obs, main_var
        report.advance(task)
    for col in labels:
        if all(col in fi.missing_labels for fi in scan.files):
            known = list(obs_columns)
            close = difflib.get_close_matches(col, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ScldmError(
                f"--labels {col}: no input has obs column '{col}' (obs columns of the inputs: {known[:30]}); "
                f"{hint}fix --labels"
            )
    for fi in scan.files:
        for col in fi.missing_labels:
            report.warn(f"{fi.path}: obs column '{col}' is missing; its {fi.n_obs} cells are labelled '{UNKNOWN}'")
    return scan


def make_plan(
    scan: Scan,
    vocab: GeneVocab | None,
    min_files: int,
    labels: Sequence[str],
    heldout_fraction: float,
    seed: int,
    report: Reporter,
) -> Plan:
    """Vocabulary, label tables, held-out cells and the global order (see the module docstring)."""
    files = scan.files
    if vocab is not None:
        space = "ensembl" if ensembl_fraction(clean(vocab.gene_ids)) >= ENSEMBL_MIN_FRACTION else "symbol"
    else:
        space = "ensembl" if any(fi.has_ensembl for fi in files) else "symbol"
    sym_to_ens = one_to_one(scan.sym_to_ens, scan.ens_to_sym)
    ens_to_sym = one_to_one(scan.ens_to_sym, scan.sym_to_ens)

    task = report.task("building the gene vocabulary", 2 * len(files))
    if vocab is None:
        n_files_of: dict[str, int] = {}
        for fi in files:
            keys, source = file_keys(read_var_ids(fi.path, fi.counts), space, sym_to_ens, ens_to_sym)
            check_unique(keys, source, fi.path)
            for k in keys:
                if k is not None:
                    n_files_of[k] = n_files_of.get(k, 0) + 1
            report.advance(task)
        ids = sorted(k for k, n in n_files_of.items() if n >= min_files)
        if not ids:
            raise ScldmError(
                f"--min-files {min_files}: no gene is present in {min_files} or more of the {len(files)} inputs; "
                "lower --min-files"
            )
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        version = f"prepare-{digest}"
        vocab_index = pd.Index(ids)
    else:
        normalized = strip_version(clean(vocab.gene_ids)) if space == "ensembl" else clean(vocab.gene_ids)
        vocab_index = pd.Index(normalized)
        if not vocab_index.is_unique:
            dups = vocab_index[vocab_index.duplicated()].unique().tolist()
            raise ScldmError(
                f"--vocab: ids {dups[:3]} occur more than once once Ensembl versions are dropped; "
                "keep one version per gene"
            )
        ids, version = vocab.gene_ids, vocab.version
        report.advance(task, len(files))

    n_train = n_heldout = 0
    for pos, fi in enumerate(files):
        file_ids = read_var_ids(fi.path, fi.counts)
        keys, source = file_keys(file_ids, space, sym_to_ens, ens_to_sym)
        check_unique(keys, source, fi.path)
        fi.n_kept = int((vocab_map(keys, vocab_index) >= 0).sum())
        if fi.n_kept == 0:
            shown = [k for k in keys if k is not None][:3]
            if not shown:  # nothing could be translated: show the file's own ids
                own = next(v for v in (file_ids.symbol, file_ids.ensembl) if v is not None)
                shown = [k for k in own if k is not None][:3]
            raise ScldmError(
                f"{fi.path}: none of its {fi.n_vars} genes are in the gene vocabulary (ids from {source}, e.g. "
                f"{shown} vs {list(vocab_index[:3])}); use Ensembl ids or symbols matching the other inputs / "
                "--vocab, or drop the file"
            )
        fi.n_heldout = int(heldout_mask(seed, pos, fi.n_obs, heldout_fraction).sum())
        n_heldout += fi.n_heldout
        n_train += fi.n_obs - fi.n_heldout
        report.advance(task)
    if n_train == 0:
        raise ScldmError(
            f"--heldout-fraction {heldout_fraction}: every cell was held out, none is left for training; lower it"
        )

    symbols = None
    var = pd.DataFrame(index=pd.Index(list(ids)))
    if space == "ensembl":
        symbols = [next(iter(scan.ens_to_sym.get(g, {"": None}))) for g in vocab_index]
        if any(symbols):
            var["gene_symbol"] = pd.Series(symbols, index=var.index, dtype=object)
        else:
            symbols = None
    if vocab is None or (symbols is not None and vocab.symbols is None):
        vocab = GeneVocab(ids, version=version, symbols=symbols)
    categories = {c: sorted(scan.label_values[c]) for c in labels}
    train_offsets = np.concatenate([[0], np.cumsum([fi.n_obs - fi.n_heldout for fi in files])]).astype(np.int64)
    order = np.arange(n_train, dtype=np.int32 if n_train < np.iinfo(np.int32).max else np.int64)
    np.random.default_rng([seed, 0x0D3E]).shuffle(order)
    return Plan(
        space=space, vocab=vocab, vocab_index=vocab_index, sym_to_ens=sym_to_ens, ens_to_sym=ens_to_sym,
        labels=LabelTables(categories), label_columns=list(labels), source_names=[fi.name for fi in files],
        var=var, heldout_fraction=heldout_fraction, seed=seed, n_train=n_train, n_heldout=n_heldout,
        train_offsets=train_offsets, order=order, files=files,
    )
