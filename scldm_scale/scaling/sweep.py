"""`scldm-scale sweep`: grids -> resolved run configs -> trained runs with their results.

Layout of a sweep folder (``--out DIR`` for one grid; ``DIR/<grid name>`` for each of several)::

    sweep.json                  the grid, what stays fixed, and every run (name, stage, point, hash)
    <run>/run.yaml              the run's resolved recipe: `scldm-scale train <run>/run.yaml` trains it
    <run>/sweep_run.json        the run's identity (config hash): a changed grid never reuses a stale run
    <run>/sweep_attempts.jsonl  one line per training attempt (wall seconds, exit status, world size)
    <run>/config.yaml, metrics.jsonl, checkpoints/, export/    written by the trainer
    <run>/result.json           parameters, FLOPs, cells seen, wall time, held-out metrics: the run is done
    slurm/                      --launcher slurm: array scripts and submit.sh

A run with ``result.json`` (same hash) is skipped; one with an export but no result is only
measured; any other is trained with ``run.resume=true`` (continues from its last checkpoint, or
starts at step 0). With several grids, a run whose resolved config equals a run of another grid
(same hash) is trained once; ``sweep.json`` points at it (``same_as``).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from scldm_scale.api.run import has_export, load_export_config
from scldm_scale.config import Stage, global_batch, load_config
from scldm_scale.data.synthetic import write_synthetic_atlas
from scldm_scale.errors import ScldmError
from scldm_scale.io import write_json_atomic, write_text_atomic
from scldm_scale.scaling.grid import VOLATILE_KEYS, Grid, RunSpec, config_hash, expand, load_grid, resolve
from scldm_scale.scaling.validation import heldout_path, ldm_metrics, vae_metrics
from scldm_scale.scaling.loading import export_parameter_counts

SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
RUN_RECIPE = "run.yaml"
IDENTITY_FILE = "sweep_run.json"
ATTEMPTS_FILE = "sweep_attempts.jsonl"
TRAIN_LOG = "train.log"
# Config values recorded with every result (plus the grid's axes), the columns of the report's table.
KNOB_KEYS = ("vae.d_model", "vae.n_heads", "vae.n_latent_tokens", "vae.d_latent", "vae.n_encoder_layers",
             "vae.n_decoder_layers", "vae.mlp_ratio", "vae.n_genes", "dit.d_model", "dit.depth", "dit.n_heads",
             "dit.mlp_ratio", "data.batch_size", "data.max_genes", "train.grad_accum", "train.max_steps",
             "train.cells", "optim.lr", "run.seed")


class Launcher(str, Enum):
    LOCAL = "local"  # train the runs one after another here, then measure them
    SLURM = "slurm"  # write SLURM array scripts (stage 1, then stage 2) and submit.sh
    PRINT = "print"  # print the commands


@dataclass
class PlannedRun:
    spec: RunSpec
    cfg: DictConfig  # resolved (recipes <- overrides, size knobs applied)
    hash: str
    run_dir: Path
    same_as: Path | None = None  # a run of another grid with the same config: its result stands for this one

    @property
    def result_dir(self) -> Path:
        return self.same_as or self.run_dir


@dataclass
class PlannedSweep:
    grid: Grid
    dir: Path
    runs: list[PlannedRun]


# --------------------------------------------------------------------------------------------- planning


def _finished_results(root: Path) -> dict[str, Path]:
    """hash -> run directory of every finished run below ``root`` (two levels: sweeps of a multi-grid out)."""
    found: dict[str, Path] = {}
    for path in sorted(root.glob(f"*/*/{RESULT_FILE}")) + sorted(root.glob(f"*/{RESULT_FILE}")):
        try:
            found.setdefault(json.loads(path.read_text())["hash"], path.parent)
        except (OSError, ValueError, KeyError):
            continue
    return found


def plan(grid_paths: Sequence[str | Path], out_dir: str | Path, extra: Sequence[str] = (),
         world_size: int = 1) -> list[PlannedSweep]:
    """Expand and resolve every grid (bad keys or values fail here, before anything is trained)."""
    out = Path(out_dir)
    grids = [load_grid(p) for p in grid_paths]
    names = [g.name for g in grids]
    if len(set(names)) != len(names):
        raise ScldmError(f"sweep: two grids share a name ({names}); give each grid its own name:")
    for item in extra:
        key = item.partition("=")[0]
        for grid in grids:
            if key in grid.axes:
                raise ScldmError(f"sweep: override '{item}' sets an axis of grid '{grid.name}'; change the grid's "
                                 "axis values instead")
    multi = len(grids) > 1
    known = _finished_results(out) if multi and out.is_dir() else {}
    sweeps = []
    for grid in grids:
        sweep_dir = out / grid.name if multi else out
        planned: dict[str, PlannedRun] = {}
        for spec in expand(grid, sweep_dir, extra):
            vae_hash = ""
            if spec.stage == Stage.LDM:
                vae = planned[spec.vae_run]
                vae_hash = vae.hash
                spec = replace(spec, overrides=tuple(f"ldm.vae_run={vae.result_dir}" if o.startswith("ldm.vae_run=")
                                                     else o for o in spec.overrides))
            cfg = resolve(spec, world_size)
            digest = config_hash(cfg, vae_hash)
            run_dir = sweep_dir / spec.name
            same_as = known.get(digest) if multi else None
            if same_as is not None and same_as.resolve() == run_dir.resolve():
                same_as = None
            if same_as is None and multi:
                known.setdefault(digest, run_dir)
            planned[spec.name] = PlannedRun(spec, cfg, digest, run_dir, same_as)
        sweeps.append(PlannedSweep(grid, sweep_dir, list(planned.values())))
    return sweeps


def _flat_container(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    walk(container, "")
    return {k: v for k, v in out.items() if not any(k == v_ or k.startswith(v_ + ".") for v_ in VOLATILE_KEYS)}


def _check_identity(run: PlannedRun) -> None:
    path = run.run_dir / IDENTITY_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("hash") == run.hash:
        return
    changed = []
    old_recipe = run.run_dir / RUN_RECIPE
    if old_recipe.is_file():
        before, after = _flat_container(load_config([old_recipe])), _flat_container(run.cfg)
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k) and not k.startswith("ldm.vae_run")]
    what = f" (changed: {'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})" if changed else ""
    raise ScldmError(f"sweep: {run.run_dir} holds a run with other settings{what}; give another --out or remove "
                     f"{run.run_dir}")


def write_plan(sweep: PlannedSweep, world_size: int) -> None:
    """``sweep.json`` and, for every run trained here, its ``run.yaml`` and identity."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    for run in sweep.runs:
        if run.same_as is not None:
            continue
        _check_identity(run)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        recipe = run.run_dir / RUN_RECIPE
        text = OmegaConf.to_yaml(run.cfg, resolve=True)
        if not recipe.is_file() or recipe.read_text() != text:
            write_text_atomic(recipe, text)
        write_json_atomic(run.run_dir / IDENTITY_FILE, _identity(sweep, run))
    grid = sweep.grid
    write_json_atomic(sweep.dir / SWEEP_FILE, {
        "grid": grid.name, "description": grid.description, "grid_file": str(grid.path),
        "axes": grid.axes, "fixed": grid.vae.fixed, "ldm_fixed": grid.ldm.fixed if grid.ldm else {},
        "seeds": list(grid.seeds), "eval": asdict(grid.eval), "world_size": world_size,
        "runs": [{**_identity(sweep, run), "dir": os.path.relpath(run.result_dir, sweep.dir),
                  "same_as": run.same_as is not None} for run in sweep.runs],
    })


