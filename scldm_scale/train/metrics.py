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


class WandbSink:
    """W&B run (offline by default). Any failure disables the sink instead of raising."""

    def __init__(self, project: str, name: str, group: str, mode: str, config: dict, run_dir: Path) -> None:
        self._run = None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=project, name=name, group=group or None, mode=mode, config=config,
                dir=str(run_dir), reinit="finish_previous",
            )
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
    """rich progress bar: step, loss, cells/s, ETA."""

    def __init__(self, total_steps: int, start_step: int, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} cells/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            transient=False, refresh_per_second=2,
        )
        self._task = self._progress.add_task(description, total=total_steps, completed=start_step, loss="-", rate="-")
        self._progress.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        fields = {}
        if "loss" in metrics:
            fields["loss"] = f"{metrics['loss']:.4f}"
        if "cells_per_s" in metrics:
            fields["rate"] = f"{metrics['cells_per_s']:.0f}"
        self._progress.update(self._task, completed=step, **fields)

    def close(self) -> None:
        self._progress.stop()


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


def build_logger(cfg: Any, run_dir: Path, rank: int, total_steps: int, start_step: int, resolved: dict) -> MetricsLogger:
    if rank != 0:
        return MetricsLogger([])
    sinks: list[MetricsSink] = [JSONLSink(run_dir / "metrics.jsonl")]
    if cfg.logging.wandb:
        sinks.append(WandbSink(
            project=cfg.logging.wandb_project, name=cfg.run.name,
            group=cfg.logging.wandb_group or cfg.run.name.rsplit("-", 1)[0],
            mode=cfg.logging.wandb_mode, config=resolved, run_dir=run_dir,
        ))
    if cfg.logging.progress:
        sinks.append(ProgressSink(total_steps, start_step, f"{cfg.run.stage.value if hasattr(cfg.run.stage, 'value') else cfg.run.stage}"))
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
