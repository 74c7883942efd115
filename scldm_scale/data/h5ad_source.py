"""Token batches from h5ad shards through cellarium-ml's DistributedAnnDataCollection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
from torch.utils.data import IterableDataset

from scldm_scale.data.config import DataConfig
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.loader import ShardedSource, batch_rng
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.validate import check_h5ad_shards, resolve_shards
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)


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
    only, so inside this block the shards report no cell names, and ``H5ADTokenDataset`` sets the
    collection's index to one ``RangeIndex`` right after (the collection's shape comes from its
    ``limits``, not from the names). Outside construction ``LazyAnnData.obs_names`` is cellarium's own.
    """
    from cellarium.ml.data import distributed_anndata as module

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


class H5ADTokenDataset(ShardedSource, IterableDataset):
    """Iterable of token batches over h5ad shards, sharded by rank and dataloader worker.

    cellarium-ml's ``DistributedAnnDataCollection`` (LRU cache of ``cfg.max_cache_size``
    shards per worker) loads the shards and its ``IterableDistributedAnnDataCollectionDataset``
    (``same_order``, ``drop_last_indices``, ``drop_incomplete_batch``) defines the epoch order;
    :meth:`read_rows` takes each batch's rows from the cached shards (X kept sparse; the same
    values as cellarium's ``AnnDataField`` batch). The per-worker batch assignment with resume
    offset is done here (see :mod:`scldm_scale.data.loader`) so that a resumed epoch continues
    exactly, for any number of workers. Every batch is tokenized with a generator seeded by
    ``(seed, epoch, global batch index)``.
    """

    def __init__(self, cfg: DataConfig, vocab: GeneVocab, labels: LabelTables, validate: bool = True) -> None:
        from cellarium.ml.data import DistributedAnnDataCollection, IterableDistributedAnnDataCollectionDataset
        from cellarium.ml.utilities.data import AnnDataField

        if cfg.max_cache_size < 2:
            raise ScldmError(f"data.max_cache_size={cfg.max_cache_size}: must be >= 2 (a batch may span two shards)")
        if cfg.batch_size < 1:
            raise ScldmError(f"data.batch_size={cfg.batch_size}: must be >= 1")
        labels.check_columns(cfg.label_columns)
        self.files = resolve_shards(cfg.path)
        if validate:
            check_h5ad_shards(self.files, cfg.label_columns)
        sizes = shard_sizes(self.files, check=validate)
        self.limits = np.cumsum(sizes).astype(np.int64)
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.labels = labels
        self.label_columns = list(cfg.label_columns)
        with _positional_cell_names():
            self.dadc = DistributedAnnDataCollection(
                self.files,
                limits=self.limits.tolist(),
                max_cache_size=cfg.max_cache_size,
                obs_columns_to_validate=self.label_columns,
            )
        # cells are addressed by position only: no per-cell index is kept
        self.dadc.obs_names = pd.RangeIndex(self.n_cells)
        self.dadc._obs = pd.DataFrame(index=self.dadc.obs_names)
        obs_cols = list(self.dadc.schema.attr_values["obs"].columns)
        self.has_cell_index = "cell_index" in obs_cols
        batch_keys: dict[str, Any] = {"x_ng": AnnDataField(attr="X", convert_fn=_keep)}
        for col in self.label_columns:
            batch_keys[f"obs/{col}"] = AnnDataField(attr="obs", key=col, convert_fn=_keep)
        if self.has_cell_index:
            batch_keys["cell_index_n"] = AnnDataField(attr="obs", key="cell_index")
        self.inner = IterableDistributedAnnDataCollectionDataset(
            self.dadc,
            batch_keys=batch_keys,
            batch_size=cfg.batch_size,
            iteration_strategy="same_order",
            shuffle=cfg.shuffle,
            shuffle_seed=cfg.seed,
            drop_last_indices=True,
            drop_incomplete_batch=True,
        )
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
        self._refresh_rank_world()

    @property
    def n_cells(self) -> int:
        return int(self.limits[-1])

    @property
    def batches_per_epoch(self) -> int:
        _, world = self._refresh_rank_world()
        return (self.n_cells // world) // self.batch_size

    def describe(self) -> str:
        return str(self.cfg.path)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(self.epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.inner.set_epoch(self.epoch)

    def rank_indices(self, epoch: int, rank: int, world: int) -> np.ndarray:
        """Global cell rows of one rank for one epoch, in order (cellarium ``same_order``)."""
        import torch

        inner = self.inner
        start, end = inner.start_idx, inner.end_idx
        dtype = np.int32 if end <= np.iinfo(np.int32).max else np.int64  # 4 bytes per cell where they suffice
        if inner.shuffle:
            gen = torch.Generator()
            gen.manual_seed(inner.shuffle_seed + epoch)
            limits = [int(i) for i in self.dadc.limits if start < i < end]
            bounds = list(zip([start] + limits, limits + [end]))
            parts = []
            for k in torch.randperm(len(bounds), generator=gen).tolist():
                lo, hi = bounds[k]
                parts.append((torch.randperm(hi - lo, generator=gen).numpy() + lo).astype(dtype))
            order = np.concatenate(parts)
        else:
            order = np.arange(start, end, dtype=dtype)
        per_rank = (end - start) // world
        return order[: per_rank * world][rank::world]

    def read_rows(self, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, list[int]]:
        """X rows, label codes (n, attributes) and cell ids of the global cell rows ``rows``, in that order,
        and the shards they come from.

        The shards are the in-memory AnnData objects of cellarium's ``DistributedAnnDataCollection``
        (its LRU cache of ``max_cache_size`` shards; cached shards are touched first, as cellarium's
        ``materialize`` does, so loading a shard never evicts one the batch needs). The values are
        those of cellarium's ``AnnDataField`` batch ``self.inner[rows]``, without building an
        AnnData view and concatenation per batch.
        """
        shard_n = np.searchsorted(self.limits, rows, side="right")
        shard_ids = np.unique(shard_n).tolist()
        if len(shard_ids) > self.cfg.max_cache_size:
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
            local = rows[pos] - (int(self.limits[k - 1]) if k else 0)
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

    def token_batch(self, idx_n: np.ndarray, epoch: int, j: int, rank: int, world: int) -> dict:
        """Token batch ``j`` of a rank's epoch order ``idx_n`` (:meth:`rank_indices`)."""
        b = self.batch_size
        x, labels_na, cell_index_n, shard_ids = self.read_rows(idx_n[j * b : (j + 1) * b])
        return tokenize_counts(
            x,
            self.var_to_vocab_g,
            labels_na,
            self.cfg.max_genes,
            batch_rng(self.cfg.seed, epoch, j * world + rank),
            cell_index_n=cell_index_n,
            where=" + ".join(self.files[k] for k in shard_ids),
            pad=not self.compact_batches,
        )

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._refresh_rank_world()
        epoch = self.epoch
        idx_n = self.rank_indices(epoch, rank, world)
        ids = self.my_batch_ids(len(idx_n) // self.batch_size)
        yield from self.counted(self.token_batch(idx_n, epoch, j, rank, world) for j in ids)