def _identity(sweep: PlannedSweep, run: PlannedRun) -> dict[str, Any]:
    return {"name": run.spec.name, "grid": sweep.grid.name, "stage": run.spec.stage.value, "point": run.spec.point,
            "seed": run.spec.seed, "hash": run.hash, "vae_run": run.spec.vae_run}


# --------------------------------------------------------------------------------------------- commands


def _cli(nproc: int, python: str) -> list[str]:
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "scldm_scale.cli"]
    return [python, "-m", "scldm_scale.cli"]


def train_command(run: PlannedRun, nproc: int, python: str = sys.executable, quiet: bool = False) -> list[str]:
    cmd = [*_cli(nproc, python), "train", str(run.run_dir / RUN_RECIPE), "run.resume=true"]
    return cmd + ["logging.progress=false"] if quiet else cmd


def encode_command(vae_dir: Path, nproc: int, python: str = sys.executable) -> list[str]:
    return [*_cli(nproc, python), "encode", "--vae-run", str(vae_dir), "--quiet"]


def latents_ready(vae_dir: Path) -> bool:
    return (Path(vae_dir) / "latents" / "manifest.json").is_file()


def _synthetic_targets(sweep: PlannedSweep) -> list[str]:
    """Data paths of the stage-1 runs that do not exist yet and that the grid's ``synthetic`` writes."""
    if not sweep.grid.synthetic:
        return []
    paths = {str(r.cfg.data.path) for r in sweep.runs if r.spec.stage == Stage.VAE}
    return sorted(p for p in paths if p and not Path(p).exists())


