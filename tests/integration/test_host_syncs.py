"""Between log steps a training step reads nothing back to the host: on a GPU every `.item()`,
`float(t)`, `int(t)`, `bool(t)` or `.tolist()` of a device tensor waits for the device.

Every such read during three optimizer steps (two micro-batches each) is attributed to the innermost
of: this project's code, torch's optimizers (their ``step`` counters are CPU tensors by design, also
on a GPU: not a device sync), DeepSpeed. None may come from this project's code. DeepSpeed's ZeRO
optimizers check at every optimizer step that the gradient norms are finite (to skip the step
otherwise): those reads happen in the last micro-batch of a step only, the same number every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cli_utils import REPO, TINY_LDM, TINY_VAE

pytestmark = pytest.mark.integration

DRIVER = """
import json
import sys
import traceback

import torch

from scldm_scale.cli import split_recipes
from scldm_scale.config import load_config
from scldm_scale.train.trainer import Trainer

out, items = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(*split_recipes(items)))
batches = trainer.batches()
for _ in range(4):  # warm-up: lazy initialisation, and ZeRO-3's recording of the parameter order
    trainer.train_step(batches)
calls = []
micro = [0]  # micro-batches started so far
real_loss = trainer.stage.loss


def counted_loss(*args, **kwargs):
    micro[0] += 1
    return real_loss(*args, **kwargs)


trainer.stage.loss = counted_loss
names = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist")
real = {name: getattr(torch.Tensor, name) for name in names}


def owner():
    for frame in reversed(traceback.extract_stack()[:-2]):
        for key, part in (("ours", "/scldm_scale/"), ("optimizer", "/torch/optim/"), ("deepspeed", "/deepspeed/")):
            if part in frame.filename:
                return key, f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
    return "other", ""


def counting(name):
    def method(self, *args, **kwargs):
        calls.append([name, *owner(), micro[0]])
        return real[name](self, *args, **kwargs)
    return method


for name in names:
    setattr(torch.Tensor, name, counting(name))
for _ in range(3):
    trainer.train_step(batches)
for name in names:
    setattr(torch.Tensor, name, real[name])
trainer.close()
json.dump({"calls": calls}, open(out, "w"))
"""


def _host_reads(root, name: str, *items: str) -> dict[str, list]:
    driver = root / "sync_driver.py"
    driver.write_text(DRIVER)
    out = root / f"{name}_syncs.json"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(driver), str(out), *items, f"run.output_dir={root}",
                           f"run.name={name}", "logging.progress=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    by_owner: dict[str, list] = {"ours": [], "optimizer": [], "deepspeed": [], "other": []}
    for name_, who, where, micro in json.loads(out.read_text())["calls"]:
        by_owner[who].append((f"{name_} at {where}", micro))
    return by_owner


def _only_at_optimizer_steps(reads: list, grad_accum: int = 2, steps: int = 3) -> bool:
    """Reads in the last micro-batch of each step only, the same number in every step."""
    per_step = [sum(1 for _, micro in reads if micro == (k + 1) * grad_accum) for k in range(steps)]
    return all(micro % grad_accum == 0 for _, micro in reads) and len(set(per_step)) == 1


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_no_host_reads_inside_a_vae_train_step(pipeline, tmp_path, zero_stage):
    reads = _host_reads(tmp_path, f"vae{zero_stage}", *TINY_VAE, f"data.path={pipeline / 'data'}",
                        "train.grad_accum=2", f"train.zero_stage={zero_stage}", "train.ema_decay=0.9")
    assert reads["ours"] == [] and reads["other"] == []
    assert _only_at_optimizer_steps(reads["deepspeed"]), reads["deepspeed"]
    if zero_stage == 0:
        assert reads["deepspeed"] == []


def test_no_host_reads_inside_an_ldm_train_step(pipeline, tmp_path):
    reads = _host_reads(tmp_path, "ldm", *TINY_VAE, *TINY_LDM, f"data.path={pipeline / 'data'}",
                        f"ldm.vae_run={pipeline / 'vae'}", "train.grad_accum=2", "train.ema_decay=0.9")
    assert reads["ours"] == [] and reads["other"] == []
    assert _only_at_optimizer_steps(reads["deepspeed"]), reads["deepspeed"]
