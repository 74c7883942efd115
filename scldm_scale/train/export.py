"""Consolidated export for inference: safetensors weights + the resolved config, no DeepSpeed needed.

Layout of ``<run dir>/export/``::

    model.safetensors   trained weights (fp32)
    ema.safetensors     EMA weights (when EMA was on)
    config.yaml         the resolved run config
    *.json              data artefacts the model needs (vocab.json, labels.json, latent_stats.json)

Loading uses safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from scldm_scale.errors import ScldmError

EXPORT_DIR = "export"


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
    tmp = out.with_name(f".{EXPORT_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
    if ema_state:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for name, write in (artifacts or {}).items():
        write(tmp / name)
    old = out.with_name(f".{EXPORT_DIR}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / EXPORT_DIR
    if not (path / "model.safetensors").is_file() or not (path / "config.yaml").is_file():
        raise ScldmError(f"{path}: no exported model (model.safetensors + config.yaml); "
                         f"train the run to the end or run `scldm-scale export` on it")
    return path


def load_export(run_dir: str | os.PathLike, ema: bool = False) -> tuple[DictConfig, dict[str, torch.Tensor]]:
    """(resolved config, weights). ``ema=True`` returns the EMA weights when present."""
    from safetensors.torch import load_file

    from scldm_scale.config import load_config

    path = export_path(run_dir)
    cfg = load_config([path / "config.yaml"])
    weights = path / ("ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors")
    return cfg, load_file(str(weights))


def json_artifact(obj: Any) -> Callable[[Path], None]:
    return lambda path: Path(path).write_text(json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays / scalars, tensors
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_export_json(run_dir: str | os.PathLike, name: str) -> Any:
    path = export_path(run_dir) / name
    if not path.is_file():
        raise ScldmError(f"{path}: missing from the export; re-export the run")
    return json.loads(path.read_text())