def prepare_command(sweep: PlannedSweep, path: str, python: str = sys.executable) -> list[str]:
    spec = sweep.grid.synthetic or {}
    flags = {"cells": "--cells", "genes": "--genes", "shards": "--shards", "cell_types": "--cell-types",
             "heldout_fraction": "--heldout-fraction", "seed": "--seed"}
    args = [python, "-m", "scldm_scale.cli", "prepare", "synthetic", path, "--quiet"]
    for key, flag in flags.items():
        if key in spec:
            args += [flag, str(spec[key])]
    return args


# --------------------------------------------------------------------------------------------- local runs


class _Forwarder:
    """SIGTERM while a child runs: pass it on (the trainer checkpoints and exits), stop after that run."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, cmd: list[str], log_path: Path) -> tuple[int, float, float]:
        """(exit status, wall seconds, CPU seconds of the child and its children)."""
        start = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            self.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = self.child.wait()
            except KeyboardInterrupt:
                self.child.send_signal(signal.SIGINT)
                self.child.wait()
                raise
            finally:
                self.child = None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        return rc, time.perf_counter() - start, cpu

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _attempts(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_attempt(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / ATTEMPTS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _metrics_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return value.value if isinstance(value, Enum) else value


def build_result(sweep: PlannedSweep, run: PlannedRun, metrics: dict, world_size: int) -> dict[str, Any]:
    """The record of a finished run: where it sits on the grid, its size, compute, time and metrics."""
    run_dir = run.run_dir
    trained_cfg = load_config([run_dir / "config.yaml"])
    records = [r for r in _metrics_records(run_dir) if "tflops_per_cell" in r]
    steps = int(records[-1]["step"]) if records else int(trained_cfg.train.max_steps)
    attempts = _attempts(run_dir)
    world = int(attempts[-1].get("world_size", world_size)) if attempts else world_size
    flops_per_cell = (sum(float(r["tflops_per_cell"]) for r in records) / len(records) * 1e12) if records else float("nan")
    cells_seen = steps * global_batch(trained_cfg, world)
    knobs = [k for k in (*KNOB_KEYS, *sweep.grid.axes) if not (run.spec.stage == Stage.VAE and k.startswith("dit."))]
    return {
        "name": run.spec.name, "grid": sweep.grid.name, "stage": run.spec.stage.value, "seed": run.spec.seed,
        "hash": run.hash, "axes": sweep.grid.axes, "point": run.spec.point,
        "config": {k: _select(trained_cfg, k) for k in dict.fromkeys(knobs)},
        **export_parameter_counts(run_dir),
        "steps": steps, "world_size": world, "global_batch": global_batch(trained_cfg, world),
        "cells_seen": cells_seen, "flops_per_cell": flops_per_cell, "flops": flops_per_cell * cells_seen,
        "wall_s": sum(float(a.get("seconds", 0.0)) for a in attempts if a.get("what") == "train"),
        "cpu_s": sum(float(a.get("cpu_seconds", 0.0)) for a in attempts if a.get("what") == "train"),
        "encode_s": sum(float(a.get("seconds", 0.0)) for a in attempts if a.get("what") == "encode"),
        **metrics,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _measure(sweep: PlannedSweep, run: PlannedRun, world_size: int) -> dict[str, Any]:
    spec = sweep.grid.eval
    start, cpu_start = time.perf_counter(), time.process_time()
    if run.spec.stage == Stage.VAE:
        heldout = heldout_path(spec.heldout, str(run.cfg.data.path))
        metrics = vae_metrics(run.run_dir, heldout, spec, seed=0)
    else:
        heldout = heldout_path(spec.heldout, load_export_config(str(run.cfg.ldm.vae_run)).data.path)
        metrics = ldm_metrics(run.run_dir, heldout, spec, seed=0)
    result = build_result(sweep, run, metrics, world_size)
    result["eval_s"] = time.perf_counter() - start
    result["eval_cpu_s"] = time.process_time() - cpu_start
    result["heldout"] = str(heldout)
    return result


def _say(text: str) -> None:
    print(text, flush=True)


def run_one(sweep: PlannedSweep, run: PlannedRun, nproc: int, forwarder: _Forwarder) -> str:
    """Train (or resume) one run, encode its latents when stage 2 needs them, measure it.

    Returns its status: done (already finished), same_as, finished, interrupted, failed, blocked.
    """
    if run.same_as is not None:
        return "same_as"
    result_path = run.run_dir / RESULT_FILE
    if result_path.is_file() and json.loads(result_path.read_text()).get("hash") == run.hash:
        return "done"
    log_path = run.run_dir / TRAIN_LOG
    if run.spec.stage == Stage.LDM:
        vae_dir = Path(str(run.cfg.ldm.vae_run))
        if not has_export(vae_dir):
            return "blocked"
        if not latents_ready(vae_dir):
            rc, seconds, cpu = forwarder.run(encode_command(vae_dir, nproc), log_path)
            _append_attempt(vae_dir, {"what": "encode", "seconds": seconds, "cpu_seconds": cpu, "returncode": rc,
                                      "world_size": nproc})
            if rc != 0 or not latents_ready(vae_dir):
                return "failed"
    if not has_export(run.run_dir):
        if forwarder.stopping:
            return "interrupted"
        rc, seconds, cpu = forwarder.run(train_command(run, nproc, quiet=True), log_path)
        _append_attempt(run.run_dir, {"what": "train", "seconds": seconds, "cpu_seconds": cpu, "returncode": rc,
                                      "world_size": nproc, "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if rc != 0 and not has_export(run.run_dir):
            return "interrupted" if forwarder.stopping else "failed"
        if not has_export(run.run_dir):
            return "interrupted"
    if run.spec.stage == Stage.VAE and sweep.grid.ldm is not None and not latents_ready(run.run_dir):
        rc, seconds, cpu = forwarder.run(encode_command(run.run_dir, nproc), log_path)
        _append_attempt(run.run_dir, {"what": "encode", "seconds": seconds, "cpu_seconds": cpu, "returncode": rc,
                                      "world_size": nproc})
        if rc != 0:
            return "failed"
    write_json_atomic(result_path, _measure(sweep, run, nproc))
    return "finished"


def run_local(sweeps: list[PlannedSweep], nproc: int, only: str = "") -> int:
    """Run every run of every sweep (or only ``only``: ``NAME`` or ``GRID/NAME``); 0 when all are done."""
    selected = [(s, r) for s in sweeps for r in s.runs if not only or only in (r.spec.name, f"{s.grid.name}/{r.spec.name}")]
    if only and not selected:
        names = [f"{s.grid.name}/{r.spec.name}" for s in sweeps for r in s.runs]
        raise ScldmError(f"sweep --run {only}: no such run; runs: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    if only and len(selected) > 1:
        raise ScldmError(f"sweep --run {only}: several grids have this run; write it as GRID/NAME")
    for sweep in sweeps:
        for path in _synthetic_targets(sweep):  # an earlier sweep may have written it
            if Path(path).exists():
                continue
            spec = sweep.grid.synthetic or {}
            _say(f"[{sweep.grid.name}] writing the synthetic atlas {path}")
            write_synthetic_atlas(path, n_cells=int(spec.get("cells", 10_000)), n_genes=int(spec.get("genes", 2_000)),
                                  n_shards=int(spec.get("shards", 4)), n_cell_types=int(spec.get("cell_types", 8)),
                                  heldout_fraction=float(spec.get("heldout_fraction", 0.05)),
                                  seed=int(spec.get("seed", 0)), progress=False)
    forwarder = _Forwarder()
    statuses: dict[str, int] = {}
    sweep_start = time.perf_counter()
    try:
        total = len(selected)
        for i, (sweep, run) in enumerate(selected, 1):
            label = f"[{i}/{total}] {sweep.grid.name}/{run.spec.name}"
            start = time.perf_counter()
            try:
                status = run_one(sweep, run, nproc, forwarder)
            except ScldmError as err:
                status = "failed"
                _say(f"{label}: error: {err}")
            statuses[status] = statuses.get(status, 0) + 1
            detail = ""
            if status == "finished":
                result = json.loads((run.run_dir / RESULT_FILE).read_text())
                key = "val_nll_per_cell" if run.spec.stage == Stage.VAE else "val_flow_loss"
                detail = f" ({time.perf_counter() - start:.0f} s, {key} {result[key]:.4g})"
            elif status in ("failed", "interrupted"):
                detail = f" (log: {run.run_dir / TRAIN_LOG})"
            elif status == "same_as":
                detail = f" ({run.same_as})"
            elif status == "blocked":
                detail = f" (its VAE run {run.spec.vae_run} has no export)"
            _say(f"{label}: {status}{detail}")
            if forwarder.stopping:
                break
    finally:
        forwarder.close()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    _say(f"sweep: {summary} ({(time.perf_counter() - sweep_start) / 60:.1f} min)")
    unfinished = sum(n for s, n in statuses.items() if s not in ("done", "finished", "same_as"))
    return 1 if unfinished else 0


# --------------------------------------------------------------------------------------------- slurm / print


def _sweep_args(grid_paths: Sequence[str | Path], out: Path, nproc: int, extra: Sequence[str]) -> list[str]:
    return [*map(str, grid_paths), "--out", str(out), "--nproc-per-node", str(nproc), *extra]


def print_commands(sweeps: list[PlannedSweep], grid_paths: Sequence[str | Path], out: Path, nproc: int,
                   extra: Sequence[str]) -> str:
    """The shell commands that train every unfinished run, then record the metrics and the report."""
    lines = [f"# run from {Path.cwd()}"]
    prepared: set[str] = set()
    encoded: set[Path] = set()
    for sweep in sweeps:
        lines.append(f"# grid {sweep.grid.name}: {len(sweep.runs)} runs in {sweep.dir}")
        for path in _synthetic_targets(sweep):
            if path not in prepared:
                prepared.add(path)
                lines.append(shlex.join(prepare_command(sweep, path, "python")))
        for run in sweep.runs:
            if run.same_as is not None or (run.run_dir / RESULT_FILE).is_file():
                continue
            if run.spec.stage == Stage.LDM:
                vae_dir = Path(str(run.cfg.ldm.vae_run))
                if not latents_ready(vae_dir) and vae_dir not in encoded:
                    encoded.add(vae_dir)
                    lines.append(shlex.join(encode_command(vae_dir, nproc, "python")))
            if not has_export(run.run_dir):
                lines.append(shlex.join(train_command(run, nproc, "python")))
    lines.append("# then record the held-out metrics of the trained runs, and the report:")
    lines.append(shlex.join(["scldm-scale", "sweep", *_sweep_args(grid_paths, out, nproc, extra)]))
    lines.append(shlex.join(["scldm-scale", "report", str(out)]))
    return "\n".join(lines)


SBATCH_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --time={time}
#SBATCH --output={logs}/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
{extra_lines}#
# One array task per run: `scldm-scale sweep ... --run NAME` trains (or resumes) the run, encodes its
# latents when stage 2 needs them and records its result. SIGTERM (time limit, preemption) reaches
# the trainer, which checkpoints; the task is then requeued and resumes.
set -euo pipefail
cd {cwd}
RUNS=({runs})
NAME=${{RUNS[$SLURM_ARRAY_TASK_ID]}}
{python} -m scldm_scale.cli sweep {sweep_args} --run "$NAME" &
pid=$!
term=0
trap 'term=1; kill -TERM "$pid" 2>/dev/null || true' TERM
status=0
while true; do
  status=0
  wait "$pid" || status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if ((term)) && command -v scontrol >/dev/null 2>&1; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" || true
  exit 0
fi
exit "$status"
"""


