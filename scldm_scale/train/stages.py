"""The two training stages. A stage decides the data, the model and the batch -> loss step;
the :class:`~scldm_scale.train.trainer.Trainer` does everything else.

- ``vae``: packed token batches of raw counts -> ScVAE -> negative-binomial reconstruction loss of
  the expressed genes and sampled unexpressed ones (+ library-size regression, + KL when variational).
- ``ldm``: batches of cached latents -> standardize -> per-attribute label dropout ->
  flow-matching loss of the DiT (convention in :mod:`scldm_scale.flow.interpolant`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from scldm_scale.api.run import export_path, load_export_config
from scldm_scale.config import DecodeGenes, Stage, derive, run_dir, typed_section
from scldm_scale.data.config import SourceKind
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.latent_cache import read_latent_stats
from scldm_scale.data.loader import build_source
from scldm_scale.errors import ScldmError
from scldm_scale.flow.guidance import drop_labels
from scldm_scale.flow.interpolant import TimeSampling
from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.nn.dit import DiT, DiTConfig, dit_train_flops
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.packing import Packing
from scldm_scale.nn.speed import compile_blocks
from scldm_scale.nn.vae import ScVAE, VAEConfig, vae_train_flops
from scldm_scale.train.export import json_artifact
from scldm_scale.train.sample_quality import SampleQuality, resolve_sample_reference


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


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


class VAEStage:
    name = Stage.VAE

    def __init__(self, cfg: DictConfig) -> None:
        if SourceKind(cfg.data.source) == SourceKind.LATENTS:
            raise ScldmError(
                "run.stage=vae needs count data; set data.source=h5ad, soma or mixture (latents are for run.stage=ldm)"
            )
        self.cfg = cfg
        self.source = build_source(cfg.data)  # checks the data (shards, experiment, members) as it opens it
        self.vocab, self.labels = self.source.vocab, self.source.labels
        derive(cfg, n_genes=len(self.vocab), label_cardinalities=self.labels.cardinalities,
               log_library=self.source.library_size_stats())
        self.model_cfg: VAEConfig = typed_section(cfg.vae, VAEConfig)
        self.decode_mode = DecodeGenes(cfg.train.decode_genes)

    padded_batches = False  # the loader hands packed token batches (tokenize.COMPACT_KEYS)

    def build_model(self) -> nn.Module:
        model = ScVAE(self.model_cfg)
        if self.cfg.model.compile:
            compile_blocks(model)
        return model

    def build_source(self):
        return self.source

    def loss(self, engine, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        n_genes = self.model_cfg.n_genes
        tokens = token_packing(batch)
        targets = decode_targets(batch, tokens, n_genes, self.decode_mode, int(self.cfg.train.n_zero_genes), generator)
        dtype = next(engine.module.parameters()).dtype
        out = engine(batch["gene_ids_t"], batch["counts_t"].to(dtype), tokens, targets["gene_ids"], targets["rows"])
        return vae_loss(out, targets, batch["library_size_n"], n_genes,
                        float(self.cfg.train.kl_weight), float(self.cfg.train.library_loss_weight),
                        self.model_cfg.log_library_scale)

    def tokens(self, batch: dict[str, Any]) -> int:
        """Gene tokens of the batch (its packed length: no host sync)."""
        return batch["gene_ids_t"].shape[0]

    def flops_per_cell(self, model: nn.Module, batch: dict[str, Any]) -> float:  # noqa: ARG002
        """Forward + backward FLOPs per cell of a batch (from shapes: no device sync)."""
        n = max(batch["length_n"].shape[0], 1)
        tokens = batch["gene_ids_t"].shape[0] / n
        n_decode = self.model_cfg.n_genes if self.decode_mode == DecodeGenes.ALL else \
            tokens + int(self.cfg.train.n_zero_genes)
        return vae_train_flops(self.model_cfg, tokens, n_decode)

    def export_artifacts(self) -> dict[str, Callable[[Path], Any]]:
        return {"vocab.json": self.vocab.save, "labels.json": self.labels.save}


# ---------------------------------------------------------------------------------------------
# LDM
# ---------------------------------------------------------------------------------------------


class LDMStage:
    name = Stage.LDM
    padded_batches = True  # latent batches have no tokens to pack

    def __init__(self, cfg: DictConfig) -> None:
        if not cfg.ldm.vae_run:
            raise ScldmError("run.stage=ldm needs ldm.vae_run=<run dir of the trained VAE>")
        self.vae_export = export_path(cfg.ldm.vae_run)
        vae_cfg = load_export_config(cfg.ldm.vae_run)
        latents = cfg.ldm.latents or str(Path(cfg.ldm.vae_run) / "latents")
        if not (Path(latents) / "manifest.json").is_file():
            raise ScldmError(f"{latents}: no latent cache (manifest.json); run `scldm-scale encode` on the VAE run first")
        cfg.ldm.latents = latents
        cfg.ldm.sample_reference = resolve_sample_reference(str(cfg.ldm.sample_reference), vae_cfg.data.path,
                                                            int(cfg.train.sample_every))
        cfg.data.source = SourceKind.LATENTS
        cfg.data.path = latents
        self.cfg = cfg
        self.labels = LabelTables.load(self.vae_export / "labels.json")
        cfg.data.label_columns = list(self.labels.attributes)
        vae = vae_cfg.vae
        derive(cfg, label_cardinalities=self.labels.cardinalities, vae=vae)
        self.model_cfg: DiTConfig = typed_section(cfg.dit, DiTConfig)
        stats = read_latent_stats(latents)
        self.stats = stats
        self.mean_mz = torch.tensor(stats["mean"], dtype=torch.float32).reshape(vae.n_latent_tokens, vae.d_latent)
        self.std_mz = torch.tensor(stats["std"], dtype=torch.float32).reshape(vae.n_latent_tokens, vae.d_latent)
        self.null_codes = list(self.model_cfg.label_cardinalities)
        self.drop_probs = [float(p) for p in cfg.flow.label_dropout]
        self._device_consts: tuple[torch.Tensor, ...] | None = None
        self.time_sampling = TimeSampling(cfg.flow.time_sampling)

    def build_model(self) -> nn.Module:
        model = DiT(self.model_cfg)
        if self.cfg.model.compile:
            compile_blocks(model)
        return model

    def build_source(self):
        return build_source(self.cfg.data, labels=self.labels)

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Latent mean/std, label-drop probabilities and null codes on ``device``, copied once (a copy
        from host memory at every step would wait for the GPU)."""
        if self._device_consts is None or self._device_consts[0].device != device:
            self._device_consts = (self.mean_mz.to(device), self.std_mz.to(device),
                                   torch.tensor(self.drop_probs, dtype=torch.float32).to(device),
                                   torch.tensor(self.null_codes, dtype=torch.long).to(device))
        return self._device_consts

    def loss(self, engine, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        z_nmz = batch["z_nmz"].float()
        mean_mz, std_mz, drop_probs_a, null_codes_a = self._on_device(z_nmz.device)
        x1_nmz = (z_nmz - mean_mz) / std_mz  # (n, m, z) standardized
        labels_na = drop_labels(batch["labels_na"], drop_probs_a, null_codes_a, generator)
        dtype = next(engine.module.parameters()).dtype
        out = flow_matching_loss(
            lambda x_nmz, t_n: engine(x_nmz.to(dtype), t_n.to(dtype), labels_na).float(),
            x1_nmz, generator, self.time_sampling,
        )
        return {"loss": out["loss"]}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Latent tokens of the batch."""
        return batch["z_nmz"].shape[0] * batch["z_nmz"].shape[1]

    def flops_per_cell(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> float:  # noqa: ARG002
        return dit_train_flops(self.model_cfg)

    def sample_quality(self, device: torch.device) -> SampleQuality:
        """The rank-0 check behind ``train.sample_every`` (generated vs held-out cells)."""
        return SampleQuality(self, device)

    def export_artifacts(self) -> dict[str, Callable[[Path], Any]]:
        return {
            "labels.json": self.labels.save,
            "latent_stats.json": json_artifact(self.stats),
            # absolute, and relative to this run, so that the pair of runs can move together
            "vae_run.json": json_artifact({"vae_run": str(Path(self.cfg.ldm.vae_run).resolve()),
                                           "vae_run_relative": os.path.relpath(Path(self.cfg.ldm.vae_run).resolve(),
                                                                               run_dir(self.cfg).resolve())}),
        }


def build_stage(cfg: DictConfig):
    stage = Stage(cfg.run.stage)
    return VAEStage(cfg) if stage == Stage.VAE else LDMStage(cfg)
