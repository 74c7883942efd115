"""Token batches from h5ad shards through cellarium-ml's DistributedAnnDataCollection.

Epoch order (global, see :mod:`scldm_scale.data.source`): the shards are permuted (seeded by
``(seed, epoch)``) and taken ``data.shards_per_batch`` at a time; the cells of each group of
shards are permuted together. Consecutive cells of the order, hence every batch, are drawn
uniformly from the shards of one group (two at a group boundary), so a batch mixes
``shards_per_batch`` shards while a dataloader worker holds at most ``2 * shards_per_batch``
shards in memory. With ``shards_per_batch=1`` this is cellarium's ``same_order`` iteration
(shards shuffled, cells shuffled within a shard). Shards written by ``scldm-scale prepare`` are
already in a global random order across the input files, so any group mixes all studies.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import types
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
import torch

from scldm_scale.data.config import DataConfig
from scldm_scale.data.inputs import open_h5, read_elem, read_matrix_rows
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.source import (
    INFERENCE_KEY,
    Block,
    StreamSource,
    batch_ranges,
    block_rng,
    inference_range,
    log_library_stats,
    prepared_tables,
)
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.validate import check_h5ad_shards, resolve_shards
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)


_CELLARIUM_LOCK = threading.Lock()


def cellarium_data():
    """cellarium-ml's data package (``cellarium.ml.data``), imported without running
    ``cellarium/ml/__init__.py`` first.

    That ``__init__`` imports cellarium's training stack (``cellarium.ml.core``: Lightning,
    torchmetrics), about 5 s per process, and the data package needs none of it: every rank and
    every command that reads h5ad shards would pay it at start-up. When ``cellarium.ml`` is not
    imported yet, it is registered as its package module with its ``__init__`` deferred (see
    :func:`_deferred_package`); its submodules import as usual. When it is already imported, this
    is a plain import.
    """
    with _CELLARIUM_LOCK:
        if "cellarium.ml" not in sys.modules:
            try:
                spec = importlib.util.find_spec("cellarium.ml")
            except ModuleNotFoundError:
                spec = None
            if spec is None or spec.loader is None:
                raise ScldmError("cellarium-ml is not installed (needed to read h5ad shards); install this "
                                 "package with its dependencies: pip install scldm-scale")
            package = _deferred_package(spec)
            sys.modules["cellarium.ml"] = package
            setattr(sys.modules["cellarium"], "ml", package)
    return importlib.import_module("cellarium.ml.data")


def _deferred_package(spec) -> types.ModuleType:
    """The package module of ``spec`` whose ``__init__`` runs the first time a name it does not hold
    is looked up (PEP 562 module ``__getattr__``): ``from cellarium.ml import CellariumModule``
    works as usual, a few seconds later. Concurrent lookups wait for that one run; a failed run
    raises its error and is tried again at the next lookup."""
    package = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"done": False, "running": False}

    def run_init(name: str):
        with lock:
            if not state["done"] and not state["running"]:  # running: a lookup from the __init__ itself
                state["running"] = True
                try:
                    spec.loader.exec_module(package)
                    state["done"] = True
                    package.__dict__.pop("__getattr__", None)
                finally:
                    state["running"] = False
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}") from None

    package.__getattr__ = run_init
    return package


def _keep(x):
    """AnnDataField converter that returns the value untouched (sparse X, categorical obs)."""
    return x


@contextlib.contextmanager
def _positional_cell_names():
    """Build cellarium's ``DistributedAnnDataCollection`` without a per-cell index.

    While it is built, cellarium's ``LazyAnnData`` names every cell ``f"cell_{i}"`` for the
    collection's ``obs_names`` index (anndata's ``AnnCollection`` concatenates them and checks
    them for uniqueness): a Python string per cell, about 70 bytes per cell in every process and
    most of the construction time at millions of cells. This source addresses cells by position
    only, so inside this block the shards report no cell names, and ``H5ADSource`` sets the
    collection's index to one ``RangeIndex`` right after (the collection's shape comes from its
    ``limits``, not from the names). Outside construction ``LazyAnnData.obs_names`` is cellarium's own.
    """
    module = cellarium_data().distributed_anndata

    lazy_cls = getattr(module, "LazyAnnData", None)
    original = lazy_cls.__dict__.get("obs_names") if lazy_cls is not None else None
    mode = getattr(module, "_GETATTR_MODE", None)
    if not isinstance(original, property) or mode is None:  # another cellarium version: build as it does
        yield
        return

    def obs_names(self):
        return pd.RangeIndex(0) if mode.lazy else original.fget(self)

    lazy_cls.obs_names = property(obs_names)
    try:
        yield
    finally:
        lazy_cls.obs_names = original


def _h5ad_n_obs(path: str) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            x = f["X"]
            return int(x.attrs["shape"][0]) if isinstance(x, h5py.Group) else int(x.shape[0])
    except Exception as e:
        raise ScldmError(
            f"{path}: cannot read the number of cells ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ) from None


def shard_sizes(files: list[str], check: bool = True) -> list[int]:
    """Cells per shard: from ``metadata.json`` beside the shards when its ``shards`` list
    (``[{"file": "shard_0000.h5ad", "n_cells": 1000}, ...]``) names them all, else read from
    the files (``check=True`` reads them anyway and cross-checks the metadata)."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(files[0])), "metadata.json")
    sizes: list[int] | None = None
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            by_name = {s["file"]: int(s["n_cells"]) for s in meta.get("shards", [])}
            if all(os.path.basename(f) in by_name for f in files):
                sizes = [by_name[os.path.basename(f)] for f in files]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: ignoring unreadable shard list (%s); reading shard sizes from the files", meta_path, e)
    if sizes is None or check:
        read = [_h5ad_n_obs(f) for f in files]
        if sizes is not None and sizes != read:
            bad = next(i for i, (a, b) in enumerate(zip(sizes, read)) if a != b)
            raise ScldmError(
                f"{meta_path}: says {files[bad]} has {sizes[bad]} cells but it has {read[bad]}; "
                "re-run `scldm-scale prepare` or delete metadata.json"
            )
        sizes = read
    return sizes