def write_slurm(sweeps: list[PlannedSweep], grid_paths: Sequence[str | Path], out: Path, nproc: int,
                extra: Sequence[str], time_limit: str, sbatch_options: Sequence[str], python: str) -> Path:
    """``<out>/slurm/stage1.sbatch`` (+ ``stage2.sbatch``) and ``submit.sh``, which submits them in order."""
    folder = out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_args = shlex.join(_sweep_args(grid_paths, out, nproc, extra))
    extra_lines = "".join(f"#SBATCH {opt}\n" for opt in sbatch_options)
    scripts = []
    for stage, suffix in ((Stage.VAE, "stage1"), (Stage.LDM, "stage2")):
        runs = [f"{s.grid.name}/{r.spec.name}" for s in sweeps for r in s.runs
                if r.spec.stage == stage and r.same_as is None]
        if not runs:
            continue
        text = SBATCH_TEMPLATE.format(job=f"{out.name}-{suffix}", last=len(runs) - 1, gpus=nproc, time=time_limit,
                                      logs=folder.resolve(), extra_lines=extra_lines, cwd=shlex.quote(str(Path.cwd())),
                                      runs=" ".join(shlex.quote(r) for r in runs), python=shlex.quote(python),
                                      sweep_args=sweep_args)
        path = folder / f"{suffix}.sbatch"
        path.write_text(text)
        scripts.append(path)
    if not scripts:
        raise ScldmError(f"sweep --launcher slurm: nothing to submit, every run is a finished run of another grid; "
                         f"run `scldm-scale report {out}`")
    submit = ["#!/bin/bash", "# Submit the sweep: stage-1 array, then stage 2 once it has ended; report when all are done.",
              "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    prepared: set[str] = set()
    for sweep in sweeps:
        for data_path in _synthetic_targets(sweep):
            if data_path not in prepared:
                prepared.add(data_path)
                submit.append(shlex.join(prepare_command(sweep, data_path, python)))
    submit.append(f"jid=$(sbatch --parsable {shlex.quote(str(scripts[0]))})")
    submit.append('echo "stage 1: job $jid"')
    if len(scripts) > 1:
        submit.append(f"jid2=$(sbatch --parsable --dependency=afterany:$jid {shlex.quote(str(scripts[1]))})")
        submit.append('echo "stage 2: job $jid2"')
    submit.append(f'echo "when they are done: scldm-scale report {out}"')
    path = folder / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------------- entry


def sweep(grid_paths: Sequence[str | Path], out: str | Path, launcher: Launcher | str = Launcher.LOCAL,
          nproc: int = 1, extra: Sequence[str] = (), only: str = "", time_limit: str = "24:00:00",
          sbatch_options: Sequence[str] = (), python: str = sys.executable) -> int:
    """Expand ``grid_paths`` into ``out`` and run, script or print them (see the module docstring)."""
    launcher = Launcher(launcher)
    if nproc < 1:
        raise ScldmError(f"--nproc-per-node {nproc}: must be >= 1")
    out = Path(out)
    sweeps = plan(grid_paths, out, extra, nproc)
    for s in sweeps:
        write_plan(s, nproc)
    if launcher == Launcher.PRINT:
        print(print_commands(sweeps, grid_paths, out, nproc, extra))
        return 0
    if launcher == Launcher.SLURM:
        path = write_slurm(sweeps, grid_paths, out, nproc, extra, time_limit, sbatch_options, python)
        n = sum(len(s.runs) for s in sweeps)
        _say(f"wrote {path.parent}/: {n} runs; submit with: bash {path}")
        return 0
    return run_local(sweeps, nproc, only)
