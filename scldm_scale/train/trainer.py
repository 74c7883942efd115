"""One trainer for both stages on a DeepSpeed engine.

The stage (:mod:`scldm_scale.train.stages`) supplies the model, the data and the batch -> loss
step; the trainer owns the engine, the optimizer step with gradient accumulation, EMA,
checkpoints (exact resume: weights, optimizer, scheduler, EMA, step, RNG, data position),
metrics and graceful preemption (SIGTERM -> checkpoint -> exit 0).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from scldm_scale import comm
from scldm_scale.config import load_config, run_dir, save_config
from scldm_scale.errors import ScldmError
from scldm_scale.train.checkpoint import (
    client_states,
    consolidated_state_dict,
    ensure_universal,
    fp32_state_dict_from_checkpoint,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
    saved_world_size,
)
from scldm_scale.train.ema import EMA, ema_state_for, saved_full_state
from scldm_scale.train.engine import build_engine, init_distributed
from scldm_scale.train.export import write_export
from scldm_scale.train.metrics import build_logger, detect_peak_tflops
from scldm_scale.train.stages import build_stage

# what a run directory holds once a run has started (a fresh run must not write into them)
RUN_CONTENTS = ("checkpoints", "export", "metrics.jsonl", "latents", "wandb", "wandb_run_id")


def check_run_dir(path: Path, resume: bool, overwrite: bool) -> list[Path]:
    """The run's earlier contents that a fresh run would overwrite: an error unless the run resumes
    (``run.resume=true``) or replaces them (``run.overwrite=true``, then they are returned for removal)."""
    found = [path / name for name in RUN_CONTENTS if (path / name).exists()]
    if found and not resume and not overwrite:
        shown = ", ".join(p.name for p in found)
        raise ScldmError(f"{path}: already holds a run ({shown}); pass run.resume=true to continue it, "
                         "run.overwrite=true to replace it, or choose another run.name")
    return found if overwrite and not resume else []


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._preempted = False
        signal.signal(signal.SIGTERM, self._on_sigterm)  # before the slow start-up, so no SIGTERM is lost
        self.dist = init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.run_dir = run_dir(cfg)
        # torchrun --max-restarts: a restarted worker group continues from the latest checkpoint
        self.resume = bool(cfg.run.resume) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        stale = check_run_dir(self.run_dir, self.resume, bool(cfg.run.overwrite))
        comm.barrier()  # every rank has looked before rank 0 removes or writes anything
        if self.rank == 0:
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.stage = build_stage(cfg)  # fills the derived config values
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        self.ckpt_root = self.run_dir / "checkpoints"
        self.saved_world = saved_world_size(self.ckpt_root) if self.resume else None
        self.universal = self.saved_world is not None and self.saved_world != self.world
        if self.universal:  # resume on another number of ranks through DeepSpeed's universal checkpoint
            ensure_universal(self.ckpt_root)
            cfg.train.deepspeed = {**cfg.train.deepspeed, "checkpoint": {"load_universal": True}}

        torch.manual_seed(int(cfg.run.seed))  # identical initial weights on every rank
        model = self.stage.build_model()
        self.micro_batch = int(cfg.data.batch_size)
        self.grad_accum = int(cfg.train.grad_accum)
        self.engine = build_engine(model, cfg, self.micro_batch, self.run_dir)
        self.zero_stage = int(cfg.train.zero_stage)
        decay = float(cfg.train.ema_decay)
        # under ZeRO-3 every rank keeps the EMA of its own parameter partitions only
        self.ema = EMA(self.engine.module, decay, sharded=self.zero_stage == 3) if decay > 0 else None

        torch.manual_seed(int(cfg.run.seed) * 1000 + self.rank)  # per-rank stream (dropout, posterior noise)
        self.generator = torch.Generator(device=self.dist.device).manual_seed(int(cfg.run.seed) * 7919 + self.rank)
        self.source = self.stage.build_source()  # the data position is the source's (scldm_scale.data.source)
        self.step = 0
        if self.resume:
            self._resume()
        self.max_steps = int(cfg.train.max_steps)
        self.logger = build_logger(cfg, self.run_dir, self.rank, self.max_steps, self.step,
                                   OmegaConf.to_container(cfg, resolve=True), resume=self.resume)
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
            "data": self.source.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_generator": self.generator.get_state(),
            "world_size": self.world,
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        if self.ema is not None and (self.ema.sharded or self.rank == 0):  # slices on every rank, else rank 0's copy
            state.update(self.ema.checkpoint_state())
        return state

    def _resume(self) -> None:
        client = load_checkpoint(self.engine, self.ckpt_root, universal=self.universal)
        if client is None:
            if self.rank == 0:
                print(f"resume: no checkpoint in {self.ckpt_root}; starting from step 0", flush=True)
            return
        self.step = int(client["step"])
        data_state = dict(client["data"])
        data_state.setdefault("world_size", int(client.get("world_size", self.world)))  # the world it was taken at
        self.source.load_state_dict(data_state)  # any world size: the source continues after the same cells
        if not self.universal:  # RNG streams are per rank: only meaningful on the same world size
            torch.set_rng_state(client["rng_torch"])
            self.generator.set_state(client["rng_generator"])
            if "rng_cuda" in client and torch.cuda.is_available():
                torch.cuda.set_rng_state(client["rng_cuda"])
        if self.ema is not None:
            self.ema.load_state_dict(ema_state_for(self.ema, client_states(self.ckpt_root), self.rank, self.world))
        if self.rank == 0:
            print(f"resume: continuing from step {self.step} ({self.ckpt_root})", flush=True)

    def save(self) -> None:
        save_checkpoint(self.engine, self.ckpt_root, self.step, self._client_state(), int(self.cfg.train.keep_last))

    def export(self) -> Path | None:
        """Collective: consolidate the weights (and the EMA) and write the export on rank 0."""
        state = consolidated_state_dict(self.engine)
        ema_state = self.ema.consolidated() if self.ema is not None else None
        artifacts = self.stage.export_artifacts()
        return comm.on_rank0(lambda: write_export(self.run_dir, self.cfg, state, ema_state, artifacts=artifacts))

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._preempted = True

    # -- loop ------------------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, Any]]:
        """This rank's training batches from the current data position (packed or padded token batches,
        as the stage's model takes them; pinned for the copy to the GPU)."""
        return self.source.batches(num_workers=int(self.cfg.data.num_workers),
                                   pin_memory=self.dist.device.type == "cuda", pad=self.stage.padded_batches)

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``train.grad_accum`` micro-batches. The loss terms and token counts
        stay on the device (no host sync); they reach the host at log steps only (:meth:`_log`)."""
        totals: dict[str, torch.Tensor] = {}
        for _ in range(self.grad_accum):
            batch = _to_device(next(batches), self.dist.device)
            out = self.stage.loss(self.engine, batch, self.generator)
            self.engine.backward(out["loss"])
            self.engine.step()
            for key, value in out.items():
                term = value.detach().float() / self.grad_accum
                totals[key] = totals[key] + term if key in totals else term
            # counts from shapes (no sync), kept as host numbers
            totals["_cells"] = totals.get("_cells", 0.0) + float(batch["cell_index_n"].shape[0])
            totals["_tokens"] = totals.get("_tokens", 0.0) + float(self.stage.tokens(batch))
        if self.ema is not None:
            self.ema.update()
        self._last_batch = batch
        return totals

    def _log(self, window: dict[str, torch.Tensor], steps: int, elapsed: float) -> None:
        """Reduce the window's sums over ranks (one collective, one host transfer) and log them."""
        keys = sorted(window)
        device = comm.device()
        values = comm.all_reduce_sum(torch.stack([torch.as_tensor(window[k]).to(device, torch.float64) for k in keys]))
        reduced = dict(zip(keys, values.tolist()))
        for k in keys:
            if not k.startswith("_"):
                reduced[k] /= self.world * steps  # mean over ranks and the window's steps
        self.logger.log(self._derived_metrics(reduced, elapsed), self.step)

    def train(self) -> None:
        batches = self.batches()
        ckpt_every = int(self.cfg.train.ckpt_every)
        log_every = max(1, int(self.cfg.train.log_every))
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        t_window = time.perf_counter()
        last_saved = self.step
        stop_at = int(self.cfg.train.stop_at_step) or self.max_steps
        while self.step < min(stop_at, self.max_steps) and not self._preempted:
            metrics = self.train_step(batches)
            self.step += 1
            for key, value in metrics.items():
                window[key] = window[key] + value if key in window else value
            window_steps += 1
            if self.step % log_every == 0 or self.step == self.max_steps:
                self._log(window, window_steps, max(time.perf_counter() - t_window, 1e-9))
                window, window_steps = {}, 0
                t_window = time.perf_counter()
            if self.sample_every and self.step % self.sample_every == 0:
                self.sample()
            if ckpt_every and self.step % ckpt_every == 0:
                self.save()
                last_saved = self.step
            self._preempted = comm.any_rank(self._preempted)  # a CPU collective: no device sync
        if window_steps:  # the steps since the last log step (a stop between log steps)
            self._log(window, window_steps, max(time.perf_counter() - t_window, 1e-9))
        if self.step != last_saved:  # a checkpoint of this step may already exist (ckpt_every)
            self.save()
        if self.step >= self.max_steps:
            self.export()
        elif self.rank == 0:
            print(f"SIGTERM: checkpoint saved at step {self.step}; resume with run.resume=true", flush=True)

    def sample(self) -> None:
        """Generate cells on rank 0 and log their distance to held-out cells (``sample/*`` metrics).

        Collective: the weights to sample with are consolidated on rank 0 first (the EMA from every
        rank's slices under ZeRO-3; without EMA the training weights, gathered under ZeRO-3). Rank 0
        then samples alone while the other ranks go on and wait for it at their next collective.
        """
        if self.ema is not None:
            weights = self.ema.consolidated()
        else:
            weights = consolidated_state_dict(self.engine)
        if self.sample_quality is not None:
            self.logger.log(self.sample_quality(weights), self.step)

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


def train(cfg: DictConfig) -> Path:
    """Entry point used by the CLI: build, train, export, close."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    comm.destroy()
    return trainer.run_dir


def export_run(run_dir: str | os.PathLike) -> Path:
    """`scldm-scale export RUN`: the latest checkpoint of a run -> ``<run>/export`` (safetensors + config)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ScldmError(f"{run_dir}: not a run directory (no config.yaml)")
    root = run_dir / "checkpoints"
    tag = latest_tag(root)
    if tag is None:
        raise ScldmError(f"{root}: no complete checkpoint (missing 'latest'); train the run first")
    cfg = load_config([run_dir / "config.yaml"])
    stage = build_stage(cfg)
    state = fp32_state_dict_from_checkpoint(root, tag, int(cfg.train.zero_stage))
    ema = saved_full_state(client_states(root))
    return write_export(run_dir, cfg, state, ema, artifacts=stage.export_artifacts())
