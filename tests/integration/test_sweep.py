"""`scldm-scale sweep` and `report` end to end on tiny models: interrupted runs resume, finished
runs are skipped, the report has its table, plots and summary; a stage-2 grid records LDM metrics."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.cli_utils import REPO, cli, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {"data.batch_size": 16, "data.max_genes": 64, "vae.n_latent_tokens": 4, "vae.d_latent": 4,
        "train.cells": 96, "train.n_zero_genes": 32, "train.log_every": 1, "optim.warmup_steps": 2}


def _grid(tmp_path: Path, atlas: Path, name: str, axes: str, extra: str = "",
          eval_spec: str = "{heldout_cells: 50}") -> Path:
    fixed = {**TINY, "data.path": str(atlas)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nrecipes: [{REPO / 'recipes' / 'scaling' / 'base.yaml'}]\n"
                    f"fixed: {json.dumps(fixed)}\naxes: {axes}\neval: {eval_spec}\n{extra}")
    return path


def test_sweep_resumes_interrupted_runs_skips_finished_ones_and_reports(tmp_path, tiny_atlas):
    grid = _grid(tmp_path, tiny_atlas, "width", "{vae.d_model: [16, 32, 48]}")
    out = tmp_path / "sweep"
    names = ["vae-d_model16-s0", "vae-d_model32-s0", "vae-d_model48-s0"]

    # 1. every run stops after 3 of its 6 steps (a planned interruption): checkpoint, no export, no result
    proc = cli("sweep", str(grid), "train.stop_at_step=3", "--out", str(out), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count(": interrupted") == 3
    for name in names:
        assert (out / name / "checkpoints" / "latest").is_file()
        assert not (out / name / "export").exists() and not (out / name / "result.json").exists()

    # 2. the same sweep again: each run resumes at step 3 and finishes, then is measured
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.stdout.count(": finished") == 3, proc.stdout
    for name, width in zip(names, (16, 32, 48)):
        log = (out / name / "train.log").read_text()
        assert "resume: continuing from step 3" in log
        steps = [r["step"] for r in read_metrics(out / name)]
        assert steps == [1, 2, 3, 4, 5, 6]
        result = json.loads((out / name / "result.json").read_text())
        assert result["steps"] == 6 and result["cells_seen"] == 96 and result["global_batch"] == 16
        assert result["config"]["vae.d_model"] == width and result["config"]["vae.n_heads"] == width // 8  # base: heads of 8
        assert result["flops"] == pytest.approx(result["flops_per_cell"] * 96)
        assert 0 < result["params_non_embedding"] < result["params"]
        assert result["val_nll_per_cell"] > 0 and result["val_cells"] == 50
        attempts = [json.loads(line) for line in (out / name / "sweep_attempts.jsonl").read_text().splitlines()]
        assert len(attempts) == 2 and result["wall_s"] == pytest.approx(sum(a["seconds"] for a in attempts))
    sizes = [json.loads((out / n / "result.json").read_text())["params"] for n in names]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3

    # 3. and again: nothing left to do
    stamps = {n: (out / n / "result.json").stat().st_mtime_ns for n in names}
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.stdout.count(": done") == 3 and "3 done" in proc.stdout
    assert stamps == {n: (out / n / "result.json").stat().st_mtime_ns for n in names}

    # 4. the report
    proc = cli("report", str(out), "--bootstrap", "100")
    report = out / "report"
    table = pd.read_csv(report / "runs.csv")
    assert sorted(table["name"]) == sorted(names) and len(pd.read_parquet(report / "runs.parquet")) == 3
    for png in ("loss_vs_params.png", "loss_vs_flops.png"):
        assert (report / png).stat().st_size > 5_000
    summary = (report / "summary.md").read_text()
    assert "| width | vae | parameters (non-embedding) | - | 3 |" in summary
    assert "train.cells=96" in summary and "## Compute-optimal frontier (vae)" in summary


def test_stage_two_grid_records_flow_loss_and_sample_metrics(tmp_path, tiny_atlas):
    (tmp_path / "ldm.yaml").write_text(
        f"run: {{stage: ldm}}\ndit_preset: ''\ndit: {{d_model: 32, n_heads: 0, depth: 1}}\nscale: {{dit_head_dim: 16}}\n"
        "data: {batch_size: 32}\noptim: {warmup_steps: 2}\ntrain: {cells: 128, ema_decay: 0.9}\n"
        "flow: {sampler: euler, num_steps: 4}\n")
    grid = _grid(tmp_path, tiny_atlas, "dit", "{}", "ldm: {recipes: [ldm.yaml], axes: {dit.d_model: [16, 32]}}\n",
                 eval_spec="{heldout_cells: 50, sample_cells: 40, flow_draws: 2}")
    out = tmp_path / "sweep"
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.stdout.count(": finished") == 3, proc.stdout
    assert (out / "vae-s0" / "latents" / "manifest.json").is_file()  # encoded once, for both stage-2 runs
    for width in (16, 32):
        result = json.loads((out / f"ldm-d_model{width}-s0" / "result.json").read_text())
        assert result["stage"] == "ldm" and result["config"]["dit.d_model"] == width
        assert result["config"]["dit.n_heads"] == width // 16 and result["steps"] == 4
        assert result["val_flow_loss"] > 0 and result["sample_cells"] == 40
        assert result["sample_mmd"] >= 0 and result["sample_w2"] > 0
        assert result["flops"] == pytest.approx(result["flops_per_cell"] * 128)
