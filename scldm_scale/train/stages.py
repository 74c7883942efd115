"""The two training stages. A stage decides the data, the model and the batch -> loss step;
the :class:`~scldm_scale.train.trainer.Trainer` does everything else.

- ``vae``: token batches of raw counts -> ScVAE -> negative-binomial reconstruction loss
  (+ library-size regression, + KL when variational).
- ``ldm``: batches of cached latents -> standardize -> per-attribute label dropout ->
  flow-matching loss of the DiT (convention in :mod:`scldm_scale.flow.interpolant`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from scldm_scale.api.run import export_path, load_export
from scldm_scale.config import DecodeGenes, Stage, derive
from scldm_scale.data.config import SourceKind
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.latent_cache import read_latent_stats
from scldm_scale.data.loader import build_source
from scldm_scale.errors import ScldmError
from scldm_scale.flow.guidance import drop_labels
from scldm_scale.flow.interpolant import TimeSampling
from scldm_scale.flow.loss import flow_matching_loss
from scldm_scale.nn.dit import DiT, DiTConfig
from scldm_scale.nn.likelihood import nb_log_prob
from scldm_scale.nn.vae import ScVAE, VAEConfig
from scldm_scale.train.export import json_artifact
from scldm_scale.train.sample_quality import SampleQuality, resolve_sample_reference


def _typed(section: DictConfig, cls):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), section))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def decode_targets(batch: dict[str, torch.Tensor], n_genes: int, mode: DecodeGenes, n_zero_genes: int,
                   generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Genes to reconstruct for each cell, their observed counts and importance weights.

    ALL: every vocabulary gene, weight 1. SAMPLED: the expressed genes (weight 1) plus
    ``n_zero_genes`` genes drawn uniformly (seeded); the drawn genes that are not expressed stand
    for all unexpressed genes of the cell, so each gets weight ``(#unexpressed) / (#drawn unexpressed)``
    and sums over genes stay unbiased.
    """
    gene_ids_ns, counts_ns, mask_ns = batch["gene_ids_ns"], batch["counts_ns"], batch["mask_ns"]
    n, device = gene_ids_ns.shape[0], gene_ids_ns.device
    if mode == DecodeGenes.ALL:
        target_ng = torch.zeros(n, n_genes, device=device)
        target_ng.scatter_add_(1, gene_ids_ns, counts_ns * mask_ns)  # padding adds 0
        return {
            "gene_ids_nt": torch.arange(n_genes, device=device).expand(n, n_genes),
            "target_nt": target_ng,
            "mask_nt": torch.ones(n, n_genes, dtype=torch.bool, device=device),
            "weight_nt": torch.ones(n, n_genes, device=device),
        }
    drawn_nk = torch.randint(0, n_genes, (n, n_zero_genes), device=device, generator=generator)
    expressed_ng = torch.zeros(n, n_genes, device=device).scatter_add_(1, gene_ids_ns, mask_ns.float()) > 0
    zero_nk = ~expressed_ng.gather(1, drawn_nk)
    n_unexpressed_n = (n_genes - mask_ns.sum(1)).float()
    zero_weight_n = n_unexpressed_n / zero_nk.sum(1).clamp(min=1)
    return {
        "gene_ids_nt": torch.cat([gene_ids_ns, drawn_nk], 1),
        "target_nt": torch.cat([counts_ns, torch.zeros_like(drawn_nk, dtype=counts_ns.dtype)], 1),
        "mask_nt": torch.cat([mask_ns, zero_nk], 1),
        "weight_nt": torch.cat([torch.ones_like(counts_ns), zero_weight_n[:, None].expand_as(drawn_nk)], 1),
    }


