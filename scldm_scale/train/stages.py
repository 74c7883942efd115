"""The two training stages. A stage decides the data, the model and the batch -> loss step;
the :class:`~scldm_scale.train.trainer.Trainer` does everything else.

- ``vae``: packed token batches of raw counts -> ScVAE -> negative-binomial reconstruction loss of
  the expressed genes and sampled unexpressed ones (+ library-size regression, + KL when variational).
- ``ldm``: batches of cached latents -> standardize -> per-attribute label dropout ->
  flow-matching loss of the DiT (convention in :mod:`scldm_scale.flow.interpolant`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
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
from scldm_scale.nn.speed import compile_blocks
from scldm_scale.nn.vae import ScVAE, VAEConfig, vae_train_flops
from scldm_scale.train.export import json_artifact
from scldm_scale.train.sample_quality import SampleQuality, resolve_sample_reference
from scldm_scale.train.vae_loss import decode_targets, token_packing, vae_loss


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


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
