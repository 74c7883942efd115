"""One trainer for both stages on a DeepSpeed engine.

The stage (:mod:`scldm_scale.train.stages`) supplies the model, the data and the batch -> loss
step; the trainer owns the engine, the optimizer step with gradient accumulation, EMA,
checkpoints (exact resume: weights, optimizer, scheduler, EMA, step, RNG, data position),
metrics and graceful preemption (SIGTERM -> checkpoint -> exit 0).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from scldm_scale.config import run_dir, save_config
from scldm_scale.train.checkpoint import (
    consolidated_state_dict,
    ensure_universal,
    load_checkpoint,
    save_checkpoint,
    saved_world_size,
)
from scldm_scale.train.ema import EMA
from scldm_scale.train.engine import build_engine, gather_params, init_distributed
from scldm_scale.train.export import write_export
from scldm_scale.train.metrics import build_logger, detect_peak_tflops
from scldm_scale.train.stages import build_stage


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._preempted = False
        signal.signal(signal.SIGTERM, self._on_sigterm)  # before the slow start-up, so no SIGTERM is lost
        self.dist = init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.stage = build_stage(cfg)  # fills the derived config values
        self.run_dir = run_dir(cfg)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        self.ckpt_root = self.run_dir / "checkpoints"
        # torchrun --max-restarts: a restarted worker group continues from the latest checkpoint
        self.resume = bool(cfg.run.resume) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.saved_world = saved_world_size(self.ckpt_root) if self.resume else None
        self.universal = self.saved_world is not None and self.saved_world != self.world
        if self.universal:  # resume on another number of ranks through DeepSpeed's universal checkpoint
            ensure_universal(self.ckpt_root)
            cfg.train.deepspeed = {**cfg.train.deepspeed, "checkpoint": {"load_universal": True}}

        torch.manual_seed(int(cfg.run.seed))  # identical initial weights on every rank
        model = self.stage.build_model()
        self.micro_batch = int(cfg.data.batch_size)
        self.engine = build_engine(model, cfg, self.micro_batch, self.run_dir)
        self.zero_stage = int(cfg.train.zero_stage)
        decay = float(cfg.train.ema_decay)
        self.ema = EMA(self.engine.module, decay, gather_params(self.zero_stage)) if decay > 0 else None

        torch.manual_seed(int(cfg.run.seed) * 1000 + self.rank)  # per-rank stream (dropout, posterior noise)
        self.generator = torch.Generator(device=self.dist.device).manual_seed(int(cfg.run.seed) * 7919 + self.rank)
        from scldm_scale.data.loader import StatefulLoader

        self.loader = StatefulLoader(self.stage.build_dataset(), num_workers=int(cfg.data.num_workers),
                                     pad=getattr(self.stage, "padded_batches", True))
        self.step = 0
        if self.resume:
            self._resume()
        self.max_steps = int(cfg.train.max_steps)
        self.logger = build_logger(cfg, self.run_dir, self.rank, self.max_steps, self.step,
                                   OmegaConf.to_container(cfg, resolve=True))
        self.peak_flops = (float(cfg.logging.peak_tflops) or detect_peak_tflops()) * 1e12
        self.sample_every = int(cfg.train.sample_every) if hasattr(self.stage, "sample_quality") else 0
        if int(cfg.train.sample_every) > 0 and not self.sample_every and self.rank == 0:
            print(f"note: train.sample_every applies to run.stage=ldm; no sampling in a {cfg.run.stage} run", flush=True)
        # rank 0 only: the reference is read and embedded once, here
        self.sample_quality = self.stage.sample_quality(self.dist.device) if self.sample_every and self.rank == 0 \
            else None

    # -- state -----------------------------------------------------------------------------------

    def _client_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "data": self.loader.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_generator": self.generator.get_state(),
            "world_size": self.world,
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        if self.ema is not None and self.rank == 0:
            state["ema"] = self.ema.state_dict()
        return state

    def _resume(self) -> None:
        client = load_checkpoint(self.engine, self.ckpt_root, universal=self.universal)
        if client is None:
            if self.rank == 0:
                print(f"resume: no checkpoint in {self.ckpt_root}; starting from step 0", flush=True)
            return
        self.step = int(client["step"])
        data_state = dict(client["data"])
        if self.universal:
            # every rank reads the global order strided by rank, so k batches on W ranks are exactly the
            # first k*b*W cells of the epoch: continue after the same number of cells on the new world
            cells = int(data_state["batches_consumed"]) * self.micro_batch * int(self.saved_world)
            data_state["batches_consumed"] = cells // (self.micro_batch * self.world)
        self.loader.load_state_dict(data_state)
        if not self.universal:  # RNG streams are per rank: only meaningful on the same world size
            torch.set_rng_state(client["rng_torch"])
            self.generator.set_state(client["rng_generator"])
            if "rng_cuda" in client and torch.cuda.is_available():
                torch.cuda.set_rng_state(client["rng_cuda"])
        if self.ema is not None:
            ema_state = client.get("ema")
            if ema_state is None:  # only rank 0 stores EMA: broadcast it
                ema_state = load_checkpoint_ema(self.ckpt_root)
            self.ema.load_state_dict(ema_state)
        if self.rank == 0:
            print(f"resume: continuing from step {self.step} ({self.ckpt_root})", flush=True)

    def save(self) -> None:
        save_checkpoint(self.engine, self.ckpt_root, self.step, self._client_state(), int(self.cfg.train.keep_last))

    def export(self) -> Path | None:
        state = consolidated_state_dict(self.engine, self.zero_stage)
        if self.rank != 0:
            return None
        return write_export(self.run_dir, self.cfg, state, self.ema.state_dict() if self.ema else None,
                            artifacts=self.stage.export_artifacts())

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._preempted = True

    # -- loop ------------------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        totals: dict[str, float] = {}
        cells = tokens = 0
        for _ in range(int(self.cfg.train.grad_accum)):
            batch = _to_device(next(batches), self.dist.device)
            out = self.stage.loss(self.engine, batch, self.generator)
            self.engine.backward(out["loss"])
            self.engine.step()
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / int(self.cfg.train.grad_accum)
            cells += int(next(iter(batch.values())).shape[0])
            tokens += self.stage.tokens(batch)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        totals["_cells"], totals["_tokens"] = cells, tokens
        self._last_batch = batch
        return totals

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        out = {k: float(v) for k, v in zip(keys, values)}
        for k in keys:
            if not k.startswith("_"):
                out[k] /= self.world
        return out

    def train(self) -> None:
        batches = iter(self.loader)
        ckpt_every = int(self.cfg.train.ckpt_every)
        log_every = max(1, int(self.cfg.train.log_every))
        window = {"_cells": 0.0, "_tokens": 0.0}
        t_window = time.perf_counter()
        last_saved = self.step
        stop_at = int(self.cfg.train.stop_at_step) or self.max_steps
        while self.step < min(stop_at, self.max_steps) and not self._preempted:
            metrics = self.train_step(batches)
            self.step += 1
            window["_cells"] += metrics.pop("_cells")
            window["_tokens"] += metrics.pop("_tokens")
            if self.step % log_every == 0 or self.step == self.max_steps:
                reduced = self._reduce({**metrics, **window})
                elapsed = max(time.perf_counter() - t_window, 1e-9)
                self.logger.log(self._derived_metrics(reduced, elapsed), self.step)
                window = {"_cells": 0.0, "_tokens": 0.0}
                t_window = time.perf_counter()
            if self.sample_every and self.step % self.sample_every == 0:
                self.sample()
            if ckpt_every and self.step % ckpt_every == 0:
                self.save()
                last_saved = self.step
            self._preempted = self._any_rank(self._preempted)
        if self.step != last_saved or self._preempted or self.step < self.max_steps:
            self.save()
        if self.step >= self.max_steps:
            self.export()
        elif self.rank == 0:
            print(f"SIGTERM: checkpoint saved at step {self.step}; resume with run.resume=true", flush=True)

    def sample(self) -> None:
        """Generate cells on rank 0 and log their distance to held-out cells (``sample/*`` metrics).

        EMA weights are full copies on every rank (gathered at each update), so rank 0 samples while the
        other ranks go on to the next step and wait for it at its first collective. Without EMA, every
        rank joins the weight gather (a collective under ZeRO-3), then rank 0 samples alone.
        """
        if self.ema is not None:
            weights = self.ema.state_dict()
        elif self.zero_stage == 3 or self.sample_quality is not None:
            weights = consolidated_state_dict(self.engine, self.zero_stage)
        if self.sample_quality is not None:
            self.logger.log(self.sample_quality(weights), self.step)

    def _any_rank(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _derived_metrics(self, reduced: dict[str, float], elapsed: float) -> dict[str, float]:
        cells, tokens = reduced.pop("_cells"), reduced.pop("_tokens")
        out = dict(reduced)
        out["cells_per_s"] = cells / elapsed
        out["tokens_per_s"] = tokens / elapsed
        out["lr"] = float(self.engine.get_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        flops = self.stage.flops_per_cell(self.engine.module, self._last_batch)
        out["tflops_per_cell"] = flops / 1e12
        if self.peak_flops > 0:
            out["mfu"] = flops * out["cells_per_s"] / (self.peak_flops * self.world)
        if torch.cuda.is_available():
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out

    def close(self) -> None:
        self.logger.close()


def load_checkpoint_ema(root: Path) -> dict[str, torch.Tensor]:
    from scldm_scale.train.checkpoint import latest_tag

    tag = latest_tag(root)
    return torch.load(Path(root) / str(tag) / "client_rank0.pt", map_location="cpu", weights_only=True)["ema"]


def train(cfg: DictConfig) -> Path:
    """Entry point used by the CLI: build, train, export, close."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer.run_dir
