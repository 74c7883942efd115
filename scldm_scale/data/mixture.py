"""A weighted mixture of token sources (h5ad shards and SOMA experiments).

``data.source=mixture`` with ``data.sources: [{source, path, weight, ...}, ...]``. Every
member is a full source built from the enclosing ``data`` section with the member's fields
overriding it, so all members share the batch size, tokenizer settings, gene vocabulary and
label tables.

The mixture's stream (see :mod:`scldm_scale.data.source`) is a sequence of whole *draws* of
``b = batch_size`` cells, each from one member. Mixture epoch ``e`` has ``M = sum_s ceil(N_s / b)``
draws (``N_s``: member ``s``'s cells); member ``s`` supplies exactly ``n_s`` of them, ``M * w_s``
rounded by largest remainder, at places given by a permutation seeded by ``(seed, e)``. Each member
is read as its own continuous stream: the ``j``-th draw from member ``s`` overall is the ``b``
cells at its stream position ``j * b`` (its epochs, each reshuffled, one after another), so a
heavily weighted small member cycles through its epochs and a lightly weighted one resumes
where it stopped in the next mixture epoch; over one of its epochs a member yields each of its
cells once. A step of ``W`` ranks takes ``W`` consecutive draws, one per rank. The position is
the number of draws consumed (times ``b``): it does not depend on the number of ranks or workers,
and every member's position follows from it (``state_dict()["sources"]``, for inspection).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scldm_scale.data.config import DataConfig, SourceKind, SourceSpec
from scldm_scale.data.source import StreamSource
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


class MixtureSource(StreamSource):
    """Token batches drawn from several sources in proportion to their weights (see the module docstring)."""

    order_uses_batch_size = True  # draws are batch-sized

    def __init__(
        self, cfg: Any, members: Sequence[StreamSource], weights: Sequence[float], names: Sequence[str]
    ) -> None:
        self.cfg = _as_data_config(cfg)
        self.seed = int(self.cfg.seed)
        self.batch_size = b = int(self.cfg.batch_size)
        if b < 1:
            raise ScldmError(f"data.batch_size={b}: must be >= 1")
        self.sources = list(members)
        self.names = list(names)
        self.vocab, self.labels = self.sources[0].vocab, self.sources[0].labels
        for name, source in zip(self.names, self.sources):
            if source.cells_per_epoch < b:
                raise ScldmError(
                    f"data.sources ({name}): {source.cells_per_epoch} cells, fewer than data.batch_size={b}; "
                    "lower data.batch_size or widen the member's selection"
                )
        self.weights = np.array(weights, dtype=np.float64)
        self.weights /= self.weights.sum()
        self.member_draws = np.array([-(-s.cells_per_epoch // b) for s in self.sources], dtype=np.int64)
        self.draws_per_epoch = int(self.member_draws.sum())
        self.counts = split_counts(self.draws_per_epoch, self.weights)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    @property
    def n_cells(self) -> int:
        return int(sum(s.n_cells for s in self.sources))

    @property
    def cells_per_epoch(self) -> int:
        return self.draws_per_epoch * self.batch_size

    def describe(self) -> str:
        return "data.sources (mixture)"

    def choices(self, epoch: int) -> np.ndarray:
        """Member of every draw of mixture epoch ``epoch``."""
        return self._plan(epoch)[0]

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Member of every draw of the epoch and how many draws of that member came before it in the epoch."""
        if epoch not in self._plans:
            order = np.repeat(np.arange(len(self.sources)), self.counts)
            choice = np.random.default_rng([self.seed % (1 << 63), epoch, 0x313]).permutation(order)
            before = np.zeros(len(choice), dtype=np.int64)
            for s in range(len(self.sources)):
                mine = choice == s
                before[mine] = np.arange(int(mine.sum()))
            for old in sorted(self._plans)[:-1]:
                del self._plans[old]
            self._plans[epoch] = (choice, before)
        return self._plans[epoch]

    def locate(self, draw: int) -> tuple[int, int]:
        """``(member, member stream position)`` of mixture draw ``draw``."""
        epoch, i = divmod(int(draw), self.draws_per_epoch)
        choice, before = self._plan(epoch)
        s = int(choice[i])
        return s, (epoch * int(self.counts[s]) + int(before[i])) * self.batch_size

    def member_positions(self, draws: int) -> list[dict[str, int]]:
        """Each member's own stream position after ``draws`` draws of the mixture."""
        epoch, i = divmod(int(draws), self.draws_per_epoch)
        done = epoch * self.counts + np.bincount(self.choices(epoch)[:i], minlength=len(self.sources))
        out = []
        for s, source in enumerate(self.sources):
            cells = int(done[s]) * self.batch_size
            out.append({"epoch": cells // source.cells_per_epoch, "cells_consumed": cells % source.cells_per_epoch})
        return out

    def read_stream(self, starts: Iterable[int], n: int, compact: bool) -> Iterator[dict]:
        """Each draw from its member's own stream. Members read ahead (SOMA groups and prefetches), so
        draws are taken from ``starts`` as the first reader needs them and queued per member."""
        b = self.batch_size
        if n != b:
            raise ValueError(f"a mixture reads whole draws of {b} cells, not {n}")
        starts = iter(starts)
        queued = [collections.deque() for _ in self.sources]  # member stream positions not yet requested
        members = collections.deque()  # member of every draw taken from `starts` and not yet yielded

        def take() -> bool:
            start = next(starts, None)
            if start is None:
                return False
            if start % b:
                raise ValueError(f"mixture stream position {start} is not a multiple of the batch size {b}")
            s, pos = self.locate(start // b)
            queued[s].append(pos)
            members.append(s)
            return True

        def requests(s: int) -> Iterator[int]:
            while queued[s] or take():
                if queued[s]:
                    yield queued[s].popleft()

        streams = [source.read_stream(requests(s), b, compact) for s, source in enumerate(self.sources)]
        while members or take():
            yield next(streams[members.popleft()])

    def state_dict(self) -> dict[str, Any]:
        """The position (as every source) and, for inspection, each member's own position."""
        state = super().state_dict()
        state["sources"] = self.member_positions(self._position // self.batch_size)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self._position % self.batch_size:
            raise ScldmError(
                f"{self.describe()}: checkpoint data position ({self._position} cells) is not a whole number of "
                f"draws of data.batch_size={self.batch_size}; resume with the batch size the run started with"
            )

    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every member's inference pass in turn (cell ids are the members' own)."""
        for source in self.sources:
            yield from source.inference_batches(rank, world, batch_size)

    def inference_cells(self, rank: int, world: int) -> int:
        return sum(source.inference_cells(rank, world) for source in self.sources)

    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]:
        """The members' statistics pooled with the mixture weights."""
        stats = np.array([s.library_size_stats(max_cells) for s in self.sources])
        mean = float((self.weights * stats[:, 0]).sum())
        var = float((self.weights * (stats[:, 1] ** 2 + stats[:, 0] ** 2)).sum()) - mean**2
        return mean, float(max(np.sqrt(max(var, 0.0)), 0.1))
