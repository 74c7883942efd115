"""The LDM sample-quality callback: `sample/*` metrics at the configured steps, equal to generate + evaluate."""

from __future__ import annotations

import math

import anndata as ad
import pytest

from tests.cli_utils import TINY_LDM, TINY_VAE, cli, read_metrics

pytestmark = pytest.mark.integration

LDM_STEPS, SAMPLE_EVERY, SAMPLE_CELLS, FLOW_STEPS = 6, 3, 64, 4


def _ldm_args(root, name: str, *extra: str) -> list[str]:
    return [*TINY_VAE, *TINY_LDM, f"run.name={name}", f"ldm.vae_run={root / 'vae'}", f"run.output_dir={root}",
            f"train.max_steps={LDM_STEPS}", f"flow.num_steps={FLOW_STEPS}", f"train.sample_cells={SAMPLE_CELLS}",
            *extra]


@pytest.fixture(scope="module")
def runs(tiny_atlas, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_callback")
    cli("train", *TINY_VAE, "run.name=vae", "train.max_steps=8", f"data.path={tiny_atlas}", f"run.output_dir={root}")
    cli("encode", "--vae-run", str(root / "vae"), "--quiet")
    # two ranks: rank 0 samples while rank 1 waits for it at the next collective
    cli("train", *_ldm_args(root, "ldm", f"train.sample_every={SAMPLE_EVERY}"), nproc=2)
    return root


def _sample_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "sample/mmd" in r]


def test_sample_metrics_at_the_configured_steps(runs):
    records = _sample_records(runs / "ldm")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert math.isfinite(r["sample/mmd"]) and r["sample/mmd"] >= 0
        assert math.isfinite(r["sample/w2"]) and r["sample/w2"] > 0
    losses = [r["loss"] for r in read_metrics(runs / "ldm") if "loss" in r]
    assert len(losses) == LDM_STEPS  # the training records are all still there


def test_sample_metrics_equal_generate_then_evaluate_with_the_ema_weights(runs, tiny_atlas):
    """The last callback used the EMA weights the export holds: `generate` + `evaluate` on them give the same numbers."""
    from scldm_scale.api import ScLDM
    from scldm_scale.eval.evaluate import evaluate

    heldout = ad.read_h5ad(tiny_atlas / "heldout.h5ad")
    gen = ScLDM.load(runs / "ldm").generate(obs=heldout.obs, n_cells=SAMPLE_CELLS, seed=0)
    expected = evaluate(heldout, gen, label_keys=[], seed=0, per_condition=False)
    last = _sample_records(runs / "ldm")[-1]
    assert last["step"] == LDM_STEPS
    assert last["sample/mmd"] == pytest.approx(expected["mmd"], rel=1e-6, abs=1e-12)
    assert last["sample/w2"] == pytest.approx(expected["w2"], rel=1e-6)
    # the raw (non-EMA) weights sample other latents, so matching the EMA run is not a coincidence (the
    # counts of so short a run can coincide: an 8-step VAE decoder barely reads its latents yet)
    raw = ScLDM.load(runs / "ldm", ema=False).generate(obs=heldout.obs, n_cells=SAMPLE_CELLS, seed=0)
    latents_ema, latents_raw = gen.obsm["X_scldm"], raw.obsm["X_scldm"]
    assert abs(latents_ema - latents_raw).max() > 1e-3


def test_missing_reference_fails_at_start_up(runs):
    missing = runs / "nowhere" / "cells.h5ad"
    proc = cli("train", *_ldm_args(runs, "ldm_bad", "train.sample_every=3", f"ldm.sample_reference={missing}"),
               check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and str(missing) in errors[0] and "ldm.sample_reference" in errors[0]
    assert not (runs / "ldm_bad" / "checkpoints").exists()


def test_default_reference_is_heldout_beside_the_vae_data(tmp_path):
    from scldm_scale.errors import ScldmError
    from scldm_scale.train.sample_quality import resolve_sample_reference

    assert resolve_sample_reference("", str(tmp_path), 0) == ""
    with pytest.raises(ScldmError, match="heldout.h5ad.*ldm.sample_reference"):
        resolve_sample_reference("", str(tmp_path), 10)
    (tmp_path / "heldout.h5ad").write_bytes(b"")
    assert resolve_sample_reference("", str(tmp_path), 10) == str(tmp_path / "heldout.h5ad")
    assert resolve_sample_reference("", str(tmp_path / "shard_*.h5ad"), 10) == str(tmp_path / "heldout.h5ad")
