"""Set autoencoder over (gene, count) tokens: MCAB pooling encoder, MCAB unpooling NB decoder."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.nn.mcab import MCAB, GeluLinear, SelfAttentionBlock, rowwise
from scldm_scale.nn.packing import Packing


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
    # genes per chunk when decoding a dense gene list (all genes: evaluation, generation, or training
    # with train.decode_genes=all, where each chunk is recomputed in the backward pass)
    decode_chunk_size: int = 4096
    # the row-wise work over packed rows (token embedding; unpooling MLP and NB head) runs in this many
    # chunks: smaller temporary buffers, same result (a count, not a size: every step then calls the
    # same modules in the same order, which DeepSpeed ZeRO-3 records)
    row_chunks: int = 16
    activation_checkpointing: bool = False  # recompute every block in the backward pass (less memory)


# Named sizes in the style of DiT (S/B/L/XL): width, heads and depth grow together; the latent
# self-attention depth is split evenly between encoder and decoder (DiT-S/B: 12 blocks, L: 24,
# XL: 28). vae-xs is the CPU quickstart size.
VAE_PRESETS: dict[str, dict] = {
    "vae-xs": dict(d_model=64, n_heads=4, n_latent_tokens=8, d_latent=8, n_encoder_layers=1, n_decoder_layers=1),
    "vae-s": dict(d_model=384, n_heads=6, n_latent_tokens=16, d_latent=16, n_encoder_layers=6, n_decoder_layers=6),
    "vae-b": dict(d_model=768, n_heads=12, n_latent_tokens=32, d_latent=32, n_encoder_layers=6,
                  n_decoder_layers=6),
    "vae-l": dict(d_model=1024, n_heads=16, n_latent_tokens=64, d_latent=32, n_encoder_layers=12,
                  n_decoder_layers=12),
    "vae-xl": dict(d_model=1152, n_heads=16, n_latent_tokens=64, d_latent=64, n_encoder_layers=14,
                   n_decoder_layers=14),
}


# --------------------------------------------------------------------------- FLOPs


def _mcab_macs(n_q: float, n_k: float, d: int, d_hidden: int) -> float:
    proj = n_q * d * d + n_k * d * 2 * d + n_q * d * d  # q, kv, out projections
    attn = 2 * n_q * n_k * d  # scores and weighted values
    mlp = 2 * n_q * d * d_hidden
    return float(proj + attn + mlp)


def _self_block_macs(m: int, d: int, d_hidden: int) -> float:
    return float(m * d * 3 * d + m * d * d + 2 * m * m * d + 2 * m * d * d_hidden)  # qkv, out, attention, MLP


def vae_forward_flops(cfg: VAEConfig, n_tokens: float, n_decoded: float) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) of one cell with ``n_tokens`` expressed-gene tokens
    and ``n_decoded`` decoded genes. Counts what runs: the per-token and per-decoded-gene work on
    real rows only (packed batches), attention over the real keys."""
    d, m, z, s, t = cfg.d_model, cfg.n_latent_tokens, cfg.d_latent, n_tokens, n_decoded
    hidden = int(d * cfg.mlp_ratio)
    unpool_hidden = int(d * (cfg.unpool_mlp_ratio or cfg.mlp_ratio))
    macs = s * (d + d * d)  # value MLP
    macs += s * 2 * d * d if cfg.value_embedding == ValueEmbedding.CONCAT else 0  # concat projection
    macs += _mcab_macs(m, s, d, hidden)  # pooling
    macs += cfg.n_encoder_layers * _self_block_macs(m, d, hidden)
    macs += m * d * z * (2 if cfg.variational else 1)  # mu (and logvar) heads
    macs += m * z * d  # latent_in
    macs += cfg.n_decoder_layers * _self_block_macs(m, d, hidden)
    macs += d * d + d  # library MLP
    macs += _mcab_macs(t, m, d, unpool_hidden) + t * d  # unpooling and logit head
    macs += t * d if cfg.gene_readout else 0  # per-gene readout
    return 2.0 * macs


def vae_train_flops(cfg: VAEConfig, n_tokens: float, n_decoded: float) -> float:
    """Forward + backward FLOPs of one cell (backward = 2 x forward: input and weight gradients)."""
    return 3.0 * vae_forward_flops(cfg, n_tokens, n_decoded)


# --------------------------------------------------------------------------- model


def per_10k(counts: Tensor, tokens: Packing | None = None) -> Tensor:
    """Counts per 10,000 of the cell's total over its tokens: padded (n, s) (padding must hold 0),
    or packed (T,) with the tokens' :class:`Packing`."""
    if tokens is None:
        return counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0) * 1e4  # (n, s)
    total_n = tokens.segment_sum(counts).clamp(min=1.0)  # (n,)
    return counts / total_n[tokens.seq_ids] * 1e4  # (T,)