def vae_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], library_n: torch.Tensor,
             n_genes: int, kl_weight: float, library_loss_weight: float,
             library_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """NB NLL of the observed counts (mean = softmax over decoded genes x library size), plus the
    squared error of the predicted log library size in units of its spread in the data."""
    logits_nt = out["logits_nt"].float()
    mask_nt, weight_nt = targets["mask_nt"], targets["weight_nt"]
    log_w_nt = torch.where(mask_nt, weight_nt.clamp(min=1e-12).log(), torch.full_like(weight_nt, -math.inf))
    log_z_n = torch.logsumexp(logits_nt + log_w_nt, dim=1, keepdim=True)  # importance-weighted normalizer
    mu_nt = torch.exp(logits_nt - log_z_n) * library_n[:, None]
    ll_nt = nb_log_prob(targets["target_nt"], mu_nt, out["theta_nt"].float())
    nll_n = -(ll_nt * weight_nt * mask_nt).sum(1)
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
        self.model_cfg: VAEConfig = _typed(cfg.vae, VAEConfig)
        self.decode_mode = DecodeGenes(cfg.train.decode_genes)

    def build_model(self) -> nn.Module:
        return ScVAE(self.model_cfg)

    def build_source(self):
        return self.source

    def loss(self, engine, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        n_genes = self.model_cfg.n_genes
        targets = decode_targets(batch, n_genes, self.decode_mode, int(self.cfg.train.n_zero_genes), generator)
        dtype = next(engine.module.parameters()).dtype
        out = engine(batch["gene_ids_ns"], batch["counts_ns"].to(dtype), batch["mask_ns"],
                     targets["gene_ids_nt"], targets["mask_nt"])
        return vae_loss(out, targets, batch["library_size_n"], n_genes,
                        float(self.cfg.train.kl_weight), float(self.cfg.train.library_loss_weight),
                        self.model_cfg.log_library_scale)

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gene tokens of the batch (a device tensor: no host sync)."""
        return batch["mask_ns"].sum()

    def flops_per_cell(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
        n = batch["mask_ns"].shape[0]
        n_decode = self.model_cfg.n_genes if self.decode_mode == DecodeGenes.ALL else \
            int(batch["mask_ns"].sum()) // n + int(self.cfg.train.n_zero_genes)
        return 3.0 * model.flops_per_cell(int(batch["mask_ns"].sum()) // max(n, 1), n_decode)

    def export_artifacts(self) -> dict[str, Callable[[Path], Any]]:
        return {"vocab.json": self.vocab.save, "labels.json": self.labels.save}


# ---------------------------------------------------------------------------------------------
# LDM
# ---------------------------------------------------------------------------------------------


class LDMStage:
    name = Stage.LDM

    def __init__(self, cfg: DictConfig) -> None:
        if not cfg.ldm.vae_run:
            raise ScldmError("run.stage=ldm needs ldm.vae_run=<run dir of the trained VAE>")
        self.vae_export = export_path(cfg.ldm.vae_run)
        vae_cfg, _ = load_export(cfg.ldm.vae_run)
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
        self.model_cfg: DiTConfig = _typed(cfg.dit, DiTConfig)
        stats = read_latent_stats(latents)
        self.stats = stats
        self.mean_mz = torch.tensor(stats["mean"], dtype=torch.float32).reshape(vae.n_latent_tokens, vae.d_latent)
        self.std_mz = torch.tensor(stats["std"], dtype=torch.float32).reshape(vae.n_latent_tokens, vae.d_latent)
        self.null_codes = list(self.model_cfg.label_cardinalities)
        self.drop_probs = [float(p) for p in cfg.flow.label_dropout]
        self.time_sampling = TimeSampling(cfg.flow.time_sampling)

    def build_model(self) -> nn.Module:
        return DiT(self.model_cfg)

    def build_source(self):
        return build_source(self.cfg.data, labels=self.labels)

    def loss(self, engine, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        z_nmz = batch["z_nmz"].float()
        x1_nmz = (z_nmz - self.mean_mz.to(z_nmz.device)) / self.std_mz.to(z_nmz.device)
        labels_na = drop_labels(batch["labels_na"], self.drop_probs, self.null_codes, generator)
        dtype = next(engine.module.parameters()).dtype
        out = flow_matching_loss(
            lambda x_nmz, t_n: engine(x_nmz.to(dtype), t_n.to(dtype), labels_na).float(),
            x1_nmz, generator, self.time_sampling,
        )
        return {"loss": out["loss"]}

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent tokens of the batch."""
        return torch.tensor(float(batch["z_nmz"].shape[0] * batch["z_nmz"].shape[1]))

    def flops_per_cell(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
        return 3.0 * model.flops_per_cell()

    def sample_quality(self, device: torch.device) -> SampleQuality:
        """The rank-0 check behind ``train.sample_every`` (generated vs held-out cells)."""
        return SampleQuality(self, device)

    def export_artifacts(self) -> dict[str, Callable[[Path], Any]]:
        return {
            "labels.json": self.labels.save,
            "latent_stats.json": json_artifact(self.stats),
            "vae_run.json": json_artifact({"vae_run": str(Path(self.cfg.ldm.vae_run).resolve())}),
        }


def build_stage(cfg: DictConfig):
    stage = Stage(cfg.run.stage)
    return VAEStage(cfg) if stage == Stage.VAE else LDMStage(cfg)
