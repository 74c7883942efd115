"""Set autoencoder over (gene, count) tokens: MCAB pooling encoder, MCAB unpooling NB decoder."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.nn.mcab import MCAB, SelfAttentionBlock


class ValueEmbedding(str, Enum):
    CONCAT = "concat"
    MULTIPLY = "multiply"


class PoolPrior(str, Enum):
    UNIFORM = "uniform"  # pooling attention starts uniform over the expressed genes
    EXPRESSION = "expression"  # log-prior log(log1p(cp10k)): genes weigh by depth-normalized expression


class ValueInput(str, Enum):
    LOG1P = "log1p"  # log1p(count)
    LOG1P_CP10K = "log1p_cp10k"  # log1p(count / cell total * 1e4): invariant to sequencing depth


@dataclass
class VAEConfig:
    n_genes: int = 0  # vocabulary size, filled from data (0 = not yet known)
    d_model: int = 128
    n_heads: int = 4
    n_latent_tokens: int = 16  # m
    d_latent: int = 16  # z
    # self-attention blocks over the m latent tokens after pooling / before unpooling; 0 = none (the
    # pooling MCAB writes the latents directly and the unpooling MCAB reads them directly)
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    mlp_ratio: float = 4.0
    # MLP width of the unpooling MCAB, which runs once per (cell, decoded gene) and dominates the
    # decoder's cost; 0 = mlp_ratio. A narrow one (1.0) reconstructs as well for far less compute.
    unpool_mlp_ratio: float = 0.0
    # NB head: besides the shared logit head, a learned readout vector and logit bias per gene
    # (gene-specific signed loadings on the unpooled features, like the last layer of an MLP decoder)
    gene_readout: bool = False
    dropout: float = 0.0
    value_embedding: ValueEmbedding = ValueEmbedding.MULTIPLY
    value_input: ValueInput = ValueInput.LOG1P
    pool_prior: PoolPrior = PoolPrior.EXPRESSION
    variational: bool = False  # diagonal Gaussian posterior (KL weight lives in the training config)
    log_library_loc: float = 0.0  # mean and std of log library size in the data (filled from data):
    log_library_scale: float = 1.0  # the library head predicts the standardized value
    decode_chunk_size: int = 4096  # genes decoded per chunk (bounds memory)
    activation_checkpointing: bool = False


VAE_PRESETS: dict[str, dict] = {
    "vae-xs": dict(d_model=64, n_heads=4, n_latent_tokens=8, d_latent=8, n_encoder_layers=1, n_decoder_layers=1),
    "vae-s": dict(d_model=128, n_heads=4, n_latent_tokens=16, d_latent=16, n_encoder_layers=2, n_decoder_layers=2),
    "vae-b": dict(d_model=256, n_heads=8, n_latent_tokens=32, d_latent=32, n_encoder_layers=4, n_decoder_layers=4),
    "vae-l": dict(d_model=512, n_heads=8, n_latent_tokens=64, d_latent=32, n_encoder_layers=6, n_decoder_layers=6),
}


# --------------------------------------------------------------------------- FLOPs helpers


def _mcab_macs(n_q: int, n_k: int, d: int, mlp_ratio: float) -> float:
    proj = n_q * d * d + n_k * d * 2 * d + n_q * d * d  # q, kv, out projections
    attn = 2 * n_q * n_k * d  # scores and weighted values
    mlp = 2 * n_q * d * int(d * mlp_ratio)
    return float(proj + attn + mlp)


def _self_block_macs(m: int, d: int, mlp_ratio: float) -> float:
    return _mcab_macs(m, m, d, mlp_ratio)


# --------------------------------------------------------------------------- model


def per_10k(counts_ns: Tensor) -> Tensor:
    """Counts per 10,000 of the cell's total over its tokens (padding must hold 0)."""
    return counts_ns / counts_ns.sum(dim=1, keepdim=True).clamp(min=1.0) * 1e4  # (n, s)


