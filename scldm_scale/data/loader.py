"""Dataset dispatch, the resumable loader wrapper, and the sharding helpers both sources share.

Sharding contract (h5ad and latent sources alike): an epoch is a seeded order of cells, cut
to equal counts per rank (``drop_last``), strided over ranks (cell ``i`` of the order goes to
rank ``i % world``), then cut into full batches of ``batch_size``. Batch ``j`` of a rank is
served by dataloader worker ``(j - start) % num_workers`` where ``start`` is the number of
batches already consumed this epoch. PyTorch's DataLoader polls workers round-robin, so the
loader yields batches ``start, start + 1, ...`` in order whatever the number of workers,
which is what makes ``StatefulLoader`` resume exactly (also with a different worker count).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from scldm_scale.data.config import DataConfig, SourceKind
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

# ---------------------------------------------------------------------------------------------
# sharding helpers


def dist_rank_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def worker_id_and_count() -> tuple[int, int]:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_batch_ids(n_batches: int, start: int, worker_id: int, num_workers: int) -> range:
    """Rank-local batch indices served by one dataloader worker after skipping ``start`` batches."""
    return range(start + worker_id, n_batches, num_workers)


def batch_rng(seed: int, epoch: int, global_batch: int) -> np.random.Generator:
    """Per-batch generator: reproducible and independent of worker count and resume point."""
    return np.random.default_rng([seed % (1 << 63), epoch, global_batch, 0x70C])


class RankAware:
    """Mixin: rank/world from torch.distributed, remembered for spawn-started workers."""

    _rank_world: tuple[int, int] = (0, 1)

    def _refresh_rank_world(self) -> tuple[int, int]:
        live = dist_rank_world()
        if live is not None:
            self._rank_world = live
        return self._rank_world

    def _check_resume(self, state: dict[str, Any], batches_per_epoch: int, name: str) -> tuple[int, int]:
        try:
            epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        except (KeyError, TypeError, ValueError):
            raise ScldmError(
                f"{name}: data loader state {state!r} lacks integer 'epoch' / 'batches_consumed'; "
                "the checkpoint is not from this version"
            ) from None
        if not 0 <= consumed <= batches_per_epoch or epoch < 0:
            raise ScldmError(
                f"{name}: checkpoint data position (epoch {epoch}, {consumed} batches) does not fit "
                f"{batches_per_epoch} batches per epoch; resume with the same world size and data.batch_size"
            )
        return epoch, consumed


# ---------------------------------------------------------------------------------------------
# construction


def build_dataset(cfg: DataConfig, vocab: GeneVocab | None, labels: LabelTables | None, validate: bool = True):
    """The dataset of ``cfg.source``: h5ad token batches (stage 1) or cached latents (stage 2).

    ``validate=False`` skips the per-shard h5ad checks (when ``prepare`` already ran them).
    """
    source = SourceKind(cfg.source)
    if source == SourceKind.H5AD:
        from scldm_scale.data.h5ad_source import H5ADTokenDataset

        if vocab is None or labels is None:
            raise ScldmError("data.source=h5ad needs a gene vocabulary and label tables (run `scldm-scale prepare`)")
        return H5ADTokenDataset(cfg, vocab, labels, validate=validate)
    if source == SourceKind.LATENTS:
        from scldm_scale.data.latent_cache import LatentCacheDataset

        ds = LatentCacheDataset(cfg.path, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed)
        if labels is not None and ds.label_attributes != labels.attributes:
            raise ScldmError(
                f"{cfg.path}: latent cache label attributes {ds.label_attributes} differ from the label tables "
                f"{labels.attributes}; re-run `scldm-scale encode` with the same labels.json"
            )
        return ds
    raise ScldmError(f"data.source={cfg.source!r}: unknown source (choose one of {[s.value for s in SourceKind]})")


def data_dir(path: str) -> str:
    """Directory holding ``vocab.json`` / ``labels.json`` for a data path, glob or brace pattern."""
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        return p
    cut = min([p.find(c) for c in "*?[{" if c in p] or [len(p)])
    return os.path.dirname(p[:cut]) or "."


def load_vocab_and_labels(cfg: DataConfig) -> tuple[GeneVocab, LabelTables]:
    """Load the gene vocabulary and label tables (defaults: ``<data dir>/vocab.json`` / ``labels.json``)."""
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
# resumable loader


class StatefulLoader:
    """Endless iterator of batches over epochs that knows its exact position.

    Wraps the dataset in a ``DataLoader`` (``batch_size=None``: the dataset yields whole
    batches; non-persistent workers). ``state_dict()`` is the number of batches handed to the
    caller in the current epoch; ``load_state_dict()`` makes the next iteration skip exactly
    those, even with a different ``num_workers``. Workers use the platform's default start
    method (fork on Linux) unless ``multiprocessing_context`` is given; spawned workers work
    too but re-import torch and cellarium at every epoch.
    """

    def __init__(
        self, dataset, num_workers: int = 0, pin_memory: bool = False, multiprocessing_context: str | None = None
    ) -> None:
        if num_workers < 0:
            raise ScldmError(f"data.num_workers={num_workers}: must be >= 0")
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.epoch = 0
        self.batches_consumed = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        while True:
            n_batches = self.dataset.batches_per_epoch
            if n_batches == 0:
                raise ScldmError(
                    f"data.batch_size={getattr(self.dataset, 'batch_size', '?')}: no full batch per rank in an "
                    "epoch (too few cells for the batch size x world size); lower data.batch_size"
                )
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict({"epoch": self.epoch, "batches_consumed": self.batches_consumed})
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                pin_memory=self.pin_memory,
                multiprocessing_context=self.multiprocessing_context,
            )
            for batch in loader:
                self.batches_consumed += 1
                yield batch
            if self.batches_consumed != n_batches:
                raise RuntimeError(
                    f"data loader yielded {self.batches_consumed} of {n_batches} batches in epoch {self.epoch}"
                )
            self.epoch += 1
            self.batches_consumed = 0
