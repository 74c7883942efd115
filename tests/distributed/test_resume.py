"""2 gloo ranks, DeepSpeed ZeRO-2: 2k steps straight == k steps + resume + k steps (losses and weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.cli_utils import TINY_LDM, TINY_VAE, cli, read_metrics

pytestmark = pytest.mark.distributed

K = 5


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def _assert_same_run(straight, resumed, ema: bool):
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(1, 2 * K + 1)) and sorted(b) == sorted(a)
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise equal on CPU fp32
    for name in ("model.safetensors",) + (("ema.safetensors",) if ema else ()):
        wa, wb = load_file(str(straight / "export" / name)), load_file(str(resumed / "export" / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_vae_and_ldm_resume_exactly(tiny_atlas, tmp_path):
    common = [f"data.path={tiny_atlas}", f"run.output_dir={tmp_path}", f"train.max_steps={2 * K}",
              "train.ckpt_every=0", "data.num_workers=1"]
    vae = [*TINY_VAE, *common, "train.ema_decay=0.9"]
    cli("train", *vae, "run.name=vae", nproc=2)
    cli("train", *vae, "run.name=vae_split", f"train.stop_at_step={K}", nproc=2)
    assert not (tmp_path / "vae_split" / "export").exists()  # stopped early: checkpoint only
    assert (tmp_path / "vae_split" / "checkpoints" / "latest").read_text() == f"step{K:08d}"
    cli("train", *vae, "run.name=vae_split", "run.resume=true", nproc=2)
    _assert_same_run(tmp_path / "vae", tmp_path / "vae_split", ema=True)
    losses = [r["loss"] for r in read_metrics(tmp_path / "vae")]
    assert losses[-1] < losses[0]

    cli("encode", "--vae-run", str(tmp_path / "vae"), "--quiet", nproc=2)
    ldm = [*TINY_VAE, *TINY_LDM, *common, f"ldm.vae_run={tmp_path / 'vae'}"]
    cli("train", *ldm, "run.name=ldm", nproc=2)
    cli("train", *ldm, "run.name=ldm_split", f"train.stop_at_step={K}", nproc=2)
    cli("train", *ldm, "run.name=ldm_split", "run.resume=true", nproc=2)
    _assert_same_run(tmp_path / "ldm", tmp_path / "ldm_split", ema=True)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_vae_resume_exactly_zero_stage(tiny_atlas, tmp_path, zero_stage):
    common = [*TINY_VAE, f"data.path={tiny_atlas}", f"run.output_dir={tmp_path}", f"train.max_steps={2 * K}",
              "train.ckpt_every=0", f"train.zero_stage={zero_stage}", "train.ema_decay=0.9"]
    cli("train", *common, "run.name=straight", nproc=2)
    cli("train", *common, "run.name=split", f"train.stop_at_step={K}", nproc=2)
    cli("train", *common, "run.name=split", "run.resume=true", nproc=2)
    _assert_same_run(tmp_path / "straight", tmp_path / "split", ema=True)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(tiny_atlas, tmp_path, before, after):
    """Universal checkpoint: the weights at the resume point are the saved ones; training goes on."""
    common = [*TINY_VAE, f"data.path={tiny_atlas}", f"run.output_dir={tmp_path}", f"train.max_steps={2 * K}",
              "train.ckpt_every=0", "train.ema_decay=0.9", "run.name=run", "data.batch_size=8"]
    cli("train", *common, f"train.stop_at_step={K}", nproc=before)
    cli("export", str(tmp_path / "run"))  # consolidated weights at the resume point
    at_resume = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    # resume and stop at once: the checkpoint it writes holds the weights it loaded
    cli("train", *common, "run.resume=true", f"train.stop_at_step={K}", nproc=after)
    cli("export", str(tmp_path / "run"))
    reloaded = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert reloaded.keys() == at_resume.keys()
    assert all(torch.equal(reloaded[k], at_resume[k]) for k in at_resume)
    proc = cli("train", *common, "run.resume=true", nproc=after)
    assert f"continuing from step {K}" in proc.stdout
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run")}
    assert sorted(losses) == list(range(1, 2 * K + 1))
    assert all(np.isfinite(v) for v in losses.values())
    final = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert final.keys() == at_resume.keys()
    assert any(not torch.equal(final[k], at_resume[k]) for k in final)  # it trained on
