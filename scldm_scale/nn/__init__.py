"""Models: attention kernel choice, MCAB blocks, set VAE, DiT denoiser, NB likelihood.

The ``attention()`` function is not re-exported here, so that ``scldm_scale.nn.attention``
stays the module; import it as ``from scldm_scale.nn.attention import attention``.
"""

from scldm_scale.nn.attention import MultiheadAttention
from scldm_scale.nn.dit import DIT_PRESETS, DiT, DiTConfig, PosEmbed
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.mcab import MCAB, SelfAttentionBlock
from scldm_scale.nn.vae import VAE_PRESETS, PoolPrior, ScVAE, VAEConfig, ValueEmbedding

__all__ = [
    "DIT_PRESETS",
    "MCAB",
    "VAE_PRESETS",
    "DiT",
    "DiTConfig",
    "MultiheadAttention",
    "PoolPrior",
    "PosEmbed",
    "ScVAE",
    "SelfAttentionBlock",
    "VAEConfig",
    "ValueEmbedding",
    "nb_log_prob",
]
