"""Consolidated export for inference: safetensors weights + the resolved config, no DeepSpeed needed.

Writes ``<run dir>/export/`` (layout and reading: :mod:`scldm_scale.api.run`)::

    model.safetensors   trained weights (fp32)
    ema.safetensors     EMA weights (when EMA was on)
    config.yaml         the resolved run config
    *.json              data artefacts the model needs (vocab.json, labels.json, latent_stats.json)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from scldm_scale.api.run import EXPORT_DIR
from scldm_scale.io import atomic_dir, write_json_atomic


def write_export(
    run_dir: str | os.PathLike,
    cfg: DictConfig,
    state_dict: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None = None,
    artifacts: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write ``<run_dir>/export`` atomically (a temp folder renamed into place).

    ``artifacts`` maps a file name to a function that writes that file at the given path.
    """
    from safetensors.torch import save_file

    out = Path(run_dir) / EXPORT_DIR
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()},
                  str(tmp / "model.safetensors"))
        if ema_state:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()},
                      str(tmp / "ema.safetensors"))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        for name, write in (artifacts or {}).items():
            write(tmp / name)
    return out


def json_artifact(obj: Any) -> Callable[[Path], None]:
    return lambda path: write_json_atomic(path, obj, indent=2)
