"""scldm-scale: atlas-scale latent diffusion for single-cell gene expression."""

__version__ = "0.1.0"
