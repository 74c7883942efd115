"""Scaling grids: expansion (counts, names, resolved values), identity of runs, launch scripts."""

import json
import subprocess
from pathlib import Path

import pytest

from scldm_scale.errors import ScldmError
from scldm_scale.scaling.grid import expand, load_grid, resolve
from scldm_scale.scaling.sweep import RUN_RECIPE, SWEEP_FILE, plan, print_commands, write_plan, write_slurm

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "recipes" / "scaling" / "base.yaml"


def _grid(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nrecipes: [{BASE}]\n" + text)
    return path


def test_one_axis_runs_names_and_resolved_values(tmp_path):
    grid = load_grid(_grid(tmp_path, "w", "fixed: {train.cells: 4096, vae.n_latent_tokens: 4}\n"
                                          "axes: {vae.d_model: [16, 32, 64]}\nseeds: [0, 1]\n"))
    runs = expand(grid, tmp_path / "out")
    assert [r.name for r in runs] == [f"vae-d_model{d}-s{s}" for d in (16, 32, 64) for s in (0, 1)]
    for run in runs:
        cfg = resolve(run, world_size=1)
        assert cfg.vae.d_model == run.point["vae.d_model"]
        assert cfg.vae.n_heads == run.point["vae.d_model"] // 8  # base: scale.vae_head_dim 8
        assert cfg.vae.n_latent_tokens == 4  # fixed
        assert cfg.train.max_steps == 4096 // 64  # cell budget / batch 64
        assert cfg.run.name == run.name and cfg.run.output_dir == str(tmp_path / "out")
        assert cfg.run.seed == run.seed and cfg.data.seed == run.seed
        assert cfg.logging.wandb_group == "w"  # W&B runs of one sweep share a group
    # with two ranks the same budget takes half the steps
    assert resolve(runs[0], world_size=2).train.max_steps == 4096 // 128


def test_two_axes_are_a_product_and_ldm_runs_follow_their_vae(tmp_path):
    path = _grid(tmp_path, "wd", "axes: {vae.d_model: [16, 32], train.cells: [1024, 2048, 4096]}\n")
    runs = expand(load_grid(path), tmp_path)
    assert len(runs) == 6
    assert {(r.point["vae.d_model"], r.point["train.cells"]) for r in runs} == \
        {(d, c) for d in (16, 32) for c in (1024, 2048, 4096)}
    assert "vae-d_model32-cells2048-s0" in [r.name for r in runs]

    (tmp_path / "ldm.yaml").write_text("run: {stage: ldm}\ndit: {depth: 1, n_heads: 0}\n")
    path = _grid(tmp_path, "dit", "axes: {vae.d_model: [16, 32]}\n"
                                  "ldm: {recipes: [ldm.yaml], fixed: {train.cells: 512}, axes: {dit.d_model: [32, 64]}}\n")
    runs = expand(load_grid(path), tmp_path / "o")
    vae = [r for r in runs if r.stage.value == "vae"]
    ldm = [r for r in runs if r.stage.value == "ldm"]
    assert len(vae) == 2 and len(ldm) == 4
    assert runs[:2] == vae  # stage 1 first
    assert ldm[0].name == "ldm-vae_d_model16-dit_d_model32-s0"  # shared leaf 'd_model': full keys
    cfg = resolve(ldm[-1])
    assert cfg.dit.d_model == 64 and cfg.dit.n_heads == 2 and cfg.train.max_steps == 512 // 64
    assert cfg.ldm.vae_run == str(tmp_path / "o" / vae[1].name)


@pytest.mark.parametrize("text, match", [
    ("axes: {vae.d_model: [16]}\nfixd: {}\n", r"unknown key 'fixd'; did you mean 'fixed'"),
    ("axes: {vae.d_model: [16], vae.n_latent_tokens: [2], train.cells: [8]}\n", "3 axes"),
    ("axes: {vae.d_model: [16, 16]}\n", "repeated values"),
    ("fixed: {vae.d_model: 8}\naxes: {vae.d_model: [16]}\n", "both fixed and an axis"),
    ("axes: {vae.d_modl: [16]}\n", "vae.d_modl"),
])
def test_bad_grids_name_the_problem(tmp_path, text, match):
    with pytest.raises(ScldmError, match=match):
        grid = load_grid(_grid(tmp_path, "bad", text))
        for run in expand(grid, tmp_path):
            resolve(run)


def test_shared_points_train_once_and_a_changed_grid_is_refused(tmp_path):
    a = _grid(tmp_path, "a", "fixed: {train.cells: 1024}\naxes: {vae.d_model: [16, 32]}\n")
    b = _grid(tmp_path, "b", "fixed: {vae.d_model: 32}\naxes: {train.cells: [512, 1024]}\n")
    sweeps = plan([a, b], tmp_path / "out")
    shared = [r for r in sweeps[1].runs if r.same_as is not None]
    assert [r.spec.name for r in shared] == ["vae-cells1024-s0"]
    assert shared[0].same_as == tmp_path / "out" / "a" / "vae-d_model32-s0"
    for s in sweeps:
        write_plan(s, 1)
    entries = json.loads((tmp_path / "out" / "b" / SWEEP_FILE).read_text())["runs"]
    assert [e["dir"] for e in entries if e["same_as"]] == ["../a/vae-d_model32-s0"]
    assert (tmp_path / "out" / "a" / "vae-d_model16-s0" / RUN_RECIPE).is_file()
    assert not (tmp_path / "out" / "b" / "vae-cells1024-s0").exists()  # trained once, in grid a

    a.write_text(a.read_text().replace("train.cells: 1024", "train.cells: 2048"))
    with pytest.raises(ScldmError, match=r"other settings \(changed: train\.cells 1024 -> 2048"):
        write_plan(plan([a], tmp_path / "out" / "a")[0], 1)


def test_print_and_slurm_launchers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ldm.yaml").write_text("run: {stage: ldm}\n")
    grid = _grid(tmp_path, "g", "axes: {vae.d_model: [16, 32, 48]}\nldm: {recipes: [ldm.yaml]}\n"
                                "synthetic: {cells: 100, genes: 20}\n")
    sweeps = plan([grid], tmp_path / "out", ["train.log_every=5"], world_size=2)
    write_plan(sweeps[0], 2)
    text = print_commands(sweeps, [grid], tmp_path / "out", 2, ["train.log_every=5"])
    assert text.count(" train ") == 6 and text.count(" encode ") == 3
    assert "--nproc_per_node=2" in text and "prepare synthetic runs/scaling/synthetic_72k_t64" in text

    submit = write_slurm(sweeps, [grid], tmp_path / "out", 2, ["train.log_every=5"], "02:00:00",
                         ["--partition=gpu"], "python")
    stage1 = (submit.parent / "stage1.sbatch").read_text()
    assert "#SBATCH --array=0-2" in stage1 and "#SBATCH --gpus-per-node=2" in stage1
    assert "#SBATCH --partition=gpu" in stage1 and "--run \"$NAME\"" in stage1
    assert "g/vae-d_model48-s0" in stage1 and "train.log_every=5" in stage1
    assert "--dependency=afterany" in submit.read_text()
    for script in (submit, submit.parent / "stage1.sbatch", submit.parent / "stage2.sbatch"):
        subprocess.run(["bash", "-n", str(script)], check=True)