class ScVAE(nn.Module):
    """Permutation-invariant set autoencoder with a negative-binomial decoder.

    Two input layouts, same results: padded batches (``gene_ids_ns``, ``counts_ns``, ``mask_ns``)
    and packed ones (the real tokens of all cells, ``gene_ids_t`` / ``counts_t`` with their
    :class:`Packing`), where the per-token work runs on real tokens only. The decoder likewise takes
    dense gene lists (``gene_ids_nt``, in chunks of ``decode_chunk_size`` genes) or packed decoded
    rows (``gene_ids_r`` with their packing: a different gene list per cell, no padding).

    Parameters are only used inside the forward of the module that owns them (ZeRO-3 gathers a
    module's parameters around its forward).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.n_genes <= 0:
            raise ValueError(f"VAEConfig.n_genes must be > 0 (got {cfg.n_genes}); fill it from the gene vocabulary")
        if cfg.n_encoder_layers < 0 or cfg.n_decoder_layers < 0:
            raise ValueError(f"vae.n_encoder_layers / vae.n_decoder_layers must be >= 0 (got {cfg.n_encoder_layers} / "
                             f"{cfg.n_decoder_layers}); 0 means no self-attention between the MCABs")
        if cfg.decode_chunk_size < 1 or cfg.row_chunks < 1:
            raise ValueError(f"vae.decode_chunk_size / vae.row_chunks must be >= 1 (got {cfg.decode_chunk_size} / "
                             f"{cfg.row_chunks})")
        self.cfg = cfg
        d, m, z = cfg.d_model, cfg.n_latent_tokens, cfg.d_latent
        blk = dict(n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)

        # tokenizer (the gene table is shared by the encoder tokens and the decoder queries)
        self.gene_embedding = nn.Embedding(cfg.n_genes, d)
        # Linear -> GELU -> Linear, the GELU recomputed in the backward pass (same state dict as with nn.GELU)
        self.value_mlp = nn.Sequential(nn.Linear(1, d), nn.Identity(), GeluLinear(d, d))
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

    def _block(self, block: nn.Module, *args: Tensor | Packing | None) -> Tensor:
        if self.cfg.activation_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------ encoder

    def tokenize(self, gene_ids: Tensor, counts: Tensor, tokens: Packing | None = None) -> Tensor:
        """Gene embedding combined with an embedding of log1p(count) (optionally depth-normalized).

        Padded ``(n, s)`` ids and counts, or packed ``(T,)`` with ``tokens`` (embedded in
        ``row_chunks`` chunks); returns ``(..., d)``.
        """
        values = counts.float()  # per-cell totals in fp32 whatever the model's dtype
        if self.cfg.value_input == ValueInput.LOG1P_CP10K:
            values = per_10k(values, tokens)  # (n, s) or (T,)
        log_values = torch.log1p(values).to(self.gene_embedding.weight.dtype)  # (n, s) or (T,)
        chunks = self.cfg.row_chunks if tokens is not None else 0
        return rowwise(self.embed_tokens, chunks, gene_ids, log_values)  # (n, s, d) or (T, d)

    def embed_tokens(self, gene_ids: Tensor, log_values: Tensor) -> Tensor:
        """Token embedding of genes and their (transformed) values, row by row."""
        gene_sd = self.gene_embedding(gene_ids)  # (n, s, d) or (T, d)
        value_sd = self.value_mlp(log_values.unsqueeze(-1))  # (n, s, d) or (T, d)
        if self.token_proj is None:  # MULTIPLY
            return gene_sd * value_sd  # (n, s, d) or (T, d)
        return self.token_proj(torch.cat([gene_sd, value_sd], dim=-1))  # (n, s, d) or (T, d)

    def pool_bias(self, counts: Tensor, mask_ns: Tensor | None = None, tokens: Packing | None = None) -> Tensor | None:
        """Log-prior of the pooling attention over a cell's gene tokens (None for a uniform start).

        EXPRESSION: ``log(log1p(cp10k))``, so the pooled tokens start as an expression-weighted
        average of the cell's genes (a depth-normalized linear summary of the profile) and the
        learned scores refine it. Padded ``(n, s)`` counts with ``mask_ns`` (computed over the
        unmasked tokens only), or packed ``(T,)`` counts with ``tokens``.
        """
        if self.cfg.pool_prior == PoolPrior.UNIFORM:
            return None
        counts = counts.float() if mask_ns is None else counts.float() * mask_ns
        return torch.log1p(per_10k(counts, tokens)).clamp(min=1e-6).log()  # (n, s) or (T,)

    def encode(self, gene_ids_ns: Tensor, counts_ns: Tensor, mask_ns: Tensor) -> dict:
        """Padded batch -> ``{"z_nmz", "mu_nmz", "logvar_nmz"}`` (logvar None unless variational)."""
        n = gene_ids_ns.shape[0]
        tokens_nsd = self.tokenize(gene_ids_ns, counts_ns)  # (n, s, d)
        queries_nmd = self.latent_queries.unsqueeze(0).expand(n, -1, -1)  # (n, m, d)
        bias_ns = self.pool_bias(counts_ns, mask_ns)  # (n, s) or None
        h_nmd = self._block(self.pool, queries_nmd, tokens_nsd, mask_ns, bias_ns)  # (n, m, d)
        return self._latents(h_nmd)

    def encode_packed(self, gene_ids_t: Tensor, counts_t: Tensor, tokens: Packing) -> dict:
        """Packed tokens (the expressed genes of all cells, ``tokens`` says whose) -> latents, as
        :meth:`encode`. Value embedding, key/value projections and pooling run on real tokens only."""
        tokens_td = self.tokenize(gene_ids_t, counts_t, tokens)  # (T, d)
        queries_nmd = self.latent_queries.unsqueeze(0).expand(tokens.n, -1, -1)  # (n, m, d)
        bias_t = self.pool_bias(counts_t, tokens=tokens)  # (T,) or None
        h_nmd = self._block(self.pool, queries_nmd, tokens_td, None, bias_t, None, None, tokens)  # (n, m, d)
        return self._latents(h_nmd)

    def _latents(self, h_nmd: Tensor) -> dict:
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

    def decoder_trunk(self, z_nmz: Tensor) -> tuple[Tensor, Tensor]:
        """Latents -> the m decoder tokens the unpooling reads, and the predicted log library size."""
        h_nmd = self.latent_in(z_nmz) + self.latent_pos  # (n, m, d)
        for block in self.decoder_blocks:
            h_nmd = self._block(block, h_nmd)  # (n, m, d)
        library_std_n = self.library_head(h_nmd.mean(dim=1)).squeeze(-1)  # (n,) standardized
        log_library_n = self.cfg.log_library_loc + self.cfg.log_library_scale * library_std_n  # (n,)
        return h_nmd, log_library_n

    def unpool_logits(self, h_nmd: Tensor, gene_ids: Tensor, gene_mask: Tensor | None = None,
                      rows: Packing | None = None) -> Tensor:
        """NB logits of genes given the decoder tokens: dense ``(n, c)`` gene ids (optional mask), or
        packed ``(R,)`` rows with their packing. A gene's query does not depend on the cell, so when
        there are more rows than vocabulary genes its projection is computed per gene and gathered."""
        chunks = self.cfg.row_chunks if rows is not None else 0
        if gene_ids.numel() > self.cfg.n_genes:  # more rows than genes: norm + q projection once per gene
            all_genes_g = torch.arange(self.cfg.n_genes, device=gene_ids.device)
            table_gd = self.gene_embedding(all_genes_g)  # (g, d) through the module (ZeRO-3 gathers it there)
            q_cd = self._block(self.unpool, table_gd, h_nmd, None, None, gene_mask, rows, None, gene_ids, chunks)
        else:
            q_cd = self.gene_embedding(gene_ids)  # (n, c, d) or (R, d)
            q_cd = self._block(self.unpool, q_cd, h_nmd, None, None, gene_mask, rows, None, None, chunks)
        return rowwise(lambda u_cd, ids_c: self.nb_logits(self.decoder_norm(u_cd), ids_c), chunks, q_cd,
                       gene_ids)  # (n, c) or (R,)

    def decode(self, z_nmz: Tensor, gene_ids_nt: Tensor, gene_mask_nt: Tensor | None = None) -> dict:
        """Logit per requested gene and predicted log library size: ``{"logits_nt", "log_library_n"}``.

        Genes are decoded in chunks of ``decode_chunk_size``; with gradients (training on many
        genes) each chunk's unpooling is recomputed in the backward pass instead of being kept, so
        memory is O(n x chunk) whatever the number of genes. Masked genes (``gene_mask_nt`` False)
        get logit 0; ``nb_mean`` ignores them.
        """
        h_nmd, log_library_n = self.decoder_trunk(z_nmz)
        ids_chunks = gene_ids_nt.split(self.cfg.decode_chunk_size, dim=1)
        mask_chunks = (gene_mask_nt.split(self.cfg.decode_chunk_size, dim=1) if gene_mask_nt is not None
                       else (None,) * len(ids_chunks))
        recompute = len(ids_chunks) > 1 and torch.is_grad_enabled()
        chunks = []
        for gene_ids_nc, mask_nc in zip(ids_chunks, mask_chunks):
            if recompute:
                chunks.append(checkpoint(self.unpool_logits, h_nmd, gene_ids_nc, mask_nc, use_reentrant=False))
            else:
                chunks.append(self.unpool_logits(h_nmd, gene_ids_nc, mask_nc))  # (n, c)
        logits_nt = torch.cat(chunks, dim=1)  # (n, t)
        if gene_mask_nt is not None:
            logits_nt = logits_nt.masked_fill(~gene_mask_nt, 0.0)
        return {"logits_nt": logits_nt, "log_library_n": log_library_n}

    def decode_packed(self, z_nmz: Tensor, gene_ids_r: Tensor, rows: Packing) -> dict:
        """Logits of packed decoded rows (each cell its own genes, ``rows`` says whose):
        ``{"logits_r", "log_library_n"}``. No padded row costs any per-row work."""
        h_nmd, log_library_n = self.decoder_trunk(z_nmz)
        return {"logits_r": self.unpool_logits(h_nmd, gene_ids_r, rows=rows), "log_library_n": log_library_n}

    def nb_logits(self, u_cd: Tensor, gene_ids: Tensor) -> Tensor:
        """NB head: shared logit head, plus the gene's own readout and bias when ``gene_readout``."""
        logits_c = self.logit_head(u_cd).squeeze(-1)  # (n, c) or (R,)
        if self.readout_gd is None:
            return logits_c
        readout_cd = self.readout_gd[gene_ids]  # (n, c, d) or (R, d)
        return logits_c + (u_cd * readout_cd).sum(-1) + self.logit_bias_g[gene_ids]  # (n, c) or (R,)

    # ------------------------------------------------------------------ training forward

    def forward(self, gene_ids: Tensor, counts: Tensor, tokens: Tensor | Packing, decode_gene_ids: Tensor,
                decode: Tensor | Packing | None = None) -> dict:
        """Encode the expressed genes, decode the requested ones; the loss is computed outside.

        Padded tokens: ``gene_ids`` / ``counts`` (n, s) and ``tokens`` the mask (n, s); packed tokens:
        (T,) and ``tokens`` their :class:`Packing`. Decoded genes: dense ``(n, t)`` ids with
        ``decode`` None or a gene mask (n, t) -> ``logits_nt``, ``theta_nt``; packed ``(R,)`` rows with
        ``decode`` their packing -> ``logits_r``, ``theta_r``. Plus the encoder outputs and
        ``log_library_n``. One forward through the module (not separate method calls) so that
        wrappers that hook ``forward`` (DeepSpeed ZeRO-3 parameter gathering) see every parameter.
        """
        if isinstance(tokens, Packing):
            out = self.encode_packed(gene_ids, counts, tokens)
        else:
            out = self.encode(gene_ids, counts, tokens)
        if isinstance(decode, Packing):
            out.update(self.decode_packed(out["z_nmz"], decode_gene_ids, decode))  # logits_r (R,)
            out["theta_r"] = self.dispersion(decode_gene_ids)  # (R,)
        else:
            out.update(self.decode(out["z_nmz"], decode_gene_ids, decode))  # logits_nt (n, t)
            out["theta_nt"] = self.dispersion(decode_gene_ids)  # (n, t)
        return out

    def nb_mean(self, logits_nt: Tensor, library_n: Tensor, gene_mask_nt: Tensor | None = None) -> Tensor:
        """NB mean: softmax over the decoded (unmasked) genes times the library size; 0 where masked."""
        if gene_mask_nt is None:
            return torch.softmax(logits_nt, dim=-1) * library_n.unsqueeze(-1)  # (n, t)
        logits_nt = logits_nt.masked_fill(~gene_mask_nt, torch.finfo(logits_nt.dtype).min)
        p_nt = torch.softmax(logits_nt, dim=-1) * gene_mask_nt  # (n, t)
        return p_nt * library_n.unsqueeze(-1)  # (n, t)

    def dispersion(self, gene_ids: Tensor) -> Tensor:
        """Inverse dispersion theta per decoded gene (any shape of gene ids)."""
        return torch.exp(self.log_theta_g[gene_ids])  # (n, t) or (R,)

    def flops_per_cell(self, n_gene_tokens: float, n_decode_genes: float) -> float:
        """Forward matmul FLOPs for one cell with s gene tokens and t decoded genes
        (:func:`vae_forward_flops` of this model's config)."""
        return vae_forward_flops(self.cfg, n_gene_tokens, n_decode_genes)
