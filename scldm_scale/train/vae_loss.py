"""The VAE's training loss, outside the model: which genes each cell of a packed batch decodes
(its expressed genes and sampled unexpressed ones, importance-weighted) and the weighted
negative-binomial reconstruction loss with the library-size term (+ KL when variational).

Plain torch on top of :mod:`scldm_scale.nn`: the training stage, the benchmarks and the tests use
it without the data layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from scldm_scale.config import DecodeGenes
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.packing import Packing


def token_packing(batch: dict[str, Any]) -> Packing:
    """The :class:`Packing` of a packed token batch (:data:`~scldm_scale.data.tokenize.COMPACT_KEYS`)."""
    return Packing.from_lengths(batch["length_n"], int(batch["max_length"]), batch["gene_ids_t"].shape[0])


def decode_targets(batch: dict[str, Any], tokens: Packing, n_genes: int, mode: DecodeGenes, n_zero_genes: int,
                   generator: torch.Generator | None) -> dict[str, Any]:
    """Genes to reconstruct for each cell of a packed batch, their observed counts and weights.

    Returns ``gene_ids``, ``target``, ``weight`` (0 = not scored) and ``rows``: the :class:`Packing`
    of packed decoded rows, or None for a dense ``(n, g)`` layout.

    ALL: every vocabulary gene, weight 1; the targets hold the counts of the kept tokens and of the
    tokens the ``max_genes`` cap dropped (the encoder did not see them, the decoder scores them).
    SAMPLED: per cell, its kept tokens and ``n_zero_genes`` genes drawn uniformly (seeded), packed
    cell after cell (``expressed..., drawn...``). A drawn gene the cell expresses (kept or dropped)
    is not scored; the others stand for all unexpressed genes of the cell, each with weight
    ``(#unexpressed) / (#drawn unexpressed)``, and the kept tokens for all expressed genes, each with
    weight ``(#expressed) / (#kept)`` (1 unless the cap dropped some). Sums over genes (the NB
    log-likelihood, the softmax normalizer) stay unbiased, and nothing is of size ``n x n_genes``.
    """
    gene_ids_t, counts_t = batch["gene_ids_t"], batch["counts_t"].float()
    dropped_len_n, dropped_ids_e = batch["dropped_length_n"], batch["dropped_gene_ids_e"]
    n, device = tokens.n, gene_ids_t.device
    dropped_cell_e = torch.repeat_interleave(torch.arange(n, device=device), dropped_len_n,
                                             output_size=dropped_ids_e.shape[0])  # (E,)
    if mode == DecodeGenes.ALL:
        target_ng = torch.zeros(n, n_genes, device=device)
        target_ng.index_put_((tokens.seq_ids, gene_ids_t), counts_t, accumulate=True)
        target_ng.index_put_((dropped_cell_e, dropped_ids_e), batch["dropped_counts_e"].float(), accumulate=True)
        return {"gene_ids": torch.arange(n_genes, device=device).expand(n, n_genes), "target": target_ng,
                "weight": torch.ones(n, n_genes, device=device), "rows": None}
    k, total = int(n_zero_genes), tokens.total
    drawn_nk = torch.randint(0, n_genes, (n, k), device=device, generator=generator)
    # which drawn genes the cell expresses: search (cell, gene) keys among the sorted expressed ones
    expressed_keys = torch.cat([tokens.seq_ids * n_genes + gene_ids_t, dropped_cell_e * n_genes + dropped_ids_e])
    drawn_keys_nk = torch.arange(n, device=device)[:, None] * n_genes + drawn_nk  # (n, k)
    if expressed_keys.numel():
        sorted_keys = expressed_keys.sort().values
        at_nk = torch.searchsorted(sorted_keys, drawn_keys_nk).clamp(max=sorted_keys.numel() - 1)
        zero_nk = sorted_keys[at_nk] != drawn_keys_nk  # (n, k) drawn and not expressed
    else:
        zero_nk = torch.ones_like(drawn_nk, dtype=torch.bool)
    n_expressed_n = (tokens.lengths + dropped_len_n).float()  # (n,)
    zero_weight_n = (n_genes - n_expressed_n) / zero_nk.sum(1).clamp(min=1)  # (n,)
    kept_weight_n = n_expressed_n / tokens.lengths.clamp(min=1)  # (n,)
    # rows of cell c: its kept tokens, then its k drawn genes
    rows = Packing.from_lengths(tokens.lengths + k, tokens.max_len + k, total + n * k)
    token_row_t = torch.arange(total, device=device) + tokens.seq_ids * k  # (T,)
    drawn_row_k = (tokens.cu_seqlens[1:, None].long() + torch.arange(n, device=device)[:, None] * k
                   + torch.arange(k, device=device)[None, :]).reshape(-1)  # (n*k,)
    rows_of = (token_row_t, drawn_row_k, rows.total)
    return {
        "gene_ids": _place_rows(gene_ids_t, drawn_nk, *rows_of),
        "target": _place_rows(counts_t, torch.zeros(n, k, device=device), *rows_of),
        "weight": _place_rows(kept_weight_n[tokens.seq_ids], zero_weight_n[:, None] * zero_nk, *rows_of),
        "rows": rows,
    }


def _place_rows(on_tokens_t: torch.Tensor, on_drawn_nk: torch.Tensor, token_row_t: torch.Tensor,
                drawn_row_k: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Packed decoded rows from per-token and per-drawn-gene values, at their rows."""
    out_r = on_tokens_t.new_zeros(n_rows)
    out_r[token_row_t] = on_tokens_t
    out_r[drawn_row_k] = on_drawn_nk.reshape(-1).to(out_r.dtype)
    return out_r  # (R,)


def nb_nll_per_cell(logits_r: torch.Tensor, theta_r: torch.Tensor, target_r: torch.Tensor, weight_r: torch.Tensor,
                    rows: Packing, library_n: torch.Tensor) -> torch.Tensor:
    """Weighted NB negative log-likelihood of each cell's decoded rows, (n,). The NB mean is the
    softmax over the cell's scored rows (importance-weighted normalizer) times its library size."""
    scored_r = weight_r > 0
    log_w_r = torch.where(scored_r, weight_r.clamp(min=1e-12).log(), torch.full_like(weight_r, -math.inf))
    log_z_n = rows.segment_logsumexp(logits_r + log_w_r)  # (n,) importance-weighted normalizer
    mu_r = torch.exp(logits_r - log_z_n[rows.seq_ids]) * library_n[rows.seq_ids]  # (R,)
    ll_r = nb_log_prob(target_r, mu_r, theta_r)  # (R,)
    return -rows.segment_sum(torch.where(scored_r, ll_r * weight_r, torch.zeros_like(ll_r)))  # (n,)


def vae_loss(out: dict[str, torch.Tensor], targets: dict[str, Any], library_n: torch.Tensor,
             n_genes: int, kl_weight: float, library_loss_weight: float,
             library_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """NB NLL of the observed counts (mean = softmax over decoded genes x library size), plus the
    squared error of the predicted log library size in units of its spread in the data.

    ``out`` holds ``logits_r`` / ``theta_r`` for packed decoded rows (``targets["rows"]``) or
    ``logits_nt`` / ``theta_nt`` for a dense layout (``targets["rows"]`` None)."""
    if targets["rows"] is not None:
        rows, logits_r, theta_r = targets["rows"], out["logits_r"], out["theta_r"]
    else:
        n, t = out["logits_nt"].shape
        rows = Packing.fixed(n, t, out["logits_nt"].device)
        logits_r, theta_r = out["logits_nt"].reshape(-1), out["theta_nt"].reshape(-1)
    library_n = library_n.float()
    nll_n = nb_nll_per_cell(logits_r.float(), theta_r.float(), targets["target"].reshape(-1).float(),
                            targets["weight"].reshape(-1).float(), rows, library_n)
    recon = nll_n.mean() / n_genes
    library = F.mse_loss(out["log_library_n"].float(), torch.log(library_n.clamp(min=1.0))) / library_scale**2
    terms = {"nll_per_cell": nll_n.mean().detach(), "recon": recon, "library_mse": library}
    loss = recon + library_loss_weight * library
    if out.get("logvar_nmz") is not None:
        mu, logvar = out["mu_nmz"].float(), out["logvar_nmz"].float()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum((1, 2)).mean() / n_genes
        terms["kl"] = kl
        loss = loss + kl_weight * kl
    terms["loss"] = loss
    return terms
