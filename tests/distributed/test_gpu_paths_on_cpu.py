"""What a GPU job relies on, checked on CPU: no host sync per step, the ZeRO-3 EMA kept as partitions,
collectives through the communication helper on every rank."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed._spawn import run_distributed

pytestmark = pytest.mark.distributed


# ------------------------------------------------------------------------------- communication helper


def _comm_ranks(rank: int, world: int, out_dir: str) -> None:
    from scldm_scale import comm

    summed = comm.all_reduce_sum(torch.tensor([float(rank + 1), 2.0]))
    flags = [comm.any_rank(rank == 1), comm.any_rank(False)]
    gathered = comm.gather_objects({"rank": rank, "x": [rank] * (rank + 1)})
    tensors = comm.gather_tensor(torch.full((3,), float(rank)))
    box = comm.broadcast_object(f"from {rank}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"sum": summed.tolist(), "flags": flags, "gathered": gathered, "box": box,
                   "tensors": None if tensors is None else [t.tolist() for t in tensors],
                   "device": str(comm.device())}, f)


def test_communication_helper_on_two_ranks(tmp_path):
    run_distributed(_comm_ranks, tmp_path, world_size=2, args=(str(tmp_path),))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["sum"] == [3.0, 4.0] and r["flags"] == [True, False] and r["box"] == "from 0"
        assert r["device"] == "cpu"  # gloo
    assert r0["gathered"] == [{"rank": 0, "x": [0]}, {"rank": 1, "x": [1, 1]}] and r1["gathered"] is None
    assert r0["tensors"] == [[0.0] * 3, [1.0] * 3] and r1["tensors"] is None


# ------------------------------------------------------------------------------- ZeRO-3 EMA


def _zero3_ema_ranks(rank: int, world: int, out_dir: str) -> None:
    import importlib

    import deepspeed

    from scldm_scale.train.ema import EMA

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
              "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ema = EMA(engine.module, 0.8, sharded=True)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        reference = {n: p.detach().float().clone() for n, p in params.items()}  # a full-model EMA
    sizes = {n: t.numel() for n, t in ema.shadow.items()}
    collectives = []
    real_all_gather = torch.distributed.all_gather_into_tensor
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(4, 7, generator=gen)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        torch.distributed.all_gather_into_tensor = lambda *a, **k: collectives.append(1)  # none in update()
        ema.update()
        torch.distributed.all_gather_into_tensor = real_all_gather
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for n, p in params.items():
                reference[n].lerp_(p.detach().float(), 0.2)
    full = ema.consolidated()
    if rank == 0:
        same = all(torch.equal(full[n], reference[n]) for n in reference)
        with open(os.path.join(out_dir, "zero3_ema.json"), "w") as f:
            json.dump({"same": same, "sizes": sizes, "numel": {n: reference[n].numel() for n in reference},
                       "collectives_in_update": len(collectives)}, f)


def test_zero3_ema_keeps_partitions_and_gathers_to_the_full_ema(tmp_path):
    run_distributed(_zero3_ema_ranks, tmp_path, world_size=2, args=(str(tmp_path),),
                    preload=("deepspeed",))
    got = json.loads((tmp_path / "zero3_ema.json").read_text())
    assert got["same"]
    assert got["collectives_in_update"] == 0
    for name, numel in got["numel"].items():
        assert got["sizes"][name] == -(-numel // 2)  # this rank's slice only
