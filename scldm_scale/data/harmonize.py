"""Harmonizing ``prepare``: h5ad files with different genes, obs columns, categories and count
layouts -> cellarium-ready h5ad shards (:func:`prepare_h5ad`) or one TileDB-SOMA experiment
(:func:`prepare_soma`) with one gene vocabulary and one category table per label.

Passes. Pass 1 (:mod:`scldm_scale.data.prepare_plan`) reads var and obs of every input and plans
the vocabulary, labels, held-out cells and the **global order**: a seeded permutation of all
training cells across the inputs, so every shard (and every chunk of SOMA joinids) mixes all
input files. Pass 2 reads one input at a time (its counts from ``X``, ``.raw.X`` or a layer,
``--counts``), validates them (finite non-negative integers), remaps its genes to the vocabulary
and scatters its cells to their output rows (:class:`~scldm_scale.data.writers.ShardScatter`,
one temp file); the shards (or SOMA blocks) are then assembled one at a time. Memory is bounded
by one input file plus one output shard (and 4 bytes per cell for the order).

Atomicity and idempotency. Everything is written into ``<OUT>.tmp-<pid>`` and renamed onto
``OUT`` at the end (``metadata.json`` last), so an interrupted run leaves only the temp folder,
which the next run removes. ``metadata.json`` holds a ``fingerprint`` of the input paths, sizes,
mtimes and the options: re-running with the same fingerprint does nothing ("up to date"); an
``OUT`` with another fingerprint is replaced only with ``overwrite``. The same inputs and options
give the same cells in the same places.

Cell ids. ``cell_index`` is the output row: the training cells are ``0..n-1`` in the shards'
order (the SOMA ``soma_joinid``); held-out cells (``heldout_fraction``) follow after them, in
input order. The obs index is ``"<input stem>:<obs name>"`` (duplicate obs names made unique);
``source_file`` names the input.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from scldm_scale.data.gene_ids import file_keys, gene_ids, vocab_map
from scldm_scale.data.inputs import AUTO_LAYER, matrix_shape, open_h5, parse_counts, read_elem
from scldm_scale.data.labels import UNKNOWN
from scldm_scale.data.prepare_plan import FileInfo, Plan, heldout_mask, label_strings, make_plan, scan_inputs
from scldm_scale.data.reporter import Reporter
from scldm_scale.data.validate import HELDOUT_NAME, check_counts
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.data.writers import (
    FORMAT,
    MEASUREMENT,
    SOMA_FORMAT,
    X_LAYER,
    PreparedWriter,
    ShardScatter,
    SomaWriter,
    remove_stale,
    shard_files,
    shard_sizes,
)
from scldm_scale.errors import ScldmError
from scldm_scale.io import atomic_dir

HARMONIZE_VERSION = 2  # bump when the output of the same inputs and options changes
RESERVED_OBS = ("cell_index", "source_file")
SOMA_BLOCK_CELLS = 10_000  # cells per SOMA write (one fragment each, in joinid order)
_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class PrepareResult:
    """What :func:`prepare_h5ad` / :func:`prepare_soma` did: ``up_to_date`` when nothing was written."""

    out: str
    meta: dict[str, Any]
    up_to_date: bool = False


# ---------------------------------------------------------------------------------------------
# pass 2: one input


@dataclass
class HarmonizedFile:
    """One input's cells in the vocabulary's columns (CSR int32) with their label codes and names."""

    x: scipy.sparse.csr_matrix
    codes_nc: np.ndarray  # (cells, label columns + 1): label codes, then the source_file code
    names: np.ndarray  # "<stem>:<obs name>"
    held: np.ndarray  # held-out mask
    n_dropped: int  # genes outside the vocabulary


def harmonize_file(fi: FileInfo, pos: int, plan: Plan) -> HarmonizedFile:
    """Read one input's counts and obs and express them in the plan's vocabulary and label tables."""
    path, counts = fi.path, fi.counts
    f = open_h5(path)
    try:
        shape = matrix_shape(f, counts.matrix, path)
        x = read_elem(f, counts.matrix, path)
        obs = read_elem(f, "obs", path)
        var = read_elem(f, counts.var, path)
    finally:
        f.close()
    if shape != (fi.n_obs, fi.n_vars) or len(obs) != fi.n_obs:
        raise ScldmError(f"{path}: changed while prepare was reading it (shape {shape}); re-run prepare")
    keys, _ = file_keys(gene_ids(var), plan.space, plan.sym_to_ens, plan.ens_to_sym)
    var_to_vocab = vocab_map(keys, plan.vocab_index)

    fix = (f"store raw integer counts in {counts.label} or point --counts at them "
           f"(--counts X, raw or layer:NAME; --counts auto looks at X, .raw.X and layers['{AUTO_LAYER}'])")
    x = scipy.sparse.csr_matrix(np.asarray(x)) if not scipy.sparse.issparse(x) else scipy.sparse.csr_matrix(x)
    check_counts(x, path, field=counts.label, fix=fix)
    if x.data.size and x.data.max() > _INT32_MAX:
        raise ScldmError(f"{path}: {counts.label} has counts above {_INT32_MAX} (max {x.data.max():g}); {fix}")
    keep = np.flatnonzero(var_to_vocab >= 0)
    if len(keep) < len(var_to_vocab):
        x = x[:, keep]
    data = x.data if np.issubdtype(x.data.dtype, np.integer) else np.rint(x.data)
    x = scipy.sparse.csr_matrix(
        (data.astype(np.int32, copy=False), var_to_vocab[keep][x.indices].astype(np.int32), x.indptr),
        shape=(fi.n_obs, len(plan.vocab)),
    )
    x.eliminate_zeros()
    x.sort_indices()

    codes_nc = np.empty((fi.n_obs, len(plan.label_columns) + 1), dtype=np.int32)
    for c, col in enumerate(plan.label_columns):
        if col in obs.columns:
            values, miss = label_strings(obs[col])
            values[miss] = UNKNOWN
        else:
            values = np.full(fi.n_obs, UNKNOWN, dtype=object)
        codes_nc[:, c] = plan.labels.encode(col, values)
    codes_nc[:, -1] = pos
    names = pd.Index([f"{fi.stem}:{n}" for n in obs.index.astype(str)])
    if not names.is_unique:
        from anndata.utils import make_index_unique

        names = make_index_unique(names)
    held = heldout_mask(plan.seed, pos, fi.n_obs, plan.heldout_fraction)
    return HarmonizedFile(x, codes_nc, np.asarray(names, dtype=object), held, fi.n_vars - len(keep))


def obs_frame(plan: Plan, codes_nc: np.ndarray, cell_index: np.ndarray, names: np.ndarray) -> pd.DataFrame:
    """Output obs: label columns (categoricals with the full tables), cell_index, source_file."""
    cols: dict[str, Any] = {}
    for c, col in enumerate(plan.label_columns):
        cols[col] = pd.Categorical.from_codes(codes_nc[:, c], categories=plan.labels.categories[col])
    cols["cell_index"] = np.asarray(cell_index, dtype=np.int64)
    cols["source_file"] = pd.Categorical.from_codes(codes_nc[:, -1], categories=plan.source_names)
    return pd.DataFrame(cols, index=pd.Index(names))


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


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_outputs(kind: str, tmp: str, plan: Plan, block_sizes: list[int], report: Reporter):
    """Pass 2: scatter every input's cells to their output rows, then assemble the blocks in order."""
    writer = PreparedWriter(tmp, plan.var)
    starts = np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int64)
    scatter = ShardScatter(os.path.join(tmp, "scatter.tmp.h5"), starts, len(plan.label_columns) + 1)
    dropped: dict[str, int] = {}
    soma = None
    try:
        task = report.task("reading inputs", plan.n_train + plan.n_heldout)
        for pos, fi in enumerate(plan.files):
            report.advance(task, 0, description=f"reading {fi.name}")
            h = harmonize_file(fi, pos, plan)
            report.info(f"{fi.path}: kept {fi.n_vars - h.n_dropped} of {fi.n_vars} genes "
                        f"({h.n_dropped} not in the vocabulary)")
            dropped[fi.name] = h.n_dropped
            if not h.held.any():
                scatter.add(plan.positions(pos), h.x, h.codes_nc, h.names)
            elif not h.held.all():
                train = np.flatnonzero(~h.held)
                scatter.add(plan.positions(pos), h.x[train], h.codes_nc[train], h.names[train])
            if h.held.any():
                held = np.flatnonzero(h.held)
                cell_index = plan.heldout_start(pos) + np.arange(len(held))
                writer.add_heldout(h.x[held], obs_frame(plan, h.codes_nc[held], cell_index, h.names[held]))
            del h
            report.advance(task, fi.n_obs)
        task = report.task("writing shards" if kind == "h5ad" else "writing the experiment", len(block_sizes))
        if kind == "soma":
            soma = SomaWriter(tmp, plan.n_train, plan.label_columns, plan.labels, plan.source_names, plan.vocab,
                              plan.var)
        names = shard_files(len(block_sizes))
        for k in range(len(block_sizes)):
            x, codes_nc, cell_names = scatter.block(k, len(plan.vocab))
            obs = obs_frame(plan, codes_nc, np.arange(starts[k], starts[k + 1]), cell_names)
            if soma is None:
                writer.write_shard(names[k], x, obs)
            else:
                soma.add(x, obs)
                writer.count(x.shape[0], x.nnz)
            report.advance(task)
    finally:
        scatter.close()
        if soma is not None:
            soma.close()
    return writer, dropped


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
    counts: str,
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
    counts = parse_counts(counts)
    paths = _expand_inputs(inputs, out)
    vocab = GeneVocab.load(vocab_path) if vocab_path else None
    options = {
        "shard_size": shard_size if kind == "h5ad" else None,
        "labels": labels,
        "vocab_sha256": _file_sha256(os.fspath(vocab_path)) if vocab_path else None,
        "min_files": min_files,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "counts": counts,
        "require_labels": require_labels,
    }
    fingerprint, fp_inputs = _fingerprint(kind, paths, options)
    state, old_meta = _existing(out, "metadata.json", fingerprint)
    report = Reporter(progress)
    if state == "up_to_date":
        return PrepareResult(out, old_meta, up_to_date=True)
    if state != "absent" and not overwrite:
        what = {
            "other": "holds other data or a prepare output of other inputs/options",
            "incomplete": "is a prepare output with missing files",
        }[state]
        raise ScldmError(f"{out}: already exists and {what}; pass --overwrite to replace it, or choose another OUT")
    remove_stale(out, report)

    report.start()
    try:
        with atomic_dir(out) as tmp_dir:
            tmp = str(tmp_dir)
            scan = scan_inputs(paths, labels, require_labels, counts, report)
            plan = make_plan(scan, vocab, min_files, labels, heldout_fraction, seed, report)
            block_sizes = shard_sizes(plan.n_train, shard_size if kind == "h5ad" else SOMA_BLOCK_CELLS)
            writer, dropped = _write_outputs(kind, tmp, plan, block_sizes, report)
            meta: dict[str, Any] = {
                "generator": "scldm_scale.data.harmonize",
                "gene_id_space": plan.space,
                "label_columns": labels,
                "label_categories": plan.labels.categories,
                "seed": seed,
                "order": {"kind": "global-random", "seed": seed},
                "inputs": [
                    {
                        **fp,
                        "mtime": fp["mtime_ns"] / 1e9,
                        "source_file": fi.name,
                        "counts_from": fi.counts.field,
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
            if kind == "soma":
                meta["soma"] = {"experiment": ".", "measurement": MEASUREMENT, "X_layer": X_LAYER,
                                "obs_id": "obs_id", "var_id": "var_id"}
            meta = writer.finish(plan.vocab, plan.labels, meta, fmt=FORMAT if kind == "h5ad" else SOMA_FORMAT)
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
    counts: str = "auto",
    overwrite: bool = False,
    require_labels: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Harmonize h5ad ``inputs`` into cellarium-ready shards at ``out``.

    Layout (:mod:`scldm_scale.data.writers`)::

        OUT/shard_0000.h5ad ...  shard_size cells each (the last may be smaller), in a seeded global random
                                 order across the inputs; X CSR int32 with the vocabulary's columns,
                                 var = vocabulary ids (+ gene_symbol), obs = label columns (full category
                                 tables), cell_index (= row), source_file
        OUT/heldout.h5ad         held-out cells (only with heldout_fraction > 0)
        OUT/vocab.json           the gene vocabulary (GeneVocab, with the symbols when known)
        OUT/labels.json          one category table per label column, each with 'unknown' (LabelTables)
        OUT/metadata.json        counts, shard list, label categories, inputs (size, mtime, counts field,
                                 genes kept/dropped), options and the fingerprint (written last)

    ``counts`` says where the raw counts are: ``auto`` (the first integer-valued of X, .raw.X,
    layers['counts']), ``X``, ``raw`` or ``layer:NAME``. ``vocab_path`` fixes the vocabulary (an
    existing ``vocab.json``); otherwise it is the sorted union of the inputs' ids present in
    >= ``min_files`` inputs. Returns a :class:`PrepareResult` (``up_to_date=True`` when ``out``
    already holds this exact output).
    """
    return _prepare(
        "h5ad", inputs, out, shard_size=shard_size, labels=labels, vocab_path=vocab_path, min_files=min_files,
        heldout_fraction=heldout_fraction, seed=seed, counts=counts, overwrite=overwrite,
        require_labels=require_labels, progress=progress,
    )


def prepare_soma(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    labels: Sequence[str] = ("cell_type",),
    vocab_path: str | os.PathLike | None = None,
    min_files: int = 1,
    heldout_fraction: float = 0.0,
    seed: int = 0,
    counts: str = "auto",
    overwrite: bool = False,
    require_labels: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Harmonize h5ad ``inputs`` into one TileDB-SOMA experiment at ``out``.

    ``OUT`` itself is the experiment (``tiledbsoma.Experiment.open(OUT)``); the json files
    sit in the same folder, beside the TileDB members (TileDB ignores files that are not
    group members), so ``data.path=OUT`` finds ``vocab.json`` / ``labels.json`` as for shards::

        OUT/obs                  soma_joinid == cell_index (0..n_cells-1, the same global random order as
                                 prepare_h5ad's rows); obs_id = "<input stem>:<obs name>"; label columns
                                 (enumerations = the full label tables), cell_index, source_file
        OUT/ms/RNA/var           soma_joinid == vocabulary index; var_id = vocabulary ids (+ gene_symbol)
        OUT/ms/RNA/X/data        sparse int32 raw counts, shape (n_cells, n_genes)
        OUT/vocab.json  OUT/labels.json  OUT/metadata.json (format scldm-scale/soma-experiment)
        OUT/heldout.h5ad         held-out cells as h5ad (only with heldout_fraction > 0)

    The experiment is written in joinid order, a block of cells per write, into
    ``<OUT>.tmp-<pid>`` and renamed at the end.
    """
    return _prepare(
        "soma", inputs, out, shard_size=1, labels=labels, vocab_path=vocab_path, min_files=min_files,
        heldout_fraction=heldout_fraction, seed=seed, counts=counts, overwrite=overwrite,
        require_labels=require_labels, progress=progress,
    )
