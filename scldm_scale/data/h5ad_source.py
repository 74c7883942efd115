"""Token batches from h5ad shards through cellarium-ml's DistributedAnnDataCollection."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from scldm_scale.data.config import DataConfig
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.loader import RankAware, batch_rng, worker_batch_ids, worker_id_and_count
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.validate import check_h5ad_shards, resolve_shards
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)


def _keep(x):
    """AnnDataField converter that returns the value untouched (sparse X, categorical obs)."""
    return x


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


class H5ADTokenDataset(RankAware, IterableDataset):
    """Iterable of token batches over h5ad shards, sharded by rank and dataloader worker.

    cellarium-ml's ``DistributedAnnDataCollection`` (LRU cache of ``cfg.max_cache_size``
    shards per worker) reads the cells and its ``IterableDistributedAnnDataCollectionDataset``
    (``same_order``, ``drop_last_indices``, ``drop_incomplete_batch``) defines the epoch order
    and materializes each batch (X kept sparse). The per-worker batch assignment with resume
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
        unknown_cols = [c for c in cfg.label_columns if c not in labels.attributes]
        if unknown_cols:
            raise ScldmError(
                f"data.label_columns: {unknown_cols} have no label table (tables: {labels.attributes}); "
                "re-run `scldm-scale prepare` with these columns or remove them"
            )
        self.files = resolve_shards(cfg.path)
        if validate:
            check_h5ad_shards(self.files, cfg.label_columns)
        sizes = shard_sizes(self.files, check=validate)
        self.limits = np.cumsum(sizes).astype(np.int64)
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.labels = labels
        self.label_columns = list(cfg.label_columns)
        self.dadc = DistributedAnnDataCollection(
            self.files,
            limits=self.limits.tolist(),
            max_cache_size=cfg.max_cache_size,
            obs_columns_to_validate=self.label_columns,
        )
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
        self.epoch = 0
        self._start = 0
        self._yielded = 0
        self._refresh_rank_world()

    @property
    def n_cells(self) -> int:
        return int(self.limits[-1])

    @property
    def batches_per_epoch(self) -> int:
        _, world = self._refresh_rank_world()
        return (self.n_cells // world) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)
        self._yielded = 0
        self.inner.set_epoch(self.epoch)
        self._refresh_rank_world()

    def state_dict(self) -> dict[str, int]:
        """Position in this process: exact when iterated directly; with workers use StatefulLoader."""
        return {"epoch": self.epoch, "batches_consumed": self._start + self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, consumed = self._check_resume(state, self.batches_per_epoch, self.cfg.path)
        self.epoch, self._start, self._yielded = epoch, consumed, 0
        self.inner.set_epoch(epoch)

    def rank_indices(self, epoch: int, rank: int, world: int) -> np.ndarray:
        """Global cell rows of one rank for one epoch, in order (cellarium ``same_order``)."""
        import torch

        inner = self.inner
        start, end = inner.start_idx, inner.end_idx
        if inner.shuffle:
            gen = torch.Generator()
            gen.manual_seed(inner.shuffle_seed + epoch)
            limits = [int(i) for i in self.dadc.limits if start < i < end]
            bounds = list(zip([start] + limits, limits + [end]))
            parts = []
            for k in torch.randperm(len(bounds), generator=gen).tolist():
                lo, hi = bounds[k]
                parts.append(torch.randperm(hi - lo, generator=gen).numpy() + lo)
            order = np.concatenate(parts).astype(np.int64)
        else:
            order = np.arange(start, end, dtype=np.int64)
        per_rank = (end - start) // world
        return order[: per_rank * world][rank::world]

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._refresh_rank_world()
        worker_id, num_workers = worker_id_and_count()
        epoch, b = self.epoch, self.batch_size
        idx_n = self.rank_indices(epoch, rank, world)
        n_batches = len(idx_n) // b
        self._yielded = 0
        for j in worker_batch_ids(n_batches, self._start, worker_id, num_workers):
            rows = idx_n[j * b : (j + 1) * b]
            shard_ids = np.unique(np.searchsorted(self.limits, rows, side="right"))
            n_shards = len(shard_ids)
            if n_shards > self.cfg.max_cache_size:
                raise ScldmError(
                    f"data.max_cache_size={self.cfg.max_cache_size}: a batch of {b} cells x {world} ranks spans "
                    f"{n_shards} shards of {self.cfg.path}; raise data.max_cache_size to {n_shards} or use larger shards"
                )
            data = self.inner[rows]
            labels_na = np.empty((len(rows), len(self.labels.attributes)), dtype=np.int64)
            for a, attr in enumerate(self.labels.attributes):
                if attr in self.label_columns:
                    labels_na[:, a] = self.labels.encode(attr, data[f"obs/{attr}"])
                else:
                    labels_na[:, a] = self.labels.unknown_code(attr)
            cell_index_n = np.asarray(data["cell_index_n"]) if self.has_cell_index else rows
            batch = tokenize_counts(
                data["x_ng"],
                self.var_to_vocab_g,
                labels_na,
                self.cfg.max_genes,
                batch_rng(self.cfg.seed, epoch, j * world + rank),
                cell_index_n=cell_index_n,
                where=" + ".join(self.files[k] for k in shard_ids),
            )
            self._yielded += 1
            yield batch
