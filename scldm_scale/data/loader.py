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
from collections.abc import Iterable, Iterator
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


class ShardedSource:
    """Mixin of every batch source: rank / world from torch.distributed (remembered for
    spawn-started workers) and the position in the epoch that checkpoints hold.

    A source defines ``batches_per_epoch`` and ``describe()`` (names it in errors) and yields
    ``self.counted(...)`` over the batches of ``self.my_batch_ids(n_batches)``.
    """

    _rank_world: tuple[int, int] = (0, 1)
    # Token sources yield compact batches (tokenize.COMPACT_KEYS) when set; StatefulLoader sets it
    # for its dataloader workers and pads in the main process.
    compact_batches: bool = False
    epoch: int = 0
    _start: int = 0  # batches of this epoch consumed before this iteration started (resume point)
    _yielded: int = 0  # batches this process has yielded since

    def describe(self) -> str:
        return type(self).__name__

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)
        self._yielded = 0
        self._refresh_rank_world()

    def state_dict(self) -> dict[str, Any]:
        """Position in this process: exact when iterated directly; with workers use StatefulLoader."""
        return {"epoch": self.epoch, "batches_consumed": self._start + self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._start = self._check_resume(state, self.batches_per_epoch, self.describe())
        self._yielded = 0

    def my_batch_ids(self, n_batches: int) -> range:
        """Rank-local batch ids this process (dataloader worker) serves in the current epoch."""
        return worker_batch_ids(n_batches, self._start, *worker_id_and_count())

    def counted(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches``, counted into the position as they are handed out."""
        self._yielded = 0
        for batch in batches:
            self._yielded += 1
            yield batch

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
    """The dataset of ``cfg.source``: h5ad / SOMA / mixture token batches (stage 1) or cached latents (stage 2).

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
    if source == SourceKind.SOMA:
        from scldm_scale.data.soma_source import SomaTokenDataset

        if vocab is None or labels is None:
            raise ScldmError(
                "data.source=soma needs a gene vocabulary and label tables; set data.vocab_path and data.labels_path"
            )
        return SomaTokenDataset(cfg, vocab, labels)
    if source == SourceKind.MIXTURE:
        from scldm_scale.data.mixture import MixtureDataset

        return MixtureDataset(cfg, vocab, labels, validate=validate)
    raise ScldmError(f"data.source={cfg.source!r}: unknown source (choose one of {[s.value for s in SourceKind]})")


def check_count_sources(cfg: DataConfig) -> None:
    """Fail fast on the count data of a run: h5ad shards (also inside a mixture) are checked with
    :func:`~scldm_scale.data.validate.check_h5ad_shards`, a mixture's member list is checked; SOMA
    experiments are checked when opened (measurement, X layer, label columns, value filter)."""
    from scldm_scale.data.validate import check_h5ad_shards, resolve_shards

    source = SourceKind(cfg.source)
    if source == SourceKind.MIXTURE:
        from scldm_scale.data.mixture import member_configs

        for member, _ in member_configs(cfg):
            check_count_sources(member)
    elif source == SourceKind.H5AD:
        check_h5ad_shards(resolve_shards(cfg.path), list(cfg.label_columns))


def library_size_stats(cfg: DataConfig, max_cells: int = 4096) -> tuple[float, float]:
    """Mean and std of log total counts over a sample of the data (up to ``max_cells`` cells of the
    first h5ad shard or the first selected SOMA cells; a mixture uses its first source). Read the
    same way on every rank, so all ranks build the same model; the VAE predicts the standardized
    log library size (its head starts at the data mean instead of 0)."""
    source = SourceKind(cfg.source)
    if source == SourceKind.MIXTURE:
        from scldm_scale.data.mixture import member_configs

        return library_size_stats(member_configs(cfg)[0][0], max_cells)
    if source == SourceKind.SOMA:
        from scldm_scale.data.soma_source import experiment_library_sizes

        totals_n = experiment_library_sizes(cfg, max_cells)
    elif source == SourceKind.H5AD:
        import anndata

        from scldm_scale.data.validate import resolve_shards

        path = resolve_shards(cfg.path)[0]
        adata = anndata.read_h5ad(path, backed="r")
        try:
            totals_n = np.asarray(adata.X[: min(max_cells, adata.n_obs)].sum(axis=1), dtype=np.float64).ravel()
        finally:
            adata.file.close()
    else:
        raise ScldmError(f"data.source={cfg.source!r}: library sizes need count data (h5ad, soma or mixture)")
    log_n = np.log(np.maximum(totals_n, 1.0))
    if not len(log_n):
        return 0.0, 1.0
    return float(log_n.mean()), float(max(log_n.std(), 0.1))


def data_dir(path: str) -> str:
    """Directory holding ``vocab.json`` / ``labels.json`` for a data path, glob or brace pattern."""
    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        return p
    cut = min([p.find(c) for c in "*?[{" if c in p] or [len(p)])
    return os.path.dirname(p[:cut]) or "."


def load_vocab_and_labels(cfg: DataConfig) -> tuple[GeneVocab, LabelTables]:
    """The gene vocabulary and label tables of ``cfg``'s data.

    ``data.vocab_path`` / ``data.labels_path`` when set, else ``vocab.json`` / ``labels.json`` of
    the data directory (written by ``prepare``). A SOMA experiment without them (ingested by other
    tools, or the Census) gets them from the experiment itself
    (:func:`~scldm_scale.data.soma_source.experiment_vocab_and_labels`); a mixture uses those of
    its first source unless the paths are set.
    """
    source = SourceKind(cfg.source)
    if source == SourceKind.MIXTURE:
        from scldm_scale.data.mixture import member_configs

        return load_vocab_and_labels(member_configs(cfg)[0][0])  # members inherit vocab_path / labels_path
    paths = {"vocab_path": cfg.vocab_path, "labels_path": cfg.labels_path}
    if source == SourceKind.SOMA:
        local = os.path.expanduser(str(cfg.path))
        if not cfg.census_version and os.path.isdir(local):  # `prepare soma` writes them into the experiment
            for key, name in (("vocab_path", "vocab.json"), ("labels_path", "labels.json")):
                if not paths[key] and os.path.isfile(os.path.join(local, name)):
                    paths[key] = os.path.join(local, name)
        if not paths["vocab_path"] or not paths["labels_path"]:
            from scldm_scale.data.soma_source import experiment_vocab_and_labels

            vocab, labels = experiment_vocab_and_labels(
                cfg, want_vocab=not paths["vocab_path"], want_labels=not paths["labels_path"]
            )
            vocab = vocab if vocab is not None else GeneVocab.load(paths["vocab_path"])
            labels = labels if labels is not None else LabelTables.load(paths["labels_path"])
            return vocab, labels
    base = data_dir(cfg.path) if cfg.path else "."
    vocab_path = paths["vocab_path"] or os.path.join(base, "vocab.json")
    labels_path = paths["labels_path"] or os.path.join(base, "labels.json")
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
    too but re-import torch and cellarium at every epoch. ``pad=False`` hands token batches over
    packed (:data:`~scldm_scale.data.tokenize.COMPACT_KEYS`, what the VAE stage trains on) instead
    of padded.
    """

    def __init__(
        self, dataset, num_workers: int = 0, pin_memory: bool = False, multiprocessing_context: str | None = None,
        pad: bool = True,
    ) -> None:
        if num_workers < 0:
            raise ScldmError(f"data.num_workers={num_workers}: must be >= 0")
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.pad = pad  # False: token batches stay packed (tokenize.COMPACT_KEYS), as the VAE trains on them
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

        from scldm_scale.data.tokenize import pad_token_batch

        while True:
            n_batches = self.dataset.batches_per_epoch
            if n_batches == 0:
                raise ScldmError(
                    f"data.batch_size={getattr(self.dataset, 'batch_size', '?')}: no full batch per rank in an "
                    "epoch (too few cells for the batch size x world size); lower data.batch_size"
                )
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict({"epoch": self.epoch, "batches_consumed": self.batches_consumed})
            # workers send compact token batches (a fraction of the bytes through shared memory)
            compact = (self.num_workers > 0 or not self.pad) and hasattr(self.dataset, "compact_batches")
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                pin_memory=self.pin_memory and not compact,
                multiprocessing_context=self.multiprocessing_context,
            )
            if compact:
                self.dataset.compact_batches = True
            try:
                batches = iter(loader)  # starts the workers, which keep their copy of the flag
            finally:
                if compact and self.pad:  # without workers the dataset yields here: packed when not padding
                    self.dataset.compact_batches = False
            for batch in batches:
                if "length_n" in batch:
                    batch = pad_token_batch(batch) if self.pad else batch
                    if self.pin_memory:
                        batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
                self.batches_consumed += 1
                yield batch
            if self.batches_consumed != n_batches:
                raise RuntimeError(
                    f"data loader yielded {self.batches_consumed} of {n_batches} batches in epoch {self.epoch}"
                )
            self.epoch += 1
            self.batches_consumed = 0
