"""A weighted mixture of token sources (h5ad shards and SOMA experiments).

``data.source=mixture`` with ``data.sources: [{source, path, weight, ...}, ...]``. Every
member is a full source built from the enclosing ``data`` section with the member's fields
overriding it, so all members share the batch size, tokenizer settings, gene vocabulary and
label tables.

Epoch ``e`` of the mixture has ``N = sum of the members' batches per epoch`` batches (per
rank). Member ``s`` supplies exactly ``n_s`` of them, ``N * w_s`` rounded by largest
remainder, at positions given by a permutation seeded by ``(seed, e)``: the same on every
rank and worker, and independent of the worker count. Each member is read as one continuous
stream of its own epochs: the ``k``-th batch the mixture draws from member ``s`` overall is
that member's batch ``k % B_s`` of its epoch ``k // B_s`` (``B_s`` = its batches per epoch),
so a heavily weighted small member cycles through epochs (each reshuffled) and a lightly
weighted one resumes where it stopped in the next mixture epoch. A member's position is a
function of the mixture's ``(epoch, batches_consumed)``, which is all the checkpoint needs;
resume is exact for any worker count because workers take mixture batches by index
(:func:`~scldm_scale.data.loader.worker_batch_ids`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from scldm_scale.data.config import DataConfig, SourceKind, SourceSpec
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.loader import ShardedSource
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

_MEMBER_KINDS = (SourceKind.H5AD, SourceKind.SOMA)
_INHERITED = ("measurement", "x_layer", "value_filter", "var_id_column", "census_version")


def _as_data_config(cfg: Any) -> DataConfig:
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        if isinstance(obj, DataConfig):
            return obj
        return DataConfig(**obj)
    raise TypeError(f"expected a DataConfig, got {type(cfg).__name__}")


def member_configs(cfg: Any) -> list[tuple[DataConfig, float]]:
    """``(config, weight)`` of every mixture member, the enclosing ``data`` section overridden by the member."""
    parent = _as_data_config(cfg)
    specs = list(parent.sources or [])
    if not specs:
        raise ScldmError(
            "data.source=mixture needs data.sources: a list of {source: h5ad|soma, path: ..., weight: ...}"
        )
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            try:
                spec = SourceSpec(**spec)
            except TypeError as e:
                keys = [f.name for f in dataclasses.fields(SourceSpec)]
                raise ScldmError(f"data.sources[{i}]: {e}; valid keys: {keys}") from None
        try:
            kind = SourceKind(spec.source)
        except ValueError:
            raise ScldmError(f"data.sources[{i}].source={spec.source!r}: choose h5ad or soma") from None
        if kind not in _MEMBER_KINDS:
            raise ScldmError(f"data.sources[{i}].source={kind.value}: a mixture member must be h5ad or soma")
        weight = float(spec.weight)
        if not np.isfinite(weight) or weight <= 0:
            raise ScldmError(f"data.sources[{i}].weight={spec.weight}: must be a positive number")
        if kind == SourceKind.H5AD and spec.value_filter:
            raise ScldmError(
                f"data.sources[{i}].value_filter: obs filters apply to soma sources only; "
                "select h5ad cells when writing the shards (`scldm-scale prepare`)"
            )
        if not spec.path and not (kind == SourceKind.SOMA and (spec.census_version or parent.census_version)):
            raise ScldmError(f"data.sources[{i}].path is empty; set it to the h5ad shards or the SOMA experiment")
        overrides: dict[str, Any] = {"source": kind, "path": spec.path, "sources": []}
        for key in _INHERITED:
            value = getattr(spec, key)
            overrides[key] = value if value else (getattr(parent, key) if kind == SourceKind.SOMA else "")
        if kind == SourceKind.H5AD:
            overrides.update(measurement=parent.measurement, x_layer=parent.x_layer)
        out.append((dataclasses.replace(parent, **overrides), weight))
    return out


def split_counts(total: int, weights: Iterable[float]) -> np.ndarray:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the earlier member)."""
    w = np.asarray(list(weights), dtype=np.float64)
    share = total * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    rest = total - int(counts.sum())
    if rest:
        order = np.lexsort((np.arange(len(w)), -(share - counts)))
        counts[order[:rest]] += 1
    return counts


