"""Model sizes without training: parameter counts and FLOPs per cell of typed configs.

Plain functions of :class:`~scldm_scale.nn.vae.VAEConfig` / :class:`~scldm_scale.nn.dit.DiTConfig`
(models are built on the meta device, so no memory is allocated and nothing is initialized for
real). ``scldm-scale sizes`` prints :func:`size_table`; a run plan can call the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from scldm_scale.nn.dit import DIT_PRESETS, DiT, DiTConfig, dit_train_flops
from scldm_scale.nn.vae import VAE_PRESETS, ScVAE, VAEConfig, vae_train_flops


def count_parameters(cfg: VAEConfig | DiTConfig) -> int:
    """Trainable parameters of the model a config describes (a VAE needs ``n_genes``; a DiT counts
    the label embeddings of ``label_cardinalities``)."""
    with torch.device("meta"):
        model = ScVAE(cfg) if isinstance(cfg, VAEConfig) else DiT(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class SizeRow:
    stage: str  # vae | dit
    preset: str
    d_model: int
    depth: str  # "enc/dec" latent blocks for a VAE, blocks for a DiT
    n_heads: int
    latent: str  # m x z
    params: int
    train_flops_per_cell: float  # forward + backward


def preset_configs(n_genes: int, label_cardinalities: list[int] | None = None,
                   base_vae: VAEConfig | None = None, base_dit: DiTConfig | None = None
                   ) -> tuple[dict[str, VAEConfig], dict[str, DiTConfig]]:
    """The VAE and DiT presets as typed configs over ``base_*`` (defaults otherwise), with the
    vocabulary size filled in and each DiT sized for its same-named VAE's latents (dit-s <- vae-s;
    dit-xs <- vae-xs)."""
    base_vae = base_vae or VAEConfig()
    base_dit = base_dit or DiTConfig()
    vaes = {name: replace(base_vae, n_genes=int(n_genes), **preset) for name, preset in VAE_PRESETS.items()}
    dits = {}
    for name, preset in DIT_PRESETS.items():
        vae = vaes.get("vae-" + name.split("-", 1)[1], base_vae)
        dits[name] = replace(base_dit, n_tokens=vae.n_latent_tokens, d_in=vae.d_latent,
                             label_cardinalities=list(label_cardinalities or []), **preset)
    return vaes, dits


def size_table(n_genes: int, n_tokens: float, n_decoded: float, label_cardinalities: list[int] | None = None,
               base_vae: VAEConfig | None = None, base_dit: DiTConfig | None = None) -> list[SizeRow]:
    """One row per preset: parameters and forward+backward FLOPs per cell, a VAE cell having
    ``n_tokens`` expressed-gene tokens and ``n_decoded`` decoded genes."""
    vaes, dits = preset_configs(n_genes, label_cardinalities, base_vae, base_dit)
    rows = [SizeRow("vae", name, c.d_model, f"{c.n_encoder_layers}/{c.n_decoder_layers}", c.n_heads,
                    f"{c.n_latent_tokens}x{c.d_latent}", count_parameters(c), vae_train_flops(c, n_tokens, n_decoded))
            for name, c in vaes.items()]
    rows += [SizeRow("dit", name, c.d_model, str(c.depth), c.n_heads, f"{c.n_tokens}x{c.d_in}", count_parameters(c),
                     dit_train_flops(c))
             for name, c in dits.items()]
    return rows


def format_count(value: float) -> str:
    """1234567 -> '1.23M' (k, M, G, T)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
