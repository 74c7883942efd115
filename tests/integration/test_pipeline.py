"""The CLI end to end on a tiny atlas: prepare -> train vae -> encode -> train ldm -> generate -> evaluate."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.cli_utils import cli, read_metrics

pytestmark = pytest.mark.integration


def test_vae_and_ldm_losses_are_finite_and_decrease(pipeline):
    for name in ("vae", "ldm"):
        losses = [r["loss"] for r in read_metrics(pipeline / name)]
        assert len(losses) == 40 and np.all(np.isfinite(losses))
        assert np.mean(losses[-8:]) < np.mean(losses[:8]), (name, losses)
        assert (pipeline / name / "checkpoints" / "latest").is_file()
        assert (pipeline / name / "export" / "model.safetensors").is_file()
        assert (pipeline / name / "config.yaml").is_file() and (pipeline / name / "deepspeed.json").is_file()
    ds = json.loads((pipeline / "vae" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2


def test_latent_cache_covers_training_cells_once(pipeline):
    from scldm_scale.data.latent_cache import read_latent_stats

    stats = read_latent_stats(pipeline / "vae" / "latents")
    meta = json.loads((pipeline / "data" / "metadata.json").read_text())
    assert stats["n_cells"] == meta["n_cells"] == sum(s["n_cells"] for s in meta["shards"])
    assert stats["mean"].shape == stats["std"].shape == (4 * 4,)


def test_generate_honours_conditions_and_writes_integer_counts(pipeline):
    labels = json.loads((pipeline / "ldm" / "export" / "labels.json").read_text())
    cats = labels["categories"]["cell_type"]
    a, b = cats[0], cats[1]
    out = pipeline / "gen.h5ad"
    cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(out), "--condition", f"cell_type={a}:7",
        "--condition", f"cell_type={b},tissue=tissue_0:5", "--guidance", "cell_type=2", "--steps", "4", "--quiet")
    gen = ad.read_h5ad(out)
    x = gen.X.toarray()
    assert gen.n_obs == 12 and x.shape[1] == 120
    assert np.issubdtype(x.dtype, np.integer) and (x >= 0).all() and x.sum() > 0
    assert (gen.obs["cell_type"] == a).sum() == 7 and (gen.obs["cell_type"] == b).sum() == 5
    assert (gen.obs["tissue"] == "tissue_0").sum() == 5
    assert gen.obsm["X_scldm"].shape == (12, 16)
    assert gen.uns["provenance"]["num_steps"] == 4
    # reproducible by seed
    out2 = pipeline / "gen2.h5ad"
    cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(out2), "--condition", f"cell_type={a}:7",
        "--condition", f"cell_type={b},tissue=tissue_0:5", "--guidance", "cell_type=2", "--steps", "4", "--quiet")
    assert np.array_equal(ad.read_h5ad(out2).X.toarray(), x)


def test_generate_sde_sampler_is_seeded_and_recorded(pipeline):
    def gen(name, *extra):
        out = pipeline / name
        cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(out), "--match",
            str(pipeline / "data" / "heldout.h5ad"), "--n-cells", "16", "--steps", "6", "--quiet", *extra)
        return ad.read_h5ad(out)

    sde = gen("sde.h5ad", "--sampler", "sde", "--diffusion", "2")
    assert sde.uns["provenance"]["sampler"] == "sde" and sde.uns["provenance"]["sde_diffusion"] == 2.0
    again = gen("sde2.h5ad", "--sampler", "sde", "--diffusion", "2")
    np.testing.assert_array_equal(again.obsm["X_scldm"], sde.obsm["X_scldm"])
    euler = gen("euler.h5ad", "--sampler", "euler")
    assert "sde_diffusion" not in euler.uns["provenance"]
    # same initial noise: the Brownian increments are what moves the latents away from the ODE path
    assert not np.allclose(euler.obsm["X_scldm"], sde.obsm["X_scldm"])
    np.testing.assert_allclose(gen("sde0.h5ad", "--sampler", "sde", "--diffusion", "0").obsm["X_scldm"],
                               euler.obsm["X_scldm"], rtol=1e-5, atol=1e-5)
    proc = cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(pipeline / "bad_sde.h5ad"),
               "--condition", "cell_type=" + str(sde.obs["cell_type"].iloc[0]) + ":2", "--sampler", "heun",
               "--diffusion", "1", check=False)
    assert proc.returncode == 2 and "--sampler sde" in proc.stderr
    assert not (pipeline / "bad_sde.h5ad").exists()


def test_generate_guidance_interval(pipeline):
    def gen(name, *extra, run=pipeline / "ldm"):
        out = pipeline / name
        cli("generate", "--ldm-run", str(run), "--out", str(out), "--match",
            str(pipeline / "data" / "heldout.h5ad"), "--n-cells", "16", "--steps", "6", "--no-ema", "--quiet", *extra)
        return ad.read_h5ad(out)

    # the 40-step DiT barely separates its labels yet: a large weight makes guidance visible
    everywhere = gen("gi_all.h5ad", "--guidance", "cell_type=1000")
    assert everywhere.uns["provenance"]["guidance_interval"].tolist() == [0.0, 1.0]  # the recipe default
    part = gen("gi_part.h5ad", "--guidance", "cell_type=1000", "--guidance-interval", "0.3", "0.8")
    assert part.uns["provenance"]["guidance_interval"].tolist() == [0.3, 0.8]
    assert np.abs(part.obsm["X_scldm"] - everywhere.obsm["X_scldm"]).max() > 1e-3
    # an interval that holds none of the sampler's times is the plain conditional (weight 1)
    none = gen("gi_none.h5ad", "--guidance", "cell_type=1000", "--guidance-interval", "0.91", "0.92")
    plain = gen("gi_plain.h5ad", "--guidance", "cell_type=1")
    np.testing.assert_allclose(none.obsm["X_scldm"], plain.obsm["X_scldm"], rtol=1e-6, atol=1e-6)
    assert np.abs(part.obsm["X_scldm"] - plain.obsm["X_scldm"]).max() > 1e-3
    # the run's flow.guidance_interval is the default of generate
    run = pipeline / "ldm_interval"
    shutil.copytree(pipeline / "ldm" / "export", run / "export")
    cfg = OmegaConf.load(run / "export" / "config.yaml")
    cfg.flow.guidance_interval = [0.91, 0.92]
    OmegaConf.save(cfg, run / "export" / "config.yaml")
    from_cfg = gen("gi_cfg.h5ad", "--guidance", "cell_type=1000", run=run)
    assert from_cfg.uns["provenance"]["guidance_interval"].tolist() == [0.91, 0.92]
    np.testing.assert_allclose(from_cfg.obsm["X_scldm"], plain.obsm["X_scldm"], rtol=1e-6, atol=1e-6)
    proc = cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(pipeline / "gi_bad.h5ad"),
               "--match", str(pipeline / "data" / "heldout.h5ad"), "--n-cells", "4",
               "--guidance-interval", "0.8", "0.3", check=False)
    assert proc.returncode == 2 and "--guidance-interval" in proc.stderr and "lo < hi" in proc.stderr
    assert not (pipeline / "gi_bad.h5ad").exists()


def test_generate_rejects_unknown_condition_value(pipeline):
    proc = cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(pipeline / "bad.h5ad"),
               "--condition", "cell_type=dragon:3", check=False)
    assert proc.returncode == 2
    assert "dragon" in proc.stderr and "cell_type" in proc.stderr
    assert not (pipeline / "bad.h5ad").exists()


def test_evaluate_writes_metrics_json(pipeline):
    out = pipeline / "gen_eval.h5ad"
    cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(out), "--match",
        str(pipeline / "data" / "heldout.h5ad"), "--steps", "4", "--quiet")
    assert ad.read_h5ad(out).n_obs == ad.read_h5ad(pipeline / "data" / "heldout.h5ad").n_obs
    cli("evaluate", "--reference", str(pipeline / "data" / "heldout.h5ad"), "--generated", str(out),
        "--labels", "cell_type", "--out", str(pipeline / "eval.json"))
    metrics = json.loads((pipeline / "eval.json").read_text())
    for key in ("w2", "mmd", "knn_acc/cell_type"):
        assert np.isfinite(metrics[key])
