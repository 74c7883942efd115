"""Running the CLI in subprocesses (single process or torchrun with 2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, nproc: int = 1, timeout: int = 600, check: bool = True, cwd: Path | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `scldm-scale ARGS`, under `torchrun --standalone --nproc_per_node=N` when N > 1."""
    launcher = [sys.executable, "-m", "scldm_scale.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "scldm_scale.cli"]
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                **(env or {})}
    proc = subprocess.run([*launcher, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


TINY_VAE = [
    "recipes/quickstart.yaml", "vae_preset=", "vae.d_model=32", "vae.n_heads=2", "vae.n_latent_tokens=4",
    "vae.d_latent=4", "vae.n_encoder_layers=1", "vae.n_decoder_layers=1", "data.batch_size=16",
    "data.max_genes=64", "train.log_every=1", "logging.progress=false", "optim.warmup_steps=2",
]
TINY_LDM = [
    "recipes/quickstart_ldm.yaml", "dit_preset=", "dit.d_model=32", "dit.depth=1", "dit.n_heads=2",
    "data.batch_size=32", "optim.warmup_steps=2",
]
