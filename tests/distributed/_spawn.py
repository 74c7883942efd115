"""Run a function in several gloo processes with a file rendezvous (no ports).

``fn`` must be a module-level function; it is called as ``fn(rank, world_size, *args)``
after ``init_process_group`` and should write what it saw to files that the parent test then
asserts on. By default the ranks are *forked* (``torch.multiprocessing.start_processes``,
the engine under ``torch.multiprocessing.spawn``) after importing ``preload`` modules in the
parent, so that two ranks do not each pay the ~12 s CPU import of cellarium/lightning on
the shared CI cores; ``start_method="spawn"`` gives fully fresh interpreters.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Sequence


def _entry(rank: int, fn: Callable, world_size: int, rdzv_file: str, args: tuple) -> None:
    import multiprocessing

    import torch
    import torch.distributed as dist

    # Ranks started by torchrun/deepspeed/srun are plain `python` processes whose dataloader
    # workers fork; a spawned rank would default to "spawn", so restore the launchers' default
    # (spawned dataloader workers re-import torch + cellarium at every epoch).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable,
    tmp_dir: str | os.PathLike,
    world_size: int = 2,
    args: tuple = (),
    preload: Sequence[str] = (),
    start_method: str = "fork",
) -> None:
    """Start ``world_size`` gloo ranks running ``fn``; re-raises the first failure in the parent."""
    import torch.multiprocessing as mp

    for module in preload:
        importlib.import_module(module)
    rdzv_file = os.path.join(os.fspath(tmp_dir), f"rdzv-{uuid.uuid4().hex}")
    mp.start_processes(
        _entry,
        args=(fn, world_size, rdzv_file, tuple(args)),
        nprocs=world_size,
        join=True,
        start_method=start_method,
    )
