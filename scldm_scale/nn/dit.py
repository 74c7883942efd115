"""DiT denoiser over the m latent tokens (adaLN-Zero, timestep + per-attribute label conditioning)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.nn.attention import MultiheadAttention


class PosEmbed(str, Enum):
    LEARNED = "learned"
    SINCOS = "sincos"


@dataclass
class DiTConfig:
    n_tokens: int = 16  # m, filled from the VAE
    d_in: int = 16  # z, filled from the VAE
    d_model: int = 256
    depth: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embed: PosEmbed = PosEmbed.LEARNED
    # per attribute, filled from data; code == cardinality is that attribute's null token
    label_cardinalities: list[int] = field(default_factory=list)
    activation_checkpointing: bool = False


# Named sizes of DiT (Peebles & Xie 2023): S/B/L/XL widths, depths and heads; dit-xs is the CPU
# quickstart size.
DIT_PRESETS: dict[str, dict] = {
    "dit-xs": dict(d_model=128, depth=2, n_heads=4),
    "dit-s": dict(d_model=384, depth=12, n_heads=6),
    "dit-b": dict(d_model=768, depth=12, n_heads=12),
    "dit-l": dict(d_model=1024, depth=24, n_heads=16),
    "dit-xl": dict(d_model=1152, depth=28, n_heads=16),
}

TIMESTEP_FREQ_DIM = 256  # sinusoidal features of the timestep embedder


def dit_forward_flops(cfg: DiTConfig) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) per cell (one sequence of m latent tokens)."""
    m, z, d = cfg.n_tokens, cfg.d_in, cfg.d_model
    d_hidden = int(d * cfg.mlp_ratio)
    macs = m * z * d  # x embedder
    macs += TIMESTEP_FREQ_DIM * d + d * d  # timestep MLP
    block = 6 * d * d + 4 * m * d * d + 2 * m * m * d + 2 * m * d * d_hidden  # adaLN, qkv+out, attention, MLP
    macs += cfg.depth * block
    macs += 2 * d * d + m * d * z  # final adaLN and linear
    return 2.0 * float(macs)


def dit_train_flops(cfg: DiTConfig) -> float:
    """Forward + backward FLOPs per cell (backward = 2 x forward)."""
    return 3.0 * dit_forward_flops(cfg)


def modulate(x_nmd: Tensor, shift_nd: Tensor, scale_nd: Tensor) -> Tensor:
    return x_nmd * (1 + scale_nd.unsqueeze(1)) + shift_nd.unsqueeze(1)


def sincos_pos_embed(n_tokens: int, d_model: int) -> Tensor:
    """Fixed 1D sin-cos token positions, (m, d)."""
    half = d_model // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)  # (d/2,)
    angle = torch.arange(n_tokens, dtype=torch.float64)[:, None] * omega[None]  # (m, d/2)
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # (m, 2*(d/2))
    if d_model % 2:
        emb = torch.cat([emb, torch.zeros(n_tokens, 1, dtype=emb.dtype)], dim=1)
    return emb.float()


# --------------------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP (as DiT)."""

    def __init__(self, d_model: int, freq_dim: int = TIMESTEP_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    @staticmethod
    def timestep_embedding(t_n: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs_f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_n.device) / half)
        args_nf = t_n.float()[:, None] * freqs_f[None]  # (n, dim/2)
        emb_nf = torch.cat([torch.cos(args_nf), torch.sin(args_nf)], dim=-1)  # (n, 2*(dim/2))
        if dim % 2:
            emb_nf = torch.cat([emb_nf, torch.zeros_like(emb_nf[:, :1])], dim=-1)
        return emb_nf

    def forward(self, t_n: Tensor) -> Tensor:
        freq_nf = self.timestep_embedding(1000.0 * t_n, self.freq_dim)  # (n, f)
        return self.mlp(freq_nf.to(self.mlp[0].weight.dtype))  # (n, d)


# --------------------------------------------------------------------------- blocks


class DiTBlock(nn.Module):
    """Self-attention + MLP with adaLN-Zero conditioning."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = MultiheadAttention(d_model, n_heads)  # self-attention, fused qkv, no mask: SDPA's Flash on GPU
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        d_hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_hidden), nn.GELU(approximate="tanh"), nn.Linear(d_hidden, d_model)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))

    def forward(self, x_nmd: Tensor, c_nd: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_nd).chunk(6, dim=1)
        h_nmd = self.attn(modulate(self.norm1(x_nmd), shift_msa, scale_msa))  # (n, m, d)
        x_nmd = x_nmd + gate_msa.unsqueeze(1) * h_nmd  # (n, m, d)
        h_nmd = self.mlp(modulate(self.norm2(x_nmd), shift_mlp, scale_mlp))  # (n, m, d)
        x_nmd = x_nmd + gate_mlp.unsqueeze(1) * h_nmd  # (n, m, d)
        return x_nmd


class FinalLayer(nn.Module):
    """adaLN then a linear map back to the latent width."""

    def __init__(self, d_model: int, d_out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d_model, d_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))

    def forward(self, x_nmd: Tensor, c_nd: Tensor) -> Tensor:
        shift_nd, scale_nd = self.adaLN_modulation(c_nd).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_nmd), shift_nd, scale_nd))  # (n, m, z)


# --------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Diffusion transformer predicting the flow velocity of latent tokens."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.x_embedder = nn.Linear(cfg.d_in, d)
        if cfg.pos_embed == PosEmbed.LEARNED:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, d))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed(cfg.n_tokens, d).unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(d)
        self.label_embedders = nn.ModuleList(nn.Embedding(card + 1, d) for card in cfg.label_cardinalities)
        self.register_buffer(
            "null_codes_a", torch.tensor(list(cfg.label_cardinalities), dtype=torch.long), persistent=False
        )
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.d_in)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        for emb in self.label_embedders:
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def null_labels(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """(n, a) labels with every attribute at its null code."""
        return self.null_codes_a.to(device or self.null_codes_a.device).unsqueeze(0).expand(n, -1).clone()

    def forward(self, x_nmz: Tensor, t_n: Tensor, labels_na: Tensor) -> Tensor:
        """Velocity for latent tokens ``x_nmz`` at times ``t_n`` given integer ``labels_na``."""
        x_nmd = self.x_embedder(x_nmz) + self.pos_embed  # (n, m, d)
        c_nd = self.t_embedder(t_n)  # (n, d)
        for a, emb in enumerate(self.label_embedders):
            c_nd = c_nd + emb(labels_na[:, a])  # (n, d)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x_nmd = checkpoint(block, x_nmd, c_nd, use_reentrant=False)
            else:
                x_nmd = block(x_nmd, c_nd)  # (n, m, d)
        return self.final_layer(x_nmd, c_nd)  # (n, m, z)

    def flops_per_cell(self) -> float:
        """Forward matmul FLOPs per cell (:func:`dit_forward_flops` of this model's config)."""
        return dit_forward_flops(self.cfg)
