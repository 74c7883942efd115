"""Report: table, fits, frontier, plots and summary from sweep folders and from a W&B CSV export."""

import json

import numpy as np
import pandas as pd
import pytest

from scldm_scale.errors import ScldmError
from scldm_scale.scaling.report import collect, compute_frontier, read_wandb_csv, report

ALPHA_N, ALPHA_D = 0.4, 0.25


def _loss(params, cells):
    return 300.0 + 2e3 * params ** -ALPHA_N + 4e3 * cells ** -ALPHA_D


def _write_sweep(folder, grid, axes, points, rng):
    """A sweep folder as `scldm-scale sweep` leaves it, with losses from a known law (0.2% noise)."""
    folder.mkdir(parents=True)
    runs = []
    for width, cells in points:
        name = f"vae-d_model{width}-cells{cells}-s0"
        params = 50.0 * width ** 2
        point = {k: v for k, v in (("vae.d_model", width), ("train.cells", cells)) if k in axes}
        result = {"name": name, "grid": grid, "stage": "vae", "seed": 0, "hash": f"{width}-{cells}", "axes": axes,
                  "point": point, "config": {"vae.d_model": width, "train.cells": cells, "vae.n_latent_tokens": 8},
                  "params": params * 1.2, "params_non_embedding": params, "cells_seen": cells,
                  "flops_per_cell": 6 * params, "flops": 6 * params * cells, "steps": cells // 64, "wall_s": 1.0,
                  "val_nll_per_cell": _loss(params, cells) * float(np.exp(rng.normal(0, 0.002)))}
        (folder / name).mkdir()
        (folder / name / "result.json").write_text(json.dumps(result))
        runs.append({"name": name, "dir": name, "hash": result["hash"], "stage": "vae", "point": point})
    (folder / "sweep.json").write_text(json.dumps({"grid": grid, "axes": axes, "fixed": {"vae.n_latent_tokens": 8},
                                                   "runs": runs}))


@pytest.fixture()
def sweeps(tmp_path):
    rng = np.random.default_rng(0)
    widths = [16, 32, 64, 128, 256, 512, 1024, 2048]
    _write_sweep(tmp_path / "out" / "width", "width", ["vae.d_model"], [(w, 10**12) for w in widths], rng)
    _write_sweep(tmp_path / "out" / "width_data", "width_data", ["vae.d_model", "train.cells"],
                 [(w, c) for w in (16, 64, 256, 1024) for c in (10**4, 10**5, 10**6)], rng)
    return tmp_path / "out"


def test_report_writes_table_fits_plots_and_summary(sweeps, tmp_path):
    # a run without a result is listed as not finished, not dropped silently
    info = json.loads((sweeps / "width" / "sweep.json").read_text())
    info["runs"].append({"name": "vae-d_model4096-s0", "dir": "vae-d_model4096-s0", "hash": "x", "stage": "vae",
                         "point": {"vae.d_model": 4096}})
    (sweeps / "width" / "sweep.json").write_text(json.dumps(info))

    summary = report([sweeps], n_boot=200, level=0.9)
    out = sweeps / "report"
    assert summary == out / "summary.md"
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 8 + 12 and set(table["grid"]) == {"width", "width_data"}
    assert len(pd.read_parquet(out / "runs.parquet")) == len(table)
    for png in ("loss_vs_params.png", "loss_vs_cells_seen.png", "loss_vs_flops.png"):
        assert (out / png).stat().st_size > 10_000
    fits = pd.read_csv(out / "fits.csv")
    width = fits[(fits["grid"] == "width") & (fits["x"] == "params_non_embedding")].iloc[0]
    assert width["alpha"] == pytest.approx(ALPHA_N, rel=0.05)  # data term is constant at 1e12 cells
    assert width["alpha_lo"] <= ALPHA_N <= width["alpha_hi"]
    # the 2-D grid: one fit per value of the other axis (3 cell budgets, 4 widths each)
    slices = fits[(fits["grid"] == "width_data") & (fits["x"] == "params_non_embedding")]
    assert len(slices) == 3 and slices["points"].tolist() == [4, 4, 4]
    text = summary.read_text()
    assert "vae-d_model4096-s0" in text and "Not finished (1)" in text
    assert f"| width | vae | parameters (non-embedding) | - | 8 | {width['alpha']:.3g} |" in text
    assert "## Compute-optimal frontier (vae)" in text and "parameters ~ C^" in text
    frontier = pd.read_csv(out / "frontier.csv")
    assert set(frontier["grid"]) == {"width_data"}  # drawn from the two-axis grid
    assert (np.diff(frontier["flops"]) > 0).all() and (np.diff(frontier["val_nll_per_cell"]) < 0).all()


def test_frontier_keeps_only_runs_no_cheaper_run_beats():
    df = pd.DataFrame({"flops": [1, 2, 3, 4, 5], "loss": [10, 8, 9, 7, 7.5], "hash": list("abcde")})
    assert compute_frontier(df, "loss")["flops"].tolist() == [1, 2, 4]


def test_wandb_csv_export_gives_the_same_fits(sweeps, tmp_path):
    df, _, _ = collect([sweeps / "width"])
    export = pd.DataFrame({"Name": df["name"], "State": "finished", "Group": df["grid"],
                           "config.vae.d_model": df["vae.d_model"], "config.train.cells": df["train.cells"],
                           "config.vae.n_heads": df["vae.d_model"] // 16, "config.run.seed": 0,
                           "summary.params_non_embedding": df["params_non_embedding"], "summary.flops": df["flops"],
                           "summary.cells_seen": df["cells_seen"], "summary.val_nll_per_cell": df["val_nll_per_cell"]})
    crashed = export.iloc[:1].assign(State="crashed", **{"summary.val_nll_per_cell": 1.0})
    path = tmp_path / "wandb.csv"
    pd.concat([export, crashed]).to_csv(path, index=False)
    table = read_wandb_csv(path)
    assert len(table) == 8 and set(table["axes"]) == {"vae.d_model"}  # the varying key; derived n_heads is not an axis
    report([], out=tmp_path / "rep_wandb", wandb_csv=[path], n_boot=200, level=0.9)
    report([sweeps / "width"], out=tmp_path / "rep_dir", n_boot=200, level=0.9)
    a = pd.read_csv(tmp_path / "rep_wandb" / "fits.csv").iloc[0]
    b = pd.read_csv(tmp_path / "rep_dir" / "fits.csv").iloc[0]
    assert a["alpha"] == pytest.approx(b["alpha"]) and a["alpha_lo"] == pytest.approx(b["alpha_lo"])

    path.write_text("Name,Group,vae.d_model\nr1,g,16\n")
    with pytest.raises(ScldmError, match="no metric column"):
        read_wandb_csv(path)
    with pytest.raises(ScldmError, match="no sweep.json"):
        report([tmp_path / "empty"], out=tmp_path / "x")
