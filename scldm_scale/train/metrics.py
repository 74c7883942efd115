"""Metrics loggers behind one container: console progress bar, JSONL file (always), W&B (optional).

Only rank 0 logs. W&B is imported lazily; if it is missing, unreachable or raises while logging,
the error is reported once and W&B is switched off: training never stops because of it, and the
JSONL file keeps every record.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from scldm_scale.config import Stage
from scldm_scale.io import write_text_atomic
from scldm_scale.progress import Progress


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JSONLSink:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed every record)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if isinstance(v, (int, str)) or math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()


WANDB_ID_FILE = "wandb_run_id"


class WandbSink:
    """W&B run (offline by default). Any failure disables the sink instead of raising.

    The run id is kept in ``<run dir>/wandb_run_id``: a resumed training run continues the same W&B
    run instead of opening a new one.
    """

    def __init__(self, project: str, name: str, group: str, mode: str, config: dict, run_dir: Path,
                 resume: bool = False) -> None:
        self._run = None
        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=project, name=name, group=group or None, mode=mode, config=config,
                dir=str(run_dir), reinit="finish_previous", id=run_id, resume="allow" if run_id else None,
            )
            if run_id is None:
                write_text_atomic(id_file, self._run.id)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            self._disable(err)

    def _disable(self, err: Exception) -> None:
        print(f"warning: W&B disabled ({type(err).__name__}: {err}); metrics are still in metrics.jsonl",
              file=sys.stderr)
        self._run = None

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def close(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as err:  # noqa: BLE001
            self._disable(err)


class ProgressSink:
    """Training progress: a bar on a terminal, a plain line per log step otherwise (SLURM logs)."""

    def __init__(self, total_steps: int, start_step: int, description: str) -> None:
        self._progress = Progress(total_steps, description, stream=sys.stdout, min_interval_s=0.0,
                                  completed=start_step, fields=("loss", "cells/s"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "loss" not in metrics:  # sample/* records: not a training step
            return
        fields = {"loss": f"{metrics['loss']:.4f}"}
        if "cells_per_s" in metrics:
            fields["cells/s"] = f"{metrics['cells_per_s']:.0f}"
        self._progress.update(step, **fields)

    def close(self) -> None:
        self._progress.close()


class MetricsLogger:
    """Fans metrics out to its sinks; a no-op on ranks other than 0."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(cfg: Any, run_dir: Path, rank: int, total_steps: int, start_step: int, resolved: dict,
                 resume: bool = False) -> MetricsLogger:
    if rank != 0:
        return MetricsLogger([])
    sinks: list[MetricsSink] = [JSONLSink(run_dir / "metrics.jsonl")]
    if cfg.logging.wandb:
        sinks.append(WandbSink(
            project=cfg.logging.wandb_project, name=cfg.run.name,
            group=cfg.logging.wandb_group or cfg.run.name.rsplit("-", 1)[0],
            mode=cfg.logging.wandb_mode, config=resolved, run_dir=run_dir, resume=resume,
        ))
    if cfg.logging.progress:
        sinks.append(ProgressSink(total_steps, start_step, Stage(cfg.run.stage).value))
    return MetricsLogger(sinks)


# Dense bf16 peak TFLOPs of known accelerators (per device), for MFU.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def detect_peak_tflops() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key, value in KNOWN_PEAK_TFLOPS.items():
                if key in name:
                    return value
    except Exception:  # noqa: BLE001
        pass
    return 0.0
