"""Data layer: one Source interface over h5ad shards (via cellarium-ml), TileDB-SOMA / Census,
mixtures and the latent cache; gene vocabulary, label tables, tokenizer, validation, ``prepare``
(harmonizing writers) and the synthetic atlas generator.

Importing this package is cheap; cellarium-ml / anndata / tiledbsoma are imported inside the
functions and classes that read data.
"""

from scldm_scale.data.config import DataConfig, SourceKind

__all__ = ["DataConfig", "SourceKind"]