class MixtureDataset(ShardedSource, IterableDataset):
    """Token batches drawn from several sources in proportion to their weights."""

    def __init__(self, cfg: Any, vocab: GeneVocab | None, labels: LabelTables | None, validate: bool = True) -> None:
        from scldm_scale.data.loader import build_dataset

        if vocab is None or labels is None:
            raise ScldmError(
                "data.source=mixture needs a gene vocabulary and label tables shared by all sources; "
                "set data.vocab_path and data.labels_path"
            )
        members = member_configs(cfg)
        self.cfg = _as_data_config(cfg)
        self.seed = int(self.cfg.seed)
        self.batch_size = int(self.cfg.batch_size)
        self.sources = [build_dataset(c, vocab, labels, validate=validate) for c, _ in members]
        self.names = [f"{c.source.value}:{c.path or c.census_version}" for c, _ in members]
        self.weights = np.array([w for _, w in members], dtype=np.float64)
        self.weights /= self.weights.sum()
        self._refresh_rank_world()

    @property
    def n_cells(self) -> int:
        return int(sum(s.n_cells for s in self.sources))

    @property
    def source_batches(self) -> list[int]:
        """Batches per epoch (per rank) of every member."""
        self._refresh_rank_world()
        return [int(s.batches_per_epoch) for s in self.sources]

    @property
    def batches_per_epoch(self) -> int:
        sizes = self.source_batches
        return 0 if min(sizes) == 0 else int(sum(sizes))

    def draws_per_epoch(self) -> np.ndarray:
        """Batches drawn from every member in one mixture epoch."""
        return split_counts(self.batches_per_epoch, self.weights)

    def choices(self, epoch: int) -> np.ndarray:
        """Member of every batch of mixture epoch ``epoch``."""
        counts = self.draws_per_epoch()
        order = np.repeat(np.arange(len(self.sources)), counts)
        return np.random.default_rng([self.seed % (1 << 63), epoch, 0x313]).permutation(order)

    def member_positions(self, epoch: int, consumed: int) -> list[dict[str, int]]:
        """Each member's own ``{epoch, batches_consumed}`` after ``consumed`` batches of mixture epoch ``epoch``."""
        counts = self.draws_per_epoch()
        drawn = np.bincount(self.choices(epoch)[:consumed], minlength=len(self.sources))
        out = []
        for s, b_s in enumerate(self.source_batches):
            k = epoch * int(counts[s]) + int(drawn[s])
            out.append({"epoch": k // b_s, "batches_consumed": k % b_s})
        return out

    def describe(self) -> str:
        return "data.sources (mixture)"

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` / ``batches_consumed`` (all that resuming needs) and, for inspection, each member's position."""
        state = super().state_dict()
        state["sources"] = self.member_positions(self.epoch, state["batches_consumed"])
        return state

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._refresh_rank_world()
        epoch = self.epoch
        n_batches = self.batches_per_epoch
        choice_n = self.choices(epoch)
        counts = self.draws_per_epoch()
        sizes = self.source_batches
        # stream position of every batch inside its member: epoch * n_s + draws of that member before it
        before = np.zeros(n_batches, dtype=np.int64)
        for s in range(len(self.sources)):
            mine = choice_n == s
            before[mine] = epoch * int(counts[s]) + np.arange(int(mine.sum()))
        js = list(self.my_batch_ids(n_batches))
        streams = []
        for s, source in enumerate(self.sources):
            source.compact_batches = self.compact_batches
            requests = [(int(before[j]) // sizes[s], int(before[j]) % sizes[s]) for j in js if choice_n[j] == s]
            streams.append(_member_batches(source, requests, rank, world))
        yield from self.counted(next(streams[int(choice_n[j])]) for j in js)
        for stream in streams:
            stream.close()


def _member_batches(source, requests: list[tuple[int, int]], rank: int, world: int) -> Iterator[dict]:
    """Token batches ``(epoch, j)`` of one member, in order."""
    if hasattr(source, "iter_batches"):  # SOMA: groups requests into shared reads
        return source.iter_batches(iter(requests))
    return _h5ad_batches(source, requests, rank, world)


def _h5ad_batches(ds, requests: list[tuple[int, int]], rank: int, world: int) -> Iterator[dict]:
    """Random access to batches ``(epoch, j)`` of an :class:`~scldm_scale.data.h5ad_source.H5ADTokenDataset`
    (same cells, tokens and seeds as its own iteration)."""
    cached: tuple[int, np.ndarray] | None = None
    for epoch, j in requests:
        if cached is None or cached[0] != epoch:
            cached = (epoch, ds.rank_indices(epoch, rank, world))
        yield ds.token_batch(cached[1], epoch, j, rank, world)
