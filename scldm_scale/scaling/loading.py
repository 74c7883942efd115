"""Reading trained runs (their ``export/``) for the sweep's held-out metrics.

Every read of a trained run by :mod:`scldm_scale.scaling` goes through this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

# Weights that are per-gene or per-category tables rather than width x width maps.
EMBEDDING_PARAMS = ("gene_embedding.", "log_theta_g", "readout_gd", "logit_bias_g", "label_embedders.")


@dataclass
class TrainedVAE:
    model: torch.nn.Module  # ScVAE in eval mode
    cfg: DictConfig  # the run's resolved config
    gene_ids: list[str]  # vocabulary, in model order


@dataclass
class TrainedLDM:
    model: torch.nn.Module  # DiT in eval mode (EMA weights when the run kept them)
    cfg: DictConfig
    labels: object  # LabelTables
    mean_mz: torch.Tensor  # latent standardization
    std_mz: torch.Tensor
    vae_run: str


def load_vae(run_dir: str | os.PathLike) -> TrainedVAE:
    from scldm_scale.data.vocab import GeneVocab
    from scldm_scale.tasks.encode import load_vae as load_vae_export
    from scldm_scale.train.export import export_path

    model, cfg = load_vae_export(run_dir)
    return TrainedVAE(model, cfg, GeneVocab.load(export_path(run_dir) / "vocab.json").gene_ids)


def load_ldm(run_dir: str | os.PathLike) -> TrainedLDM:
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.nn.dit import DiT, DiTConfig
    from scldm_scale.train.export import export_path, load_export, read_export_json

    cfg, weights = load_export(run_dir, ema=True)
    model = DiT(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiTConfig), cfg.dit)))
    model.load_state_dict(weights)
    stats = read_export_json(run_dir, "latent_stats.json")
    m, z = int(cfg.dit.n_tokens), int(cfg.dit.d_in)
    return TrainedLDM(
        model=model.eval(), cfg=cfg, labels=LabelTables.load(export_path(run_dir) / "labels.json"),
        mean_mz=torch.tensor(stats["mean"], dtype=torch.float32).reshape(m, z),
        std_mz=torch.tensor(stats["std"], dtype=torch.float32).reshape(m, z),
        vae_run=read_export_json(run_dir, "vae_run.json")["vae_run"],
    )


def export_parameter_counts(run_dir: str | os.PathLike) -> dict[str, int]:
    """``params`` (all trained weights) and ``params_non_embedding`` (without :data:`EMBEDDING_PARAMS`)."""
    from safetensors import safe_open

    from scldm_scale.train.export import export_path

    total = non_embedding = 0
    with safe_open(str(export_path(run_dir) / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            numel = 1
            for dim in fh.get_slice(key).get_shape():
                numel *= int(dim)
            total += numel
            if not key.startswith(EMBEDDING_PARAMS):
                non_embedding += numel
    return {"params": total, "params_non_embedding": non_embedding}


def has_export(run_dir: str | os.PathLike) -> bool:
    path = Path(run_dir) / "export"
    return (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()


def generate_cells(ldm_run: str | os.PathLike, conditions: Sequence[tuple[dict[str, str], int]],
                   out_path: str | os.PathLike, seed: int, num_steps: int | None) -> Path:
    """Generated cells for ``conditions`` (``[({attribute: value}, n_cells), ...]``) -> ``out_path`` (.h5ad)."""
    from scldm_scale.tasks.generate import generate

    return generate(str(ldm_run), list(conditions), str(out_path), num_steps=num_steps or None, seed=seed,
                    progress=False)


def conditions_like(reference: str | os.PathLike, attributes: Sequence[str], n_cells: int,
                    seed: int) -> list[tuple[dict[str, str], int]]:
    """Conditions reproducing the label composition of a reference ``.h5ad`` with ``n_cells`` cells."""
    from scldm_scale.tasks.generate import conditions_matching

    return conditions_matching(str(reference), list(attributes), n_cells, seed)
