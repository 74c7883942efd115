"""Reading a trained run: the one place that loads an export (no DeepSpeed, nothing unpickled).

A run directory's ``export/`` (written by training, see :mod:`scldm_scale.train.export`) holds::

    model.safetensors   trained weights (fp32)
    ema.safetensors     EMA weights (when EMA was on)
    config.yaml         the resolved run config
    *.json              artefacts: vocab.json + labels.json (VAE), labels.json + latent_stats.json +
                        vae_run.json (LDM)

:func:`load_vae` and :func:`load_dit` build the modules from the exported config and weights;
:class:`~scldm_scale.api.model.ScLDM` and the dataset encoder are built on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scldm_scale.config import Config, Stage, load_config, to_object
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError
from scldm_scale.nn.dit import DiT
from scldm_scale.nn.vae import ScVAE

EXPORT_DIR = "export"


def has_export(run_dir: str | os.PathLike) -> bool:
    """Whether ``<run_dir>/export`` holds an exported model (weights and config)."""
    path = Path(run_dir) / EXPORT_DIR
    return (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()


def export_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/export``, checked to hold an exported model."""
    path = Path(run_dir) / EXPORT_DIR
    if not has_export(run_dir):
        raise ScldmError(f"{path}: no exported model (model.safetensors + config.yaml); "
                         f"train the run to the end or run `scldm-scale export` on it")
    return path


def read_export_json(run_dir: str | os.PathLike, name: str) -> Any:
    path = export_path(run_dir) / name
    if not path.is_file():
        raise ScldmError(f"{path}: missing from the export; re-export the run with `scldm-scale export`")
    return json.loads(path.read_text())


def load_export_config(run_dir: str | os.PathLike) -> Config:
    """The typed resolved config of an exported run (no weights read)."""
    return to_object(load_config([export_path(run_dir) / "config.yaml"]))


def load_export(run_dir: str | os.PathLike, ema: bool = False) -> tuple[Config, dict[str, torch.Tensor]]:
    """(typed resolved config, weights). ``ema=True`` returns the EMA weights when the run has them."""
    from safetensors.torch import load_file

    path = export_path(run_dir)
    cfg = load_export_config(run_dir)
    weights = path / ("ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors")
    return cfg, load_file(str(weights))


@dataclass
class TrainedVAE:
    """A trained stage-1 model with what it needs to read data: its gene vocabulary and label tables."""

    model: ScVAE
    cfg: Config
    vocab: GeneVocab
    labels: LabelTables
    run: Path


@dataclass
class TrainedDiT:
    """A trained stage-2 model with its label tables and the latent statistics it was trained on."""

    model: DiT
    cfg: Config
    labels: LabelTables
    mean_mz: torch.Tensor  # per-(token, dim) mean of the VAE latents (standardization)
    std_mz: torch.Tensor
    vae_run: Path
    run: Path
    ema: bool  # the weights are the EMA weights


def _check_stage(cfg: Config, run_dir: str | os.PathLike, stage: Stage) -> None:
    if Stage(cfg.run.stage) != stage:
        other = "--ldm-run / ScLDM.load(<LDM run>)" if stage == Stage.VAE else "the LDM run (run.stage=ldm)"
        raise ScldmError(f"{run_dir}: is a run.stage={Stage(cfg.run.stage).value} run, expected a "
                         f"{stage.value} run; pass {other}")


def load_vae(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedVAE:
    """The VAE of a stage-1 run, in eval mode on ``device``."""
    cfg, weights = load_export(run_dir)
    _check_stage(cfg, run_dir, Stage.VAE)
    model = ScVAE(cfg.vae)
    model.load_state_dict(weights)
    path = export_path(run_dir)
    return TrainedVAE(model.to(device).eval(), cfg, GeneVocab.load(path / "vocab.json"),
                      LabelTables.load(path / "labels.json"), Path(run_dir))


def load_dit(run_dir: str | os.PathLike, device: torch.device | str = "cpu", ema: bool = True) -> TrainedDiT:
    """The DiT of a stage-2 run (EMA weights by default), in eval mode on ``device``."""
    cfg, weights = load_export(run_dir, ema=ema)
    _check_stage(cfg, run_dir, Stage.LDM)
    used_ema = ema and (export_path(run_dir) / "ema.safetensors").is_file()
    model = DiT(cfg.dit)
    model.load_state_dict(weights)
    stats = read_export_json(run_dir, "latent_stats.json")
    m, z = cfg.dit.n_tokens, cfg.dit.d_in
    mean_mz = torch.tensor(stats["mean"], dtype=torch.float32).reshape(m, z)
    std_mz = torch.tensor(stats["std"], dtype=torch.float32).reshape(m, z)
    vae_run = _vae_run_of(run_dir)
    labels = LabelTables.load(export_path(run_dir) / "labels.json")
    return TrainedDiT(model.to(device).eval(), cfg, labels, mean_mz, std_mz, vae_run, Path(run_dir), used_ema)


def _vae_run_of(run_dir: str | os.PathLike) -> Path:
    """The VAE run an LDM run was trained on: where it was, or at the same place relative to the LDM
    run (the two runs copied together to another machine)."""
    where = read_export_json(run_dir, "vae_run.json")
    candidates = [Path(where["vae_run"])]
    if "vae_run_relative" in where:
        candidates.append((Path(run_dir) / where["vae_run_relative"]).resolve())
    for path in candidates:
        if has_export(path):
            return path
    raise ScldmError(f"{run_dir}: its VAE run is not at {' or '.join(map(str, candidates))}; copy the VAE run "
                     f"there or edit {export_path(run_dir) / 'vae_run.json'}")


def run_stage(run_dir: str | os.PathLike) -> Stage:
    """The stage of an exported run (``vae`` or ``ldm``)."""
    return Stage(load_export_config(run_dir).run.stage)
