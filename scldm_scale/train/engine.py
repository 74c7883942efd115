"""DeepSpeed engine: process group, the DeepSpeed JSON generated from the recipe, initialization.

This module and :mod:`scldm_scale.train.checkpoint` are the only ones that import deepspeed.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from scldm_scale.comm import DistInfo
from scldm_scale.config import Precision
from scldm_scale.errors import ScldmError
from scldm_scale.io import write_json_atomic
from scldm_scale.train.checkpoint import use_safe_loading
from scldm_scale.train.schedules import build_schedule

MAX_BUCKET = 500_000_000  # DeepSpeed's default bucket size (elements): the cap of the derived sizes
MIN_BUCKET = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group started by torchrun / the deepspeed launcher, or make a 1-rank group.

    The backend is NCCL on CUDA and gloo on CPU.
    """
    if not torch.cuda.is_available():  # say so, instead of DeepSpeed warning on every rank that it guessed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m scldm_scale.cli train ...`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not torch.distributed.is_initialized() and restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # a worker group restarted by torchrun shares the agent's store with the previous attempt:
        # namespace it per attempt, or the new group reads the dead group's peer addresses
        store = torch.distributed.PrefixStore(f"attempt_{restart}", torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False))
        torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]))
    if not cuda:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up that only its
        # inference path uses; training never calls it. Skipping it saves the first-start compile and
        # cannot hang on the compile lock a killed process leaves behind.
        # (the submodule itself: `import deepspeed.comm.torch as m` binds the torch package that
        # deepspeed.comm re-exports under that name)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # joins, or adopts the group made above
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def bucket_sizes(n_params: int, zero_stage: int) -> dict[str, int]:
    """Communication bucket sizes (elements) that follow the model size: a quarter of the parameters
    (so a step's gradient reduction overlaps in about four buckets), at least 1M and at most
    DeepSpeed's default of 5e8 (which, whatever the model, costs 1 GiB of device memory per rank in
    bf16). ZeRO-3 also prefetches and keeps small parameters whole on the same scale."""
    bucket = int(min(MAX_BUCKET, max(MIN_BUCKET, n_params // 4)))
    if zero_stage in (1, 2):
        return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero_stage == 3:
        return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket,
                "stage3_param_persistence_threshold": int(min(100_000, max(1, n_params // 1000)))}
    return {}


def deepspeed_config(cfg: Any, micro_batch_size: int, n_params: int = 0) -> dict[str, Any]:
    """The DeepSpeed JSON for a recipe; ``n_params`` sizes the communication buckets
    (:func:`bucket_sizes`). ``train.deepspeed`` keys are merged last (raw pass-through), so a recipe
    that sets a bucket size keeps it."""
    train, optim = cfg.train, cfg.optim
    precision = Precision(train.precision)
    zero: dict[str, Any] = {"stage": int(train.zero_stage), **bucket_sizes(n_params, int(train.zero_stage))}
    if train.offload_optimizer:
        if int(train.zero_stage) == 0:
            raise ScldmError("train.offload_optimizer=true needs train.zero_stage >= 1; set zero_stage=2 or "
                             "disable offload_optimizer")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.offload_params:
        if int(train.zero_stage) != 3:
            raise ScldmError("train.offload_params=true needs train.zero_stage=3; set zero_stage=3 or disable offload_params")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if int(train.zero_stage) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    optimizer_params: dict[str, Any] = {
        "lr": effective_lr(cfg, micro_batch_size),
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not train.offload_optimizer:
        optimizer_params["torch_adam"] = True  # no fused CUDA kernel needed; DeepSpeedCPUAdam under offload
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(train.grad_accum),
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": precision == Precision.BF16},
        "fp16": {"enabled": precision == Precision.FP16, "initial_scale_power": 12},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    extra = train.deepspeed if isinstance(train.deepspeed, dict) else OmegaConf.to_container(train.deepspeed)
    return _deep_merge(ds, dict(extra))


def effective_lr(cfg: Any, micro_batch_size: int) -> float:
    """Peak LR, linearly scaled with the global batch when ``optim.reference_global_batch`` is set."""
    lr = float(cfg.optim.lr)
    ref = int(cfg.optim.reference_global_batch)
    if ref > 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        lr *= micro_batch_size * int(cfg.train.grad_accum) * world / ref
    return lr


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """Weight decay on matrices only; parameters named in ``lr_scale`` get their own LR multiplier."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((float(v) for k, v in lr_scale.items() if k in name), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_engine(model: nn.Module, cfg: Any, micro_batch_size: int, run_dir: Path | None = None):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the recipe's LR schedule."""
    import deepspeed

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = deepspeed_config(cfg, micro_batch_size, n_params)
    if run_dir is not None and torch.distributed.get_rank() == 0:
        write_json_atomic(Path(run_dir) / "deepspeed.json", ds_config, indent=2)
    schedule = build_schedule(cfg.optim, int(cfg.train.max_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, float(cfg.optim.weight_decay), effective_lr(cfg, micro_batch_size),
                                      dict(cfg.optim.lr_scale)),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    use_safe_loading(engine)
    return engine
