"""Data layer: sources (h5ad shards via cellarium-ml, latent cache), gene vocabulary, label
tables, tokenizer, validation and the synthetic atlas generator.

Importing this package is cheap; cellarium-ml / anndata are imported inside the functions and
classes that read data.
"""

from scldm_scale.data.config import DataConfig, SourceKind

__all__ = ["DataConfig", "SourceKind"]
