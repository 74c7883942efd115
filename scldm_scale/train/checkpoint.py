"""Atomic, resumable training checkpoints on top of DeepSpeed's sharded save/load.

Layout of ``<run dir>/checkpoints/``::

    latest                     the tag of the newest COMPLETE checkpoint (written last, atomically)
    step00000100/              DeepSpeed model/optimizer/scheduler shards + client_rank{r}.pt
    step00000200/

A checkpoint is written into ``<tag>.partial`` by every rank; only after all ranks have finished
(barrier) does rank 0 rename it to ``<tag>`` and then replace ``latest``. A crash at any point
leaves the previous checkpoint and ``latest`` untouched (a step saved again keeps its earlier copy
as ``<tag>.old`` until the new one is in place); stale ``.partial`` folders are removed on the next
save. The client file of each rank holds the step, the data position, the RNG states and the EMA
(rank 0's full copy, or every rank's own slices under ZeRO-3: :mod:`scldm_scale.train.ema`); it is
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from scldm_scale import comm
from scldm_scale.io import atomic_path, write_text_atomic

TAG_RE = re.compile(r"^step(\d{8})$")


def _tag(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(root: str | os.PathLike) -> str | None:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if (Path(root) / tag).is_dir():
        return tag
    # a save of the same step again was cut off between its two renames: the earlier copy is complete
    return f"{tag}.old" if (Path(root) / f"{tag}.old").is_dir() else None


def save_checkpoint(engine, root: str | os.PathLike, step: int, client: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. ``client`` is this rank's own state."""
    root = Path(root)
    rank = comm.rank()
    tag = _tag(step)
    partial = f"{tag}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    comm.barrier()
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    # no tensor/pipeline parallelism: an empty pattern set lets ds_to_universal convert the checkpoint
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(root), tag=partial, client_state={UNIVERSAL_CHECKPOINT_INFO: universal_info},
                           save_latest=False)
    with atomic_path(root / partial / f"client_rank{rank}.pt") as tmp:
        torch.save(client, tmp)
    comm.barrier()
    if rank == 0:
        final = root / tag
        old = root / f"{tag}.old"
        if final.exists():  # the same step saved again: the complete copy stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(root / partial, final)
        write_text_atomic(root / "latest", tag)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, keep=tag)
    comm.barrier()
    return root / tag


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


def saved_world_size(root: str | os.PathLike) -> int | None:
    """World size of the latest complete checkpoint (None if there is none)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    client = torch.load(Path(root) / tag / "client_rank0.pt", map_location="cpu", weights_only=True)
    return int(client["world_size"])


UNIVERSAL = "universal"


def ensure_universal(root: str | os.PathLike) -> None:
    """Collective. Convert the latest checkpoint to DeepSpeed's universal format (once, by rank 0),
    so it can be loaded on a different number of ranks; a failed conversion fails every rank."""
    folder = Path(root) / str(latest_tag(root))
    target = folder / UNIVERSAL

    def convert() -> None:
        if (target / "done").is_file():
            return
        shutil.rmtree(target, ignore_errors=True)
        tmp = folder / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(folder), "--output_folder", str(tmp / UNIVERSAL), "--num_extract_workers", "1",
                               "--num_merge_workers", "1"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{folder}: conversion to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        (tmp / UNIVERSAL / "done").write_text("ok")
        os.replace(tmp / UNIVERSAL, target)
        shutil.rmtree(tmp, ignore_errors=True)

    comm.on_rank0(convert)


def load_checkpoint(engine, root: str | os.PathLike, universal: bool = False) -> dict[str, Any] | None:
    """Collective. Loads the latest complete checkpoint into ``engine``; returns this rank's client state.

    ``universal``: load the universal conversion (see :func:`ensure_universal`), for a different
    number of ranks than the checkpoint was written with.
    """
    root = Path(root)
    tag = latest_tag(root)
    if tag is None:
        return None
    load_dir, load_tag = (root / tag, UNIVERSAL) if universal else (root, tag)
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rank = comm.rank()
    path = root / tag / f"client_rank{rank}.pt"
    if universal or not path.is_file():  # another world size: rank 0's client state is the common one
        path = root / tag / "client_rank0.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def client_states(root: str | os.PathLike) -> list[Path]:
    """The client-state files of the latest complete checkpoint, one per saved rank, in rank order."""
    tag = latest_tag(root)
    if tag is None:
        return []
    folder = Path(root) / tag
    world = int(torch.load(folder / "client_rank0.pt", map_location="cpu", weights_only=True)["world_size"])
    return [folder / f"client_rank{r}.pt" for r in range(world)]


def _safe_globals() -> list:
    """The few DeepSpeed classes a checkpoint holds besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine) -> None:
    """Make DeepSpeed read checkpoints with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return
    allowed = _safe_globals()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine


def consolidated_state_dict(engine, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Collective. The full fp32 weights on rank ``dst`` (None elsewhere): the optimizer's fp32 master
    copy where mixed precision keeps one (ZeRO 1-3, bf16/fp16), gathered parameter by parameter so
    that no rank but ``dst`` holds the whole model; persistent buffers as they are."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keep = comm.rank() == dst
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # collective under ZeRO 1-3; None without a master copy
        if keep:
            state[name] = (param.detach() if full is None else full).float().cpu().clone()
    if not keep:
        return None
    params = dict(module.named_parameters())
    for name, value in module.state_dict().items():
        if name not in params:
            state[name] = value.detach().float().cpu().clone()
    return state


def fp32_state_dict_from_checkpoint(root: str | os.PathLike, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidate the fp32 weights of a (possibly sharded) checkpoint in one process, without GPUs."""
    path = Path(root) / tag
    if int(zero_stage) == 0:
        with torch.serialization.safe_globals(_safe_globals()):
            states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag).items()}
