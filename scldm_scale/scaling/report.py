"""`scldm-scale report`: sweep results -> one table, power-law fits with intervals, plots, a summary.

Inputs: sweep folders (``sweep.json`` in the folder or in its sub-folders, one per grid) and/or
W&B CSV exports of the same runs (:func:`read_wandb_csv`). Outputs, in ``--out``:

    runs.csv, runs.parquet      one row per run: grid, stage, axis values, config knobs, params,
                                FLOPs, cells seen, wall time, held-out metrics
    fits.csv                    one row per fit: grid, slice, X, points, a, alpha, c and intervals
    frontier.csv                the compute frontier: runs no cheaper run beats
    loss_vs_<X>.png             loss vs params / latent tokens / cells seen / FLOPs, fits and bands
    summary.md                  what moved and what stayed fixed, the exponents, the frontier

Fits: ``L = a * X^(-alpha) + c`` (:mod:`scldm_scale.scaling.fit`) of the held-out metric
(VAE: ``val_nll_per_cell``; LDM: ``val_flow_loss``) against each axis: a width axis is measured
in non-embedding parameters, ``vae.n_latent_tokens`` in latent tokens, ``train.cells`` in cells
seen; in a two-axis grid, one fit per value of the other axis. Loss vs compute: the runs on the
frontier (the lowest loss reached at or below each FLOP count), fitted the same way; with model
size and data as the two axes, the frontier also gives the compute-optimal size and cells.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from scldm_scale.errors import ScldmError
from scldm_scale.scaling.fit import BootstrapMethod, PowerLawFit, bootstrap_fit, fit_loglinear
from scldm_scale.scaling.sweep import RESULT_FILE, SWEEP_FILE

METRIC = {"vae": "val_nll_per_cell", "ldm": "val_flow_loss"}
METRIC_TITLE = {"val_nll_per_cell": "held-out NB NLL per cell", "val_flow_loss": "held-out flow loss"}
# Config keys that follow from others (never an axis of their own when inferring axes from a table).
DERIVED_KEYS = ("vae.n_heads", "dit.n_heads", "train.max_steps", "dit.n_tokens", "dit.d_in", "vae.n_genes",
                "run.seed", "data.seed", "run.name", "run.output_dir", "ldm.vae_run", "ldm.latents")
WIDTH_SUFFIXES = (".d_model", ".depth", ".n_encoder_layers", ".n_decoder_layers", ".mlp_ratio")


def x_column(axis: str, stage: str = "vae") -> str:
    """The table column an axis is measured in (a VAE size axis of stage-2 runs: its own value)."""
    if axis.endswith(WIDTH_SUFFIXES) and not (stage == "ldm" and axis.startswith("vae.")):
        return "params_non_embedding"
    if axis in ("train.cells", "train.max_steps"):
        return "cells_seen"
    return axis


X_TITLE = {"params_non_embedding": "parameters (non-embedding)", "cells_seen": "cells seen",
           "vae.n_latent_tokens": "latent tokens m", "flops": "training FLOPs"}
X_FILE = {"params_non_embedding": "params", "cells_seen": "cells_seen", "vae.n_latent_tokens": "latent_tokens",
          "flops": "flops"}


# --------------------------------------------------------------------------------------------- collecting


def _sweep_files(path: Path) -> list[Path]:
    if (path / SWEEP_FILE).is_file():
        return [path / SWEEP_FILE]
    return sorted(path.glob(f"*/{SWEEP_FILE}"))


def collect(dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """(one row per finished run, the sweeps' descriptions, runs still missing a result)."""
    rows, sweeps, missing = [], [], []
    for folder in map(Path, dirs):
        files = _sweep_files(folder)
        if not files:
            raise ScldmError(f"{folder}: no {SWEEP_FILE} here or in its sub-folders; pass the --out of `scldm-scale sweep`")
        for file in files:
            info = json.loads(file.read_text())
            sweeps.append(info)
            for entry in info["runs"]:
                path = file.parent / entry["dir"] / RESULT_FILE
                if not path.is_file():
                    missing.append(f"{info['grid']}/{entry['name']}")
                    continue
                result = json.loads(path.read_text())
                if result.get("hash") != entry["hash"]:
                    missing.append(f"{info['grid']}/{entry['name']}")
                    continue
                rows.append(_row(result, info["grid"], entry["name"], info["axes"]))
    return pd.DataFrame(rows), sweeps, missing


def _row(result: dict, grid: str, name: str, axes: list[str]) -> dict[str, Any]:
    row = {"grid": grid, "name": name, "stage": result["stage"], "seed": result.get("seed", 0),
           "hash": result.get("hash", ""), "axes": ";".join(axes)}
    row.update({k: v for k, v in result.get("config", {}).items()})
    row.update({k: v for k, v in result.get("point", {}).items()})
    for key, value in result.items():
        if key not in ("config", "point", "axes", "name", "grid", "stage", "seed", "hash") and \
                isinstance(value, (int, float, str)) and not isinstance(value, bool):
            row[key] = value
    return row


def read_wandb_csv(path: str | Path) -> pd.DataFrame:
    """A W&B runs-table CSV export (or any CSV) in the table's format.

    Expected: one row per run; ``Name``/``name``; ``Group``/``group``/``grid`` (the sweep's W&B
    group, ``logging.wandb_group``); config keys as dotted columns (``vae.d_model``, ``train.cells``,
    ...; a ``config.`` or ``summary.`` prefix is dropped); the result columns ``params_non_embedding``
    (or ``params``), ``flops``, ``cells_seen`` and the metric (``val_nll_per_cell`` / ``val_flow_loss``).
    Optional: ``stage`` (else from which metric is present), ``axes`` (``;``-separated; else the
    config columns that vary within a group, derived keys excluded), ``State`` (only ``finished``
    rows are kept).
    """
    path = Path(path)
    if not path.is_file():
        raise ScldmError(f"{path}: W&B export not found; export the runs table as CSV")
    df = pd.read_csv(path)
    rename = {}
    for col in df.columns:
        new = col
        for prefix in ("config.", "summary."):
            if new.startswith(prefix):
                new = new[len(prefix):]
        new = {"Name": "name", "Group": "grid", "group": "grid", "State": "state"}.get(new, new)
        rename[col] = new
    df = df.rename(columns=rename)
    if "state" in df.columns:
        df = df[df["state"].astype(str).str.lower() == "finished"]
    if "name" not in df.columns or "grid" not in df.columns:
        raise ScldmError(f"{path}: needs a Name (or name) and a Group (or group / grid) column")
    if "stage" not in df.columns:
        df["stage"] = np.where(df.get("val_flow_loss", pd.Series(np.nan, index=df.index)).notna(), "ldm", "vae")
    if "params_non_embedding" not in df.columns and "params" in df.columns:
        df["params_non_embedding"] = df["params"]
    if "seed" not in df.columns:
        df["seed"] = df["run.seed"] if "run.seed" in df.columns else 0
    if "axes" not in df.columns:
        df["axes"] = ""
    for grid, part in df.groupby("grid"):
        if part["axes"].astype(str).str.len().max() > 0:
            continue
        varying = [c for c in part.columns if "." in c and not c.startswith(("logging.", "plan."))
                   and c not in DERIVED_KEYS and part[c].nunique(dropna=True) > 1]
        if len(varying) > 2:
            raise ScldmError(f"{path}: group '{grid}' varies {varying}; add an 'axes' column naming its one or two axes")
        df.loc[part.index, "axes"] = ";".join(varying)
    metric_cols = [m for m in METRIC.values() if m in df.columns]
    if not metric_cols:
        raise ScldmError(f"{path}: no metric column ({', '.join(METRIC.values())}); export the runs' summary metrics")
    return df[df[metric_cols].notna().any(axis=1)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- fits


@dataclass
class FitRow:
    grid: str
    stage: str
    metric: str
    x: str  # table column of X
    axis: str  # the grid axis (or "flops")
    slice: str  # "" or "other.axis=value"
    fit: PowerLawFit | None
    xs: np.ndarray
    ys: np.ndarray

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"grid": self.grid, "stage": self.stage, "metric": self.metric, "axis": self.axis,
                               "x": self.x, "slice": self.slice, "points": len(self.xs)}
        if self.fit is None:
            return out
        out.update(a=self.fit.law.a, alpha=self.fit.law.alpha, c=self.fit.law.c, rmse_log=self.fit.rmse_log,
                   level=self.fit.level, bootstrap=self.fit.method)
        for key, (lo, hi) in self.fit.intervals.items():
            out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
        return out


def _fit(xs, ys, n_boot: int, level: float, seed: int, method: BootstrapMethod) -> PowerLawFit | None:
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    if len(np.unique(xs[ok])) < 3:
        return None
    return bootstrap_fit(xs[ok], ys[ok], n_boot=n_boot, level=level, seed=seed, method=method)


def metric_of(stage: str) -> str:
    return METRIC[stage]


def axis_fits(df: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
              method: BootstrapMethod = BootstrapMethod.RESIDUALS) -> list[FitRow]:
    """One fit per (grid, stage, axis) and, in two-axis grids, per value of the other axis."""
    rows: list[FitRow] = []
    for (grid, stage), part in df.groupby(["grid", "stage"], sort=True):
        metric = metric_of(stage)
        if metric not in part.columns:
            continue
        axes = [a for a in str(part["axes"].iloc[0]).split(";") if a]
        for axis in axes:
            x = x_column(axis, stage)
            if x not in part.columns:
                continue
            others = [o for o in axes if o != axis and o in part.columns]
            groups = part.groupby(others, sort=True) if others else [((), part)]
            for key, sub in groups:
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join(f"{o}={v}" for o, v in zip(others, key))
                xs, ys = sub[x].to_numpy(float), sub[metric].to_numpy(float)
                rows.append(FitRow(grid, stage, metric, x, axis, label, _fit(xs, ys, n_boot, level, seed, method),
                                   xs, ys))
    return rows


def compute_frontier(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Runs that no cheaper (fewer FLOPs) run beats, by increasing FLOPs; one row per distinct run
    (the same config in several grids counts once)."""
    part = df[np.isfinite(df["flops"].astype(float)) & df[metric].notna()].copy()
    part = part.drop_duplicates(subset="hash") if "hash" in part.columns and part["hash"].astype(str).str.len().min() \
        else part
    part = part.sort_values(["flops", metric])
    best = math.inf
    keep = []
    for idx, row in part.iterrows():
        if row[metric] < best:
            keep.append(idx)
            best = row[metric]
    return part.loc[keep]


def frontier_source(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The runs the compute frontier is drawn from: two-axis grids when there are some, else all runs."""
    part = df[df["stage"] == stage]
    two = part[part["axes"].astype(str).str.count(";") >= 1]
    return two if len(two) else part


# --------------------------------------------------------------------------------------------- plots


def _plot_axis(fits: list[FitRow], x: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [f for f in fits if f.x == x]
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, f in enumerate(chosen):
        color = colors[i % len(colors)]
        label = f"{f.grid}" + (f" ({f.slice})" if f.slice else "")
        ax.scatter(f.xs, f.ys, color=color, s=22, zorder=3)
        if f.fit is not None:
            grid_x = np.geomspace(np.nanmin(f.xs), np.nanmax(f.xs), 100)
            lo, hi = f.fit.band(grid_x)
            ax.fill_between(grid_x, lo, hi, color=color, alpha=0.18, linewidth=0)
            a_lo, a_hi = f.fit.intervals.get("alpha", (math.nan, math.nan))
            label += f": alpha {f.fit.law.alpha:.3g} [{a_lo:.3g}, {a_hi:.3g}]"
            ax.plot(grid_x, f.fit.law(grid_x), color=color, label=label)
        else:
            ax.plot([], [], color=color, marker="o", linestyle="", label=label + ": too few points to fit")
    ax.set_xscale("log")
    ax.set_xlabel(X_TITLE.get(x, x))
    metrics = sorted({f.metric for f in chosen})
    ax.set_ylabel(" / ".join(METRIC_TITLE.get(m, m) for m in metrics))
    level = next((f.fit.level for f in chosen if f.fit is not None), 0)
    ax.set_title(f"L = a X^-alpha + c" + (f", {level:.0%} bootstrap intervals" if level else ""), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    path = out / f"loss_vs_{X_FILE.get(x, x.replace('.', '_'))}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_compute(df: pd.DataFrame, frontier: pd.DataFrame, fit: PowerLawFit | None, metric: str,
                  out: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    part = df[df[metric].notna()].sort_values("flops")
    size_key = "params_non_embedding" if "params_non_embedding" in part.columns else None
    if size_key is not None and part[size_key].nunique() > 1:
        for size, sub in part.groupby(size_key):
            ax.plot(sub["flops"], sub[metric], marker="o", markersize=4, linewidth=1,
                    label=f"{size / 1e6:.3g}M params" if size >= 1e5 else f"{size / 1e3:.3g}k params")
    else:
        ax.scatter(part["flops"], part[metric], s=18, label="runs")
    ax.scatter(frontier["flops"], frontier[metric], s=70, facecolors="none", edgecolors="black", zorder=4,
               label="frontier")
    if fit is not None:
        grid_x = np.geomspace(frontier["flops"].min(), frontier["flops"].max(), 100)
        lo, hi = fit.band(grid_x)
        ax.fill_between(grid_x, lo, hi, color="black", alpha=0.12, linewidth=0)
        a_lo, a_hi = fit.intervals.get("alpha", (math.nan, math.nan))
        ax.plot(grid_x, fit.law(grid_x), color="black",
                label=f"frontier fit: alpha {fit.law.alpha:.3g} [{a_lo:.3g}, {a_hi:.3g}]")
    ax.set_xscale("log")
    ax.set_xlabel(X_TITLE["flops"])
    ax.set_ylabel(METRIC_TITLE.get(metric, metric))
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ci(fit: PowerLawFit, key: str) -> str:
    lo, hi = fit.intervals.get(key, (math.nan, math.nan))
    return f"[{_fmt(lo, 3)}, {_fmt(hi, 3)}]"


def write_report(df: pd.DataFrame, out: str | Path, sweeps: Sequence[dict] = (), missing: Sequence[str] = (),
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 method: BootstrapMethod | str = BootstrapMethod.RESIDUALS) -> Path:
    """Table, fits, plots and ``summary.md`` in ``out``; returns the summary's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if df.empty:
        raise ScldmError("report: no finished runs to report; run `scldm-scale sweep` first")
    method = BootstrapMethod(method)
    df = df.reset_index(drop=True)
    df.to_csv(out / "runs.csv", index=False)
    df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(out / "runs.parquet", index=False)

    fits = axis_fits(df, n_boot=n_boot, level=level, seed=seed, method=method)
    plots = [p for x in dict.fromkeys(f.x for f in fits) if (p := _plot_axis(fits, x, out)) is not None]

    compute: list[tuple[str, pd.DataFrame, PowerLawFit | None, dict]] = []
    for stage in sorted(df["stage"].unique()):
        metric = metric_of(stage)
        if metric not in df.columns or "flops" not in df.columns:
            continue
        source = frontier_source(df, stage)
        frontier = compute_frontier(source, metric)
        fit = _fit(frontier["flops"], frontier[metric], n_boot, level, seed, method)
        optimal = {}
        two_axes = bool((source["axes"].astype(str).str.count(";") >= 1).all())
        for col in ("params_non_embedding", "cells_seen"):
            if two_axes and col in frontier.columns and len(frontier) >= 3 and frontier[col].nunique() >= 2:
                slope = fit_loglinear(frontier["flops"], frontier[col])
                if slope is not None:
                    optimal[col] = slope[0]
        name = "loss_vs_flops.png" if stage == "vae" else f"loss_vs_flops_{stage}.png"
        plots.append(_plot_compute(source, frontier, fit, metric, out, name))
        frontier.assign(stage=stage).to_csv(out / ("frontier.csv" if stage == "vae" else f"frontier_{stage}.csv"),
                                            index=False)
        compute.append((stage, frontier, fit, optimal))
        fits.append(FitRow("frontier", stage, metric, "flops", "flops", "", fit, frontier["flops"].to_numpy(float),
                           frontier[metric].to_numpy(float)))
    pd.DataFrame([f.record() for f in fits]).to_csv(out / "fits.csv", index=False)

    lines = ["# Scaling report", ""]
    lines.append(f"{len(df)} runs from {df['grid'].nunique()} grid(s); metric: "
                 + "; ".join(f"{METRIC_TITLE[metric_of(s)]} (`{metric_of(s)}`, {s} runs)" for s in sorted(df['stage'].unique()))
                 + f". Fits: `L = a * X^(-alpha) + c`, least squares on log L; {level:.0%} bootstrap intervals "
                 f"({method.value}, {n_boot} refits).")
    if missing:
        lines += ["", f"Not finished ({len(missing)}): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")]
    if sweeps:
        lines += ["", "## Grids", "", "| grid | axes | fixed | runs |", "|---|---|---|---|"]
        for info in sweeps:
            fixed = {**info.get("fixed", {}), **{f"(ldm) {k}": v for k, v in info.get("ldm_fixed", {}).items()}}
            fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "-"
            axes = "; ".join(f"{a} ({X_TITLE.get(x_column(a), x_column(a))})" for a in info["axes"])
            lines.append(f"| {info['grid']} | {axes} | {fixed_text} | {len(info['runs'])} |")
    lines += ["", "## Exponents", "", "| grid | stage | X | slice | points | alpha | interval | a | c | interval (c) | rmse log |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        if f.fit is None:
            lines.append(f"| {f.grid} | {f.stage} | {X_TITLE.get(f.x, f.x)} | {f.slice or '-'} | {len(f.xs)} | "
                         "- | too few distinct X values (3 needed) | - | - | - | - |")
            continue
        law = f.fit.law
        lines.append(f"| {f.grid} | {f.stage} | {X_TITLE.get(f.x, f.x)} | {f.slice or '-'} | {len(f.xs)} | "
                     f"{law.alpha:.3g} | {_ci(f.fit, 'alpha')} | {law.a:.3g} | {law.c:.4g} | {_ci(f.fit, 'c')} | "
                     f"{f.fit.rmse_log:.2g} |")
    for stage, frontier, fit, optimal in compute:
        metric = metric_of(stage)
        lines += ["", f"## Compute-optimal frontier ({stage})", "",
                  "Runs that no run with fewer training FLOPs beats (FLOPs = training FLOPs per cell, forward "
                  "and backward, x cells seen).", "",
                  "| FLOPs | loss | params (non-emb.) | cells seen | run |", "|---|---|---|---|---|"]
        for _, row in frontier.iterrows():
            lines.append(f"| {row['flops']:.3g} | {row[metric]:.5g} | {_fmt(row.get('params_non_embedding'))} | "
                         f"{_fmt(row.get('cells_seen'))} | {row['grid']}/{row['name']} |")
        if fit is not None:
            lines += ["", f"Loss vs compute on the frontier: alpha_C = {fit.law.alpha:.3g} {_ci(fit, 'alpha')}, "
                      f"c = {fit.law.c:.4g} {_ci(fit, 'c')}."]
        if optimal:
            parts = []
            if "params_non_embedding" in optimal:
                parts.append(f"parameters ~ C^{optimal['params_non_embedding']:.2f}")
            if "cells_seen" in optimal:
                parts.append(f"cells ~ C^{optimal['cells_seen']:.2f}")
            lines += ["", "Along the frontier (log-log slopes over its runs): " + ", ".join(parts) + "."]
    ldm = df[df["stage"] == "ldm"]
    if len(ldm):
        cols = [c for c in ("val_flow_loss", "sample_mmd", "sample_w2", "sample_fd") if c in ldm.columns]
        lines += ["", "## Stage-2 runs: held-out flow loss and generated vs held-out cells", "",
                  "| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for _, row in ldm.sort_values(["grid", "name"]).iterrows():
            lines.append(f"| {row['grid']}/{row['name']} | " + " | ".join(_fmt(float(row[c])) for c in cols) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Tables: `runs.csv` / `runs.parquet` (one row per run), `fits.csv`, `frontier.csv`."]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(dirs: Sequence[str | Path], out: str | Path | None = None, wandb_csv: Sequence[str | Path] = (),
           n_boot: int = 1000, level: float = 0.95, seed: int = 0,
           method: BootstrapMethod | str = BootstrapMethod.RESIDUALS) -> Path:
    """Collect sweeps and W&B exports, write the report; returns ``summary.md``."""
    frames, sweeps, missing = [], [], []
    if dirs:
        df, sweeps, missing = collect(dirs)
        frames.append(df)
    frames += [read_wandb_csv(p) for p in wandb_csv]
    if not frames:
        raise ScldmError("report: give sweep folders (DIR ...) or --wandb-csv FILE")
    if out is None:
        if len(dirs) != 1:
            raise ScldmError("report: with several inputs (or only a W&B export) give --out DIR")
        out = Path(dirs[0]) / "report"
    df = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(not f.empty for f in frames) \
        else pd.DataFrame()
    return write_report(df, out, sweeps, missing, n_boot=n_boot, level=level, seed=seed, method=method)
