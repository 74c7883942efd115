"""Collectives that are legal on every backend: the one communication helper of the project.

The trainer, ``encode``, ``generate`` and the in-training sample check all communicate through this
module, so none of them cares which backend the process group runs:

- **Data plane** (metric reductions, latent statistics): tensors live on :func:`device`, the device
  of the default process group (``cuda:<local rank>`` under NCCL, which refuses CPU tensors; the
  CPU under gloo). :func:`all_reduce_sum` moves its input there and back.
- **Control plane** (stop flags, Python objects such as generated cells): a gloo group on the CPU,
  created once beside the default group, so a flag check never waits for the GPU stream and object
  gathers never need device buffers.

Without a process group (a single process) every function is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scldm_scale.errors import ScldmError

_CPU_GROUP: Any = None  # the gloo group of the control plane (created lazily, collectively)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where this rank computes (its GPU, or the CPU)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_device() -> torch.device:
    """This process's compute device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), or run as a
    single process. NCCL when CUDA is available, gloo otherwise. Used by the entry points that do not
    go through DeepSpeed (``encode``, ``generate``); the trainer's group comes from DeepSpeed."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank(), world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def device() -> torch.device:
    """The device the default process group communicates on (data-plane collectives)."""
    if is_distributed() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cpu_group():
    global _CPU_GROUP
    if _CPU_GROUP is None:
        backend = str(dist.get_backend()).lower()
        _CPU_GROUP = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    return _CPU_GROUP


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks, returned on the device ``values`` came from (no copy when that
    is already the communication device)."""
    if not is_distributed():
        return values
    on = values.to(device())
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a CPU collective: no GPU sync)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value[0])


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst`` (None elsewhere); pickled over gloo."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_cpu_group())
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


def on_rank0(fn, *args: Any) -> Any:
    """``fn(*args)`` on rank 0 only, the others waiting; if it fails, every rank raises (rank 0 its own
    error, the others a ScldmError naming it), so that no rank is left waiting at a later collective.
    Returns rank 0's result on rank 0, None on the others."""
    result, failure = None, None
    if rank() == 0:
        try:
            result = fn(*args)
        except BaseException as err:
            failure = err
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise ScldmError(f"rank 0 failed ({message}); see rank 0's output")
    return result


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_cpu_group())


def destroy() -> None:
    """Leave the process group (and forget the control-plane group) once every rank has arrived: a rank
    that tore its connections down while another still used them would abort. Call it on the success
    path only; after an error, let the process exit with its traceback."""
    global _CPU_GROUP
    if is_distributed():
        barrier()
        dist.destroy_process_group()
    _CPU_GROUP = None


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (this rank's GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:i``; a
    CUDA device on a machine without one is a one-line error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec).strip().lower()
    if spec == "auto":
        return local_device()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ScldmError(f"device {spec!r}: not a device; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ScldmError(f"device {spec!r}: no CUDA GPU is available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ScldmError(f"device {spec!r}: this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
        if device.index is None:
            device = local_device()
    elif device.type != "cpu":
        raise ScldmError(f"device {spec!r}: unsupported; use auto, cpu, cuda or cuda:<index>")
    return device


def gather_tensor(tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape on all ranks) in rank order on rank ``dst``, on the CPU
    (None elsewhere). Data plane: sent from the communication device."""
    if not is_distributed():
        return [tensor.detach().cpu()]
    on = tensor.detach().to(device()).contiguous()
    out = [torch.empty_like(on) for _ in range(world_size())] if rank() == dst else None
    dist.gather(on, out, dst=dst)
    return None if out is None else [t.cpu() for t in out]