class ScVAE(nn.Module):
    """Permutation-invariant set autoencoder with a negative-binomial decoder."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.n_genes <= 0:
            raise ValueError(f"VAEConfig.n_genes must be > 0 (got {cfg.n_genes}); fill it from the gene vocabulary")
        if cfg.n_encoder_layers < 0 or cfg.n_decoder_layers < 0:
            raise ValueError(f"vae.n_encoder_layers / vae.n_decoder_layers must be >= 0 (got {cfg.n_encoder_layers} / "
                             f"{cfg.n_decoder_layers}); 0 means no self-attention between the MCABs")
        self.cfg = cfg
        d, m, z = cfg.d_model, cfg.n_latent_tokens, cfg.d_latent
        blk = dict(n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)

        # tokenizer (the gene table is shared by the encoder tokens and the decoder queries)
        self.gene_embedding = nn.Embedding(cfg.n_genes, d)
        self.value_mlp = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        self.token_proj = nn.Linear(2 * d, d) if cfg.value_embedding == ValueEmbedding.CONCAT else None

        # encoder
        self.latent_queries = nn.Parameter(torch.empty(m, d))
        self.pool = MCAB(d, **blk)
        self.encoder_blocks = nn.ModuleList(SelfAttentionBlock(d, **blk) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.mu_head = nn.Linear(d, z)
        self.logvar_head = nn.Linear(d, z) if cfg.variational else None

        # decoder
        self.latent_in = nn.Linear(z, d)
        self.latent_pos = nn.Parameter(torch.empty(m, d))
        self.decoder_blocks = nn.ModuleList(SelfAttentionBlock(d, **blk) for _ in range(cfg.n_decoder_layers))
        self.unpool = MCAB(d, n_heads=cfg.n_heads, mlp_ratio=cfg.unpool_mlp_ratio or cfg.mlp_ratio, dropout=cfg.dropout)
        self.decoder_norm = nn.LayerNorm(d)
        self.logit_head = nn.Linear(d, 1)
        self.readout_gd = nn.Parameter(torch.zeros(cfg.n_genes, d)) if cfg.gene_readout else None
        self.logit_bias_g = nn.Parameter(torch.zeros(cfg.n_genes)) if cfg.gene_readout else None
        self.library_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.log_theta_g = nn.Parameter(torch.zeros(cfg.n_genes))

        self.initialize_weights()

    def initialize_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        # small, like the linear weights: with Adam the relative update size sets how fast the
        # per-gene table (shared by the encoder tokens and the decoder queries) learns
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        nn.init.normal_(self.latent_queries, std=0.02)
        nn.init.normal_(self.latent_pos, std=0.02)
        nn.init.zeros_(self.log_theta_g)  # theta = 1
        if self.readout_gd is not None:  # the per-gene readout starts as the shared head alone
            nn.init.zeros_(self.readout_gd)
            nn.init.zeros_(self.logit_bias_g)
        if self.logvar_head is not None:  # start with a small posterior variance
            nn.init.zeros_(self.logvar_head.weight)
            nn.init.constant_(self.logvar_head.bias, -4.0)

    def _block(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        if self.cfg.activation_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------ encoder

    def tokenize(self, gene_ids_ns: Tensor, counts_ns: Tensor) -> Tensor:
        """Gene embedding combined with an embedding of log1p(count) (depth-normalized by default)."""
        gene_nsd = self.gene_embedding(gene_ids_ns)  # (n, s, d)
        counts_ns = counts_ns.to(gene_nsd.dtype)
        if self.cfg.value_input == ValueInput.LOG1P_CP10K:
            counts_ns = per_10k(counts_ns)  # (n, s)
        value_nsd = self.value_mlp(torch.log1p(counts_ns).unsqueeze(-1))  # (n, s, d)
        if self.token_proj is None:  # MULTIPLY
            return gene_nsd * value_nsd  # (n, s, d)
        return self.token_proj(torch.cat([gene_nsd, value_nsd], dim=-1))  # (n, s, d)

    def pool_bias(self, counts_ns: Tensor, mask_ns: Tensor) -> Tensor | None:
        """Log-prior of the pooling attention over a cell's gene tokens (None for a uniform start).

        EXPRESSION: ``log(log1p(cp10k))``, so the pooled tokens start as an expression-weighted
        average of the cell's genes (a depth-normalized linear summary of the profile) and the
        learned scores refine it. Computed over the unmasked tokens only.
        """
        if self.cfg.pool_prior == PoolPrior.UNIFORM:
            return None
        cp10k_ns = per_10k(counts_ns.float() * mask_ns)  # (n, s)
        return torch.log1p(cp10k_ns).clamp(min=1e-6).log()  # (n, s)

    def encode(self, gene_ids_ns: Tensor, counts_ns: Tensor, mask_ns: Tensor) -> dict:
        """Returns ``{"z_nmz", "mu_nmz", "logvar_nmz"}`` (logvar None unless variational)."""
        n = gene_ids_ns.shape[0]
        tokens_nsd = self.tokenize(gene_ids_ns, counts_ns)  # (n, s, d)
        queries_nmd = self.latent_queries.unsqueeze(0).expand(n, -1, -1)  # (n, m, d)
        bias_ns = self.pool_bias(counts_ns, mask_ns)  # (n, s) or None
        h_nmd = self._block(self.pool, queries_nmd, tokens_nsd, mask_ns, bias_ns)  # (n, m, d)
        for block in self.encoder_blocks:
            h_nmd = self._block(block, h_nmd)  # (n, m, d)
        h_nmd = self.encoder_norm(h_nmd)  # (n, m, d)
        mu_nmz = self.mu_head(h_nmd)  # (n, m, z)
        mu_nmz = F.layer_norm(mu_nmz, mu_nmz.shape[-1:])  # (n, m, z) per-token, no affine
        logvar_nmz = None
        z_nmz = mu_nmz
        if self.logvar_head is not None:
            logvar_nmz = self.logvar_head(h_nmd)  # (n, m, z)
            if self.training:
                z_nmz = mu_nmz + torch.randn_like(mu_nmz) * torch.exp(0.5 * logvar_nmz)  # (n, m, z)
        return {"z_nmz": z_nmz, "mu_nmz": mu_nmz, "logvar_nmz": logvar_nmz}

    # ------------------------------------------------------------------ decoder

    def decode(self, z_nmz: Tensor, gene_ids_nt: Tensor, gene_mask_nt: Tensor | None = None) -> dict:
        """Logit per requested gene and predicted log library size: ``{"logits_nt", "log_library_n"}``.

        Masked genes (``gene_mask_nt`` False) get logit 0; ``nb_mean`` ignores them.
        """
        h_nmd = self.latent_in(z_nmz) + self.latent_pos  # (n, m, d)
        for block in self.decoder_blocks:
            h_nmd = self._block(block, h_nmd)  # (n, m, d)
        library_std_n = self.library_head(h_nmd.mean(dim=1)).squeeze(-1)  # (n,) standardized
        log_library_n = self.cfg.log_library_loc + self.cfg.log_library_scale * library_std_n  # (n,)
        chunks = []
        ids_chunks = gene_ids_nt.split(self.cfg.decode_chunk_size, dim=1)
        mask_chunks = (gene_mask_nt.split(self.cfg.decode_chunk_size, dim=1) if gene_mask_nt is not None
                       else (None,) * len(ids_chunks))
        for gene_ids_nc, mask_nc in zip(ids_chunks, mask_chunks):
            q_ncd = self.gene_embedding(gene_ids_nc)  # (n, c, d)
            q_ncd = self._block(self.unpool, q_ncd, h_nmd, None, None, mask_nc)  # (n, c, d)
            chunks.append(self.nb_logits(self.decoder_norm(q_ncd), gene_ids_nc))  # (n, c)
        logits_nt = torch.cat(chunks, dim=1)  # (n, t)
        if gene_mask_nt is not None:
            logits_nt = logits_nt.masked_fill(~gene_mask_nt, 0.0)
        return {"logits_nt": logits_nt, "log_library_n": log_library_n}

    def nb_logits(self, u_ncd: Tensor, gene_ids_nc: Tensor) -> Tensor:
        """NB head: shared logit head, plus the gene's own readout and bias when ``gene_readout``."""
        logits_nc = self.logit_head(u_ncd).squeeze(-1)  # (n, c)
        if self.readout_gd is None:
            return logits_nc
        readout_ncd = self.readout_gd[gene_ids_nc]  # (n, c, d)
        return logits_nc + (u_ncd * readout_ncd).sum(-1) + self.logit_bias_g[gene_ids_nc]  # (n, c)

    # ------------------------------------------------------------------ training forward

    def forward(self, gene_ids_ns: Tensor, counts_ns: Tensor, mask_ns: Tensor, gene_ids_nt: Tensor,
                gene_mask_nt: Tensor | None = None) -> dict:
        """Encode the expressed genes, decode the requested ones; the loss is computed outside.

        Returns the encoder outputs plus ``logits_nt``, ``log_library_n`` and ``theta_nt``.
        One forward through the module (not separate method calls) so that wrappers that hook
        ``forward`` (DeepSpeed ZeRO-3 parameter gathering) see every parameter.
        """
        out = self.encode(gene_ids_ns, counts_ns, mask_ns)
        out.update(self.decode(out["z_nmz"], gene_ids_nt, gene_mask_nt))  # logits_nt (n, t), log_library_n (n,)
        out["theta_nt"] = self.dispersion(gene_ids_nt)  # (n, t)
        return out

    def nb_mean(self, logits_nt: Tensor, library_n: Tensor, gene_mask_nt: Tensor | None = None) -> Tensor:
        """NB mean: softmax over the decoded (unmasked) genes times the library size; 0 where masked."""
        if gene_mask_nt is None:
            return torch.softmax(logits_nt, dim=-1) * library_n.unsqueeze(-1)  # (n, t)
        logits_nt = logits_nt.masked_fill(~gene_mask_nt, torch.finfo(logits_nt.dtype).min)
        p_nt = torch.softmax(logits_nt, dim=-1) * gene_mask_nt  # (n, t)
        return p_nt * library_n.unsqueeze(-1)  # (n, t)

    def dispersion(self, gene_ids_nt: Tensor) -> Tensor:
        """Inverse dispersion theta per decoded gene."""
        return torch.exp(self.log_theta_g[gene_ids_nt])  # (n, t)

    def flops_per_cell(self, n_gene_tokens: int, n_decode_genes: int) -> float:
        """Forward matmul FLOPs (2 x MACs) for one cell with s gene tokens and t decoded genes."""
        c = self.cfg
        d, m, z, r, s, t = c.d_model, c.n_latent_tokens, c.d_latent, c.mlp_ratio, n_gene_tokens, n_decode_genes
        macs = s * (d + d * d)  # value MLP
        macs += s * 2 * d * d if self.token_proj is not None else 0  # concat projection
        macs += _mcab_macs(m, s, d, r)  # pooling
        macs += c.n_encoder_layers * _self_block_macs(m, d, r)
        macs += m * d * z * (2 if c.variational else 1)  # mu (and logvar) heads
        macs += m * z * d  # latent_in
        macs += c.n_decoder_layers * _self_block_macs(m, d, r)
        macs += 2 * d * d + d  # library MLP
        r_unpool = self.unpool.mlp.fc1.out_features / d  # the width the unpooling MCAB was built with
        macs += _mcab_macs(t, m, d, r_unpool) + t * d  # unpooling and logit head
        macs += t * d if c.gene_readout else 0  # per-gene readout
        return 2.0 * macs
