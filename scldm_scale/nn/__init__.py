"""Models: attention kernel choice, packed sequences, MCAB blocks, set VAE, DiT denoiser, NB
likelihood, sizes (parameters, FLOPs) and torch.compile of the blocks.

The ``attention()`` function is not re-exported here, so that ``scldm_scale.nn.attention``
stays the module; import it as ``from scldm_scale.nn.attention import attention``.
"""

from scldm_scale.nn.attention import Kernel, MultiheadAttention, choose_kernel
from scldm_scale.nn.dit import DIT_PRESETS, DiT, DiTConfig, PosEmbed, dit_forward_flops, dit_train_flops
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.mcab import MCAB, SelfAttentionBlock
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.sizes import count_parameters, size_table
from scldm_scale.nn.speed import compile_blocks
from scldm_scale.nn.vae import (
    VAE_PRESETS,
    PoolPrior,
    ScVAE,
    VAEConfig,
    ValueEmbedding,
    vae_forward_flops,
    vae_train_flops,
)

__all__ = [
    "DIT_PRESETS",
    "MCAB",
    "VAE_PRESETS",
    "DiT",
    "DiTConfig",
    "Kernel",
    "MultiheadAttention",
    "Packing",
    "PoolPrior",
    "PosEmbed",
    "ScVAE",
    "SelfAttentionBlock",
    "VAEConfig",
    "ValueEmbedding",
    "choose_kernel",
    "compile_blocks",
    "count_parameters",
    "dit_forward_flops",
    "dit_train_flops",
    "nb_log_prob",
    "size_table",
    "vae_forward_flops",
    "vae_train_flops",
]
