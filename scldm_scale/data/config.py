"""Typed configuration of the data layer (``data:`` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SourceKind(str, Enum):
    """Where training batches come from."""

    H5AD = "h5ad"  # cellarium-ml DistributedAnnDataCollection over h5ad shards (stage 1)
    LATENTS = "latents"  # latent cache written by `encode` (stage 2)
    SOMA = "soma"  # TileDB-SOMA experiment (local path, URI, or CELLxGENE Census), streamed in shuffled chunks
    MIXTURE = "mixture"  # several h5ad / SOMA sources drawn in proportion to their weights (data.sources)


@dataclass
class SourceSpec:
    """One member of a mixture (``data.source=mixture``, ``data.sources: [...]``).

    Everything not set here (batch size, max_genes, label columns, seed, chunk sizes, ...) is
    taken from the enclosing ``data`` section; empty strings inherit the enclosing value too.
    """

    source: SourceKind = SourceKind.H5AD  # h5ad or soma
    path: str = ""
    weight: float = 1.0  # relative share of the batches drawn from this source
    value_filter: str = ""
    measurement: str = ""
    x_layer: str = ""
    var_id_column: str = ""
    census_version: str = ""


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
    max_cache_size: int = 2  # h5ad shards held in memory per dataloader worker (>= 2; at least 2 * shards_per_batch)
    shards_per_batch: int = 1  # h5ad: every batch draws from this many shards at once (study mixing of unmixed shards)
    vocab_path: str = ""  # default: <path>/vocab.json
    labels_path: str = ""  # default: <path>/labels.json
    # --- source=soma: ``path`` is the experiment URI (local directory, s3://..., tiledb://...),
    # or, with ``census_version`` set, the Census organism (default homo_sapiens).
    measurement: str = "RNA"
    x_layer: str = "data"  # raw counts layer; tiledbsoma.io names X "data", the Census names it "raw"
    value_filter: str = ""  # obs filter, e.g. "is_primary_data == True and tissue_general == 'blood'"
    var_id_column: str = ""  # var column holding the vocabulary gene ids; default: the ingested var index
    chunk_size: int = 256  # contiguous soma_joinids shuffled as a unit (I/O locality vs shuffle quality)
    shuffle_buffer: int = 16384  # cells mixed together before being cut into batches (per read lane)
    census_version: str = ""  # e.g. "2025-01-30": open the CELLxGENE Census (pip install 'scldm-scale[census]')
    # --- source=mixture: the member sources, each with a weight
    sources: list[SourceSpec] = field(default_factory=list)
