"""One interface for every data source: h5ad shards, TileDB-SOMA / Census, mixtures, latent cache.

:class:`Source` is what stages, the trainer, ``encode`` and the benchmarks call;
:func:`scldm_scale.data.loader.build_source` builds the right class from a ``data:`` config.

The training stream
-------------------
Every source defines, per epoch ``e``, a **global order** of its ``N`` selected cells (a
permutation seeded by ``(seed, e)``; how it is built - shard groups, SOMA chunks and shuffle
lanes, a plain permutation - is the source's business). The epochs are concatenated into one
endless stream of cells; a stream position ``p`` is cell ``p % N`` of epoch ``p // N``'s order.

A training step of ``W`` ranks with ``b`` cells each consumes the next ``W * b`` cells of the
stream: rank ``r`` takes the ``b`` consecutive cells at ``p + r * b`` (a *block*), and the position
moves on by ``W * b``. The last step of an epoch takes the first cells of the next epoch, so no
cell is dropped and every batch is full: stream positions ``[e * N, (e + 1) * N)`` are epoch
``e``'s cells, each exactly once. Block ``t`` of a rank's steps goes to dataloader worker
``t % num_workers``; PyTorch's DataLoader polls its workers round-robin, so blocks come out in
stream order whatever the number of workers.

The position (:meth:`Source.state_dict`) is the number of cells of the stream consumed, as
``{"epoch", "cells_consumed"}``; it does not depend on the number of ranks or workers, so a run
resumed on ``W'`` ranks or with other workers continues with exactly the cells not yet seen
(sources whose order is built from batch-sized units - SOMA lanes, mixture draws - also need the
same ``data.batch_size``, and say so). Every block is tokenized with a generator seeded by
``(seed, stream position of the block)``: the same cells give the same tokens after a resume.

The inference pass
------------------
:meth:`Source.inference_batches` visits every selected cell once, in the source's natural order
(shard rows, ``soma_joinid``, cache rows; no shuffling, no dropped cells): rank ``r`` of ``W`` takes
the contiguous range :func:`inference_range` and cuts it into batches (the last one may be
smaller; ranks differ by at most one cell, and a rank may have no cell when ``N < W``).
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import IterableDataset

from scldm_scale import comm
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.tokenize import pad_token_batch
from scldm_scale.data.validate import HELDOUT_NAME
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)

TRAIN_KEY = 0  # Block.key[0] of training blocks (key[1] = stream position)
INFERENCE_KEY = 1  # Block.key[0] of inference-pass batches (key[1] = first selection position)


@runtime_checkable
class Source(Protocol):
    """What every data source provides (h5ad shards, SOMA / Census, mixture, latent cache)."""

    vocab: GeneVocab | None  # gene vocabulary of token batches (None for the latent cache)
    labels: LabelTables | None  # label tables the label codes refer to
    batch_size: int  # cells per rank per training batch

    @property
    def n_cells(self) -> int:
        """Selected cells (what the inference pass visits)."""

    @property
    def cells_per_epoch(self) -> int:
        """Cells of the training stream per epoch (``n_cells``; a mixture's draw plan may differ)."""

    def describe(self) -> str:
        """The data, as named in error messages."""

    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]:
        """Mean and std of log total counts over a sample of up to ``max_cells`` cells."""

    def batches(self, num_workers: int = 0, pin_memory: bool = False,
                pad: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches of this rank from the current position; the position advances
        by one step (``world * batch_size`` cells) with every batch handed out. Token batches are
        padded (``tokenize.TOKEN_KEYS``), or packed with ``pad=False`` (``tokenize.COMPACT_KEYS``)."""

    def state_dict(self) -> dict[str, Any]:
        """The position: ``epoch``, ``cells_consumed`` (plus ``cells_per_epoch``, ``batch_size`` and the
        ``world_size`` it was taken at, for checks and inspection)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a position taken on any number of ranks or workers."""

    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Rank ``rank``'s share of one pass over every selected cell (see the module docstring)."""

    def inference_cells(self, rank: int, world: int) -> int:
        """How many cells :meth:`inference_batches` gives rank ``rank`` (for progress bars)."""


class Block(NamedTuple):
    """Cells to read as one batch: ``positions`` in the source's selection, ``key`` seeds the tokenizer."""

    key: tuple[int, int]
    positions: np.ndarray


# ---------------------------------------------------------------------------------------------
# helpers


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialized."""
    return comm.rank(), comm.world_size()


def worker_id_and_count() -> tuple[int, int]:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def block_rng(seed: int, key: tuple[int, int]) -> np.random.Generator:
    """Generator of one block: reproducible, independent of ranks, workers and resume point."""
    return np.random.default_rng([seed % (1 << 63), key[0], key[1], 0x70C])


def inference_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share ``[lo, hi)`` of ``n`` cells for ``rank`` of ``world`` (sizes differ by at most 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ScldmError(f"inference pass: rank {rank} of world size {world} is out of range")
    return rank * n // world, (rank + 1) * n // world


def batch_ranges(lo: int, hi: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` cut into consecutive ranges of ``batch_size`` (the last one may be shorter)."""
    if batch_size < 1:
        raise ScldmError(f"batch size {batch_size}: must be >= 1")
    for a in range(lo, hi, batch_size):
        yield a, min(a + batch_size, hi)


def log_library_stats(totals_n: np.ndarray) -> tuple[float, float]:
    """Mean and std (at least 0.1) of ``log(max(total, 1))``; ``(0, 1)`` for no cells."""
    log_n = np.log(np.maximum(np.asarray(totals_n, dtype=np.float64), 1.0))
    if not len(log_n):
        return 0.0, 1.0
    return float(log_n.mean()), float(max(log_n.std(), 0.1))


def heldout_beside(path: str) -> Path:
    """``heldout.h5ad`` beside the training data (``data.path``: a folder, a glob or a brace pattern)."""
    return Path(data_dir(path)) / HELDOUT_NAME


def data_dir(path: str) -> str:
    """Directory holding ``vocab.json`` / ``labels.json`` for a data path, glob or brace pattern."""
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        return p
    cut = min([p.find(c) for c in "*?[{" if c in p] or [len(p)])
    return os.path.dirname(p[:cut]) or "."


def prepared_tables(cfg) -> tuple[GeneVocab, LabelTables]:
    """``data.vocab_path`` / ``data.labels_path`` when set, else ``vocab.json`` / ``labels.json`` of the
    data directory (written by ``prepare``)."""
    base = data_dir(cfg.path) if cfg.path else "."
    vocab_path = cfg.vocab_path or os.path.join(base, "vocab.json")
    labels_path = cfg.labels_path or os.path.join(base, "labels.json")
    for p, what, key in ((vocab_path, "gene vocabulary", "vocab_path"), (labels_path, "label tables", "labels_path")):
        if not os.path.isfile(p):
            raise ScldmError(
                f"{p}: {what} not found; run `scldm-scale prepare` on the data to create it, or set data.{key}"
            )
    return GeneVocab.load(vocab_path), LabelTables.load(labels_path)


# ---------------------------------------------------------------------------------------------
# base class of the stream sources


class _WorkerStream(IterableDataset):
    """The blocks one rank reads, ``first + t * step`` for ``t = 0, 1, ...``, split over dataloader workers."""

    def __init__(self, source: StreamSource, first: int, step: int, n: int, compact: bool) -> None:
        self.source, self.first, self.step, self.n, self.compact = source, first, step, n, compact

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = worker_id_and_count()
        starts = (self.first + t * self.step for t in itertools.count(worker, n_workers))
        return self.source.read_stream(starts, self.n, self.compact)


class StreamSource(ABC):
    """Shared machinery of every :class:`Source`: the stream, its position, workers and resume.

    A subclass sets ``batch_size``, ``seed``, ``vocab``, ``labels`` and implements ``n_cells``,
    :meth:`describe`, :meth:`epoch_positions` (its epoch order), :meth:`read_blocks` (cells ->
    batches), :meth:`inference_batches` and :meth:`library_size_stats`; a mixture replaces
    :meth:`read_stream` instead of the epoch order.
    """

    vocab: GeneVocab | None = None
    labels: LabelTables | None = None
    batch_size: int = 1
    seed: int = 0
    token_batches: bool = True  # batches are token dicts (workers send them compact, see tokenize.COMPACT_KEYS)
    order_uses_batch_size: bool = False  # the epoch order is built from batch-sized units
    _position: int = 0  # stream cells consumed

    # -- what a source defines -----------------------------------------------------------------

    @property
    @abstractmethod
    def n_cells(self) -> int: ...

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]: ...

    @abstractmethod
    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]: ...

    def epoch_positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """Selection positions of cells ``[lo, hi)`` of epoch ``epoch``'s global order."""
        raise NotImplementedError(f"{type(self).__name__} defines no epoch order")

    def read_blocks(self, blocks: Iterable[Block], compact: bool) -> Iterator[dict]:
        """One batch per block, in order (``compact``: token batches in tokenize's compact form)."""
        raise NotImplementedError(f"{type(self).__name__} reads no blocks")

    # -- stream --------------------------------------------------------------------------------

    @property
    def cells_per_epoch(self) -> int:
        return self.n_cells

    def inference_cells(self, rank: int, world: int) -> int:
        lo, hi = inference_range(self.n_cells, rank, world)
        return hi - lo

    def stream_positions(self, start: int, n: int) -> np.ndarray:
        """Selection positions of stream cells ``[start, start + n)`` (across epoch boundaries)."""
        per_epoch = self.n_cells
        parts, p, end = [], int(start), int(start) + int(n)
        while p < end:
            epoch, q = divmod(p, per_epoch)
            hi = min(per_epoch, q + end - p)
            parts.append(np.asarray(self.epoch_positions(epoch, q, hi), dtype=np.int64))
            p += hi - q
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def read_stream(self, starts: Iterable[int], n: int, compact: bool) -> Iterator[dict]:
        """Batches of the ``n`` stream cells at each of ``starts`` (in order; ``starts`` may be endless)."""
        return self.read_blocks((Block((TRAIN_KEY, int(s)), self.stream_positions(s, n)) for s in starts), compact)

    def batches(self, num_workers: int = 0, pin_memory: bool = False,
                pad: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches of this rank (see the module docstring); workers are started here.
        Workers always hand over packed token batches (a fraction of the bytes); ``pad`` pads them here."""
        from torch.utils.data import DataLoader

        if num_workers < 0:
            raise ScldmError(f"data.num_workers={num_workers}: must be >= 0")
        rank, world = dist_rank_world()
        b = self.batch_size
        step = world * b
        if step > self.cells_per_epoch:
            raise ScldmError(
                f"{self.describe()}: data.batch_size={b} x {world} ranks = {step} cells per step exceeds the "
                f"{self.cells_per_epoch} cells of an epoch; lower data.batch_size"
            )
        compact = (num_workers > 0 or not pad) and self.token_batches
        stream = _WorkerStream(self, self._position + rank * b, step, b, compact)
        if num_workers == 0:
            batches: Iterable[dict] = iter(stream)
        else:
            batches = DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        for batch in batches:
            if pad and "length_n" in batch:
                batch = pad_token_batch(batch)
            if pin_memory:  # page-locked, for the non-blocking copy to the GPU
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self._position += step
            yield batch

    # -- position ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        per_epoch = self.cells_per_epoch
        return {
            "epoch": self._position // per_epoch,
            "cells_consumed": self._position % per_epoch,
            "cells_per_epoch": per_epoch,
            "batch_size": self.batch_size,
            "world_size": dist_rank_world()[1],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        per_epoch, name = self.cells_per_epoch, self.describe()
        try:
            epoch = int(state["epoch"])
            if "cells_consumed" in state:
                cells = int(state["cells_consumed"])
                saved_per_epoch = int(state.get("cells_per_epoch", per_epoch))
                saved_batch = int(state.get("batch_size", self.batch_size))
            else:  # positions of earlier versions: batches per rank of a world-size-dependent order
                world = int(state.get("world_size", 1))
                cells = int(state["batches_consumed"]) * self.batch_size * world
                saved_per_epoch, saved_batch = per_epoch, self.batch_size
                log.warning(
                    "%s: data position from an earlier version (%d batches of %d ranks); continuing after the same "
                    "number of cells of the new epoch order", name, int(state["batches_consumed"]), world,
                )
        except (KeyError, TypeError, ValueError):
            raise ScldmError(
                f"{name}: data loader state {dict(state)!r} lacks integer 'epoch' / 'cells_consumed'; "
                "the checkpoint is not from this version"
            ) from None
        if saved_per_epoch != per_epoch:
            raise ScldmError(
                f"{name}: the checkpoint's epoch has {saved_per_epoch} cells but the data now has {per_epoch}; "
                "resume with the data the run started with (same path, filter and sources)"
            )
        if self.order_uses_batch_size and saved_batch != self.batch_size:
            raise ScldmError(
                f"{name}: the checkpoint was taken at data.batch_size={saved_batch} and this source's epoch order "
                f"is built from batches; resume with data.batch_size={saved_batch}"
            )
        if epoch < 0 or not 0 <= cells <= per_epoch:
            raise ScldmError(
                f"{name}: checkpoint data position (epoch {epoch}, {cells} cells) does not fit an epoch of "
                f"{per_epoch} cells; resume with the data the run started with"
            )
        self._position = epoch * per_epoch + cells