class H5ADSource(StreamSource):
    """Token batches over h5ad shards (see the module docstring for the epoch order).

    cellarium-ml's ``DistributedAnnDataCollection`` (LRU cache of ``max(data.max_cache_size,
    2 * data.shards_per_batch)`` shards per dataloader worker) loads the shards; :meth:`read_rows`
    takes each batch's rows from the cached shards (X kept sparse; the same values as cellarium's
    ``AnnDataField`` batch). The inference pass reads row ranges straight from the files (memory
    bounded by the batch).
    """

    def __init__(self, cfg: DataConfig, vocab: GeneVocab, labels: LabelTables, validate: bool = True) -> None:
        DistributedAnnDataCollection = cellarium_data().DistributedAnnDataCollection

        if cfg.max_cache_size < 2:
            raise ScldmError(f"data.max_cache_size={cfg.max_cache_size}: must be >= 2 (a batch may span two shards)")
        if cfg.batch_size < 1:
            raise ScldmError(f"data.batch_size={cfg.batch_size}: must be >= 1")
        if cfg.shards_per_batch < 1:
            raise ScldmError(f"data.shards_per_batch={cfg.shards_per_batch}: must be >= 1")
        labels.check_columns(cfg.label_columns)
        self.files = resolve_shards(cfg.path)
        if validate:
            check_h5ad_shards(self.files, cfg.label_columns)
        sizes = shard_sizes(self.files, check=validate)
        self.limits = np.cumsum(sizes).astype(np.int64)
        self.cfg = cfg
        self.vocab, self.labels = vocab, labels
        self.batch_size, self.seed, self.shuffle = int(cfg.batch_size), int(cfg.seed), bool(cfg.shuffle)
        self.shards_per_batch = min(int(cfg.shards_per_batch), len(self.files))
        self.label_columns = list(cfg.label_columns)
        with _positional_cell_names():
            self.dadc = DistributedAnnDataCollection(
                self.files,
                limits=self.limits.tolist(),
                max_cache_size=max(int(cfg.max_cache_size), 2 * self.shards_per_batch),
                obs_columns_to_validate=self.label_columns,
            )
        # cells are addressed by position only: no per-cell index is kept
        self.dadc.obs_names = pd.RangeIndex(self.n_cells)
        self.dadc._obs = pd.DataFrame(index=self.dadc.obs_names)
        self.has_cell_index = "cell_index" in self.dadc.schema.attr_values["obs"].columns
        var_names = self.dadc.schema.attr_values["var_names"]
        self.var_to_vocab_g = vocab.index_map(var_names)
        n_out = int((self.var_to_vocab_g < 0).sum())
        if n_out == len(var_names):
            raise ScldmError(
                f"{self.files[0]}: none of the {len(var_names)} var_names are in the gene vocabulary "
                f"(e.g. {list(var_names[:3])} vs {vocab.gene_ids[:3]}); use the vocabulary of this data "
                "(data.vocab_path) or re-run `scldm-scale prepare`"
            )
        if n_out:
            log.info("%d of %d genes of %s are outside the vocabulary and dropped", n_out, len(var_names), cfg.path)
        self._orders: dict = {}  # small caches of the epoch plan (per process)

    @classmethod
    def read_tables(cls, cfg: DataConfig) -> tuple[GeneVocab, LabelTables]:
        """``data.vocab_path`` / ``data.labels_path``, else ``vocab.json`` / ``labels.json`` beside the shards
        (a ``data.path`` that does not exist is named as such)."""
        path = os.path.expanduser(str(cfg.path))
        if not any(c in path for c in "*?[{") and not os.path.exists(path):
            resolve_shards(path)  # raises, naming the path
        return prepared_tables(cfg)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    @property
    def n_cells(self) -> int:
        return int(self.limits[-1])

    def describe(self) -> str:
        return str(self.cfg.path)

    def _shard_bounds(self, k: int) -> tuple[int, int]:
        return (int(self.limits[k - 1]) if k else 0), int(self.limits[k])

    # -- epoch order ---------------------------------------------------------------------------

    def shard_groups(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards of epoch ``epoch`` in order and the epoch-order offset where each group of
        ``shards_per_batch`` of them starts (plus the end)."""
        key = ("groups", epoch)
        if key not in self._orders:
            n_shards, p = len(self.files), self.shards_per_batch
            order = np.arange(n_shards)
            if self.shuffle:
                order = np.random.default_rng([self.seed % (1 << 63), epoch, 0x5AD]).permutation(n_shards)
            sizes = np.diff(np.concatenate([[0], self.limits]))[order]
            group_sizes = np.add.reduceat(sizes, np.arange(0, n_shards, p))
            self._orders = {k: v for k, v in self._orders.items() if k[0] != "groups"}
            self._orders[key] = (order, np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64))
        return self._orders[key]

    def _group_rows(self, epoch: int, g: int) -> np.ndarray:
        key = ("rows", epoch, g)
        if key not in self._orders:
            order, _ = self.shard_groups(epoch)
            shards = order[g * self.shards_per_batch : (g + 1) * self.shards_per_batch]
            rows = np.concatenate([np.arange(*self._shard_bounds(int(k)), dtype=np.int64) for k in shards])
            rng = np.random.default_rng([self.seed % (1 << 63), epoch, g, 0x6A0])
            rows = rows[rng.permutation(len(rows))]
            cached = [k for k in self._orders if k[0] == "rows"]
            for old in cached[: max(0, len(cached) - 3)]:  # keep the last few groups (blocks straddle groups)
                del self._orders[old]
            self._orders[key] = rows
        return self._orders[key]

    def epoch_positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        _, starts = self.shard_groups(epoch)
        parts = []
        g = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            g_lo, g_hi = int(starts[g]), int(starts[g + 1])
            take = min(hi, g_hi)
            parts.append(self._group_rows(epoch, g)[lo - g_lo : take - g_lo])
            lo, g = take, g + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- reading -------------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, list[int]]:
        """X rows, label codes (n, attributes) and cell ids of the global cell rows ``rows``, in that order,
        and the shards they come from.

        The shards are the in-memory AnnData objects of cellarium's ``DistributedAnnDataCollection``
        (its LRU cache; cached shards are touched first, as cellarium's ``materialize`` does, so
        loading a shard never evicts one the batch needs). The values are those of cellarium's
        ``AnnDataField`` batch, without building an AnnData view and concatenation per batch.
        """
        shard_n = np.searchsorted(self.limits, rows, side="right")
        shard_ids = np.unique(shard_n).tolist()
        if len(shard_ids) > self.dadc.max_cache_size:
            raise ScldmError(
                f"data.max_cache_size={self.cfg.max_cache_size}: a batch of {len(rows)} cells spans "
                f"{len(shard_ids)} shards of {self.cfg.path}; raise data.max_cache_size to {len(shard_ids)} "
                "or use larger shards"
            )
        lazy = self.dadc.adatas
        attrs = self.labels.attributes
        labels_na = np.empty((len(rows), len(attrs)), dtype=np.int64)
        cell_index_n = np.array(rows, dtype=np.int64)
        blocks, positions = [], []
        for k in sorted(shard_ids, key=lambda k: not lazy[k].cached):
            pos = np.flatnonzero(shard_n == k)
            local = rows[pos] - self._shard_bounds(k)[0]
            adata = lazy[k].adata
            blocks.append(adata.X[local])
            positions.append(pos)
            for a, attr in enumerate(attrs):
                if attr in self.label_columns:
                    labels_na[pos, a] = self.labels.encode(attr, adata.obs[attr].values[local])
                else:
                    labels_na[pos, a] = self.labels.unknown_code(attr)
            if self.has_cell_index:
                cell_index_n[pos] = np.asarray(adata.obs["cell_index"].values[local])
        if len(blocks) == 1:
            x = blocks[0]
        else:  # stacked shard by shard, then back to the order of `rows`
            x = scipy.sparse.vstack([scipy.sparse.csr_matrix(b) for b in blocks], format="csr")
            order = np.concatenate(positions)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            x = x[inverse]
        return x, labels_na, cell_index_n, shard_ids

    def _tokens(self, x, labels_na, cell_index_n, shard_ids, key, compact: bool) -> dict[str, torch.Tensor]:
        return tokenize_counts(
            x,
            self.var_to_vocab_g,
            labels_na,
            self.cfg.max_genes,
            block_rng(self.seed, key),
            cell_index_n=cell_index_n,
            where=" + ".join(self.files[k] for k in shard_ids),
            pad=not compact,
        )

    def read_blocks(self, blocks: Iterable[Block], compact: bool) -> Iterator[dict]:
        for block in blocks:
            yield self._tokens(*self.read_rows(block.positions), block.key, compact)

    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        lo, hi = inference_range(self.n_cells, rank, world)
        reader = _RowRangeReader(self)
        try:
            for a, b in batch_ranges(lo, hi, batch_size):
                yield self._tokens(*reader.read(a, b), (INFERENCE_KEY, a), False)
        finally:
            reader.close()

    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]:
        """Over the first ``max_cells`` cells of the first shard (prepared shards are a random sample)."""
        reader = _RowRangeReader(self)
        try:
            x = reader.read(0, max(1, min(int(max_cells), self._shard_bounds(0)[1])))[0]
        finally:
            reader.close()
        return log_library_stats(np.asarray(x.sum(axis=1), dtype=np.float64).ravel())


class _RowRangeReader:
    """Consecutive global row ranges read straight from the shard files (h5py), one file open at a time;
    each shard's label codes and cell ids (a few bytes per cell) are read when the shard is opened."""

    def __init__(self, source: H5ADSource) -> None:
        self.source = source
        self.k: int | None = None
        self.file = None
        self.codes_na = self.cell_index_n = None

    def _open(self, k: int) -> None:
        self.close()
        src, path = self.source, self.source.files[k]
        self.file = open_h5(path)
        self.k = k
        lo, hi = src._shard_bounds(k)
        attrs = src.labels.attributes
        self.codes_na = np.empty((hi - lo, len(attrs)), dtype=np.int64)
        for a, attr in enumerate(attrs):
            if attr in src.label_columns:
                self.codes_na[:, a] = src.labels.encode(attr, read_elem(self.file, f"obs/{attr}", path))
            else:
                self.codes_na[:, a] = src.labels.unknown_code(attr)
        if src.has_cell_index:
            self.cell_index_n = np.asarray(read_elem(self.file, "obs/cell_index", path), dtype=np.int64)
        else:
            self.cell_index_n = np.arange(lo, hi, dtype=np.int64)

    def read(self, a: int, b: int):
        """``(x, labels_na, cell_index_n, shard ids)`` of global rows ``[a, b)`` (``a < b``)."""
        src = self.source
        xs, codes, ids, shards = [], [], [], []
        while a < b:
            k = int(np.searchsorted(src.limits, a, side="right"))
            if self.k != k:
                self._open(k)
            lo, hi = src._shard_bounds(k)
            take = min(b, hi)
            xs.append(read_matrix_rows(self.file["X"], a - lo, take - lo))
            codes.append(self.codes_na[a - lo : take - lo])
            ids.append(self.cell_index_n[a - lo : take - lo])
            shards.append(k)
            a = take
        x = xs[0] if len(xs) == 1 else scipy.sparse.vstack(xs, format="csr")
        return x, np.concatenate(codes), np.concatenate(ids), shards

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file, self.k = None, None
