"""Typed configuration of the data layer (``data:`` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SourceKind(str, Enum):
    """Where training batches come from."""

    H5AD = "h5ad"  # cellarium-ml DistributedAnnDataCollection over h5ad shards (stage 1)
    LATENTS = "latents"  # memory-mapped latent cache written by `encode` (stage 2)


@dataclass
class DataConfig:
    """Data source, tokenization and loader settings.

    ``path`` is a directory of h5ad shards (with ``metadata.json``), a glob or a brace
    pattern (``shards/shard_{0000..0099}.h5ad``); for ``source=latents`` it is the latent
    cache directory.
    """

    source: SourceKind = SourceKind.H5AD
    path: str = ""
    label_columns: list[str] = field(default_factory=lambda: ["cell_type", "tissue", "donor"])
    max_genes: int = 1024  # cap on tokens per cell; larger cells are subsampled (seeded), never rejected
    batch_size: int = 64  # cells per rank per micro-batch
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    max_cache_size: int = 2  # h5ad shards held in memory per dataloader worker (>= 2)
    vocab_path: str = ""  # default: <path>/vocab.json
    labels_path: str = ""  # default: <path>/labels.json
