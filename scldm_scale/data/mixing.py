"""How well training batches mix studies: the mean per-batch entropy of the cells' source file
(study), relative to batches of a fully random order.

``1.0`` means batches are as mixed as uniformly random draws from the whole dataset; batches cut
from one study at a time score ``0``. ``prepare`` writes cells in a seeded global random order
across its inputs, so the batches of any source over prepared data score about 1 (see
:func:`source_study_mixing`, also used by the atlas benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from scldm_scale.data.inputs import open_h5, read_elem
from scldm_scale.data.validate import resolve_shards
from scldm_scale.errors import ScldmError


def batch_entropy(groups: np.ndarray) -> float:
    """Entropy (nats) of the group frequencies of one batch."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def random_batch_entropy(groups_n: np.ndarray, batch_size: int, n_batches: int = 200, seed: int = 0) -> float:
    """Mean entropy of ``n_batches`` batches of ``batch_size`` cells drawn uniformly without replacement
    from all cells (``groups_n``: the group of every cell): the fully random reference."""
    groups_n = np.asarray(groups_n)
    rng = np.random.default_rng([seed, 0xE47])
    size = min(int(batch_size), len(groups_n))
    return float(np.mean([batch_entropy(groups_n[rng.choice(len(groups_n), size, replace=False)])
                          for _ in range(n_batches)]))


def study_mixing(batch_groups: Iterable[np.ndarray], groups_n: np.ndarray, seed: int = 0) -> float:
    """Mean entropy of the given batches' groups divided by that of random batches of the same size
    drawn from all cells (``groups_n``)."""
    batches = [np.asarray(b) for b in batch_groups]
    if not batches:
        raise ScldmError("study mixing: no batches given")
    size = int(round(np.mean([len(b) for b in batches])))
    reference = random_batch_entropy(groups_n, size, n_batches=max(200, len(batches)), seed=seed)
    if reference <= 0.0:
        raise ScldmError("study mixing: every cell belongs to one study; the figure needs at least two")
    return float(np.mean([batch_entropy(b) for b in batches]) / reference)


def study_of_cells(path: str | os.PathLike, column: str = "source_file") -> np.ndarray:
    """Study code (``obs[column]``, the input file for ``prepare`` output) of every training cell of a
    prepared h5ad dataset, indexed by ``cell_index`` (read from obs only; X is not touched)."""
    codes, ids = [], []
    categories: list[str] | None = None
    for shard in resolve_shards(os.fspath(path)):
        f = open_h5(shard)
        try:
            if f"obs/{column}" not in f or "obs/cell_index" not in f:
                raise ScldmError(
                    f"{shard}: obs has no '{column}' or 'cell_index' column; study mixing needs shards written by "
                    "`scldm-scale prepare` (or name the study column)"
                )
            values = read_elem(f, f"obs/{column}", shard)
            ids.append(np.asarray(read_elem(f, "obs/cell_index", shard), dtype=np.int64))
        finally:
            f.close()
        if categories is None:
            categories = [str(c) for c in getattr(values, "categories", np.unique(np.asarray(values, dtype=str)))]
        lookup = {c: i for i, c in enumerate(categories)}
        codes.append(np.array([lookup.setdefault(str(v), len(lookup)) for v in np.asarray(values, dtype=object)]))
    cell_index = np.concatenate(ids)
    out = np.full(int(cell_index.max()) + 1, -1, dtype=np.int64)
    out[cell_index] = np.concatenate(codes)
    return out


def source_study_mixing(
    batches: Iterator[dict], study_of_cell: np.ndarray, n_batches: int = 200, seed: int = 0
) -> float:
    """The figure over the next ``n_batches`` batches of a source's stream (e.g.
    ``source.batches(num_workers)``), the study of each cell looked up by its ``cell_index_n``."""
    study_of_cell = np.asarray(study_of_cell)
    groups = [study_of_cell[next(batches)["cell_index_n"].numpy()] for _ in range(int(n_batches))]
    return study_mixing(groups, study_of_cell[study_of_cell >= 0], seed=seed)
