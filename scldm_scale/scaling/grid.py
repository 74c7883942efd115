"""Scaling grids: base recipes, what stays fixed, one or two axes -> one resolved config per run.

A grid is a YAML file::

    name: width                       # the sweep's name: W&B group, report title, run folder
    description: VAE width at a fixed cell budget and latent shape
    recipes: [base.yaml]              # stage-1 recipes, relative to this file, merged left to right
    fixed:                            # overrides of every run: what stays fixed along the axes
      train.cells: 16384
      vae.n_latent_tokens: 8
    axes:                             # one or two axes (config keys -> values); runs = the product
      vae.d_model: [16, 32, 64, 128]
    seeds: [0]                        # replicates (run.seed and data.seed); default [0]
    synthetic: {cells: 72000, genes: 1000}   # optional: write a synthetic atlas at data.path if missing
    eval: {heldout_cells: 2000}       # optional: held-out metrics settings (EvalSpec)
    ldm:                              # optional: a stage-2 run on the latents of each stage-1 run
      recipes: [base_ldm.yaml]
      fixed: {train.cells: 65536}
      axes: {dit.d_model: [64, 128]}  # stage-2 axes multiply the stage-1 points

Stage-1 runs are named from their axis values (``vae-d_model64-s0``); a stage-2 run adds its own
(``ldm-d_model64-dit_d_model128-s0`` when two axes share a leaf name, the full key is used).
Every run gets ``run.name``, ``run.output_dir`` (the sweep folder), ``run.seed``, ``data.seed``
and ``logging.wandb_group`` (the grid name); a stage-2 run also ``ldm.vae_run``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from scldm_scale.config import Stage, derive_sizes, load_config, resolve_recipe
from scldm_scale.errors import ScldmError

GRID_KEYS = ("name", "description", "recipes", "fixed", "axes", "seeds", "synthetic", "eval", "ldm")
LDM_KEYS = ("recipes", "fixed", "axes")
SYNTHETIC_KEYS = ("cells", "genes", "shards", "cell_types", "heldout_fraction", "seed")
# Keys that do not change what a run computes: left out of its identity (config hash).
VOLATILE_KEYS = ("run.name", "run.output_dir", "run.resume", "run.overwrite", "train.stop_at_step", "train.log_every",
                 "train.ckpt_every", "train.keep_last", "data.num_workers", "logging", "plan")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out metrics recorded for every run of a grid."""

    heldout: str = ""  # held-out cells (.h5ad, raw counts); default <data.path>/heldout.h5ad
    heldout_cells: int = 1000  # at most this many held-out cells (seeded subsample), the same for every run
    flow_draws: int = 4  # LDM: (t, noise) draws per held-out cell for the flow loss
    sample_cells: int = 1000  # LDM: generated cells compared with the held-out cells (MMD, W2)
    sample_steps: int = 0  # LDM: sampler steps (0 = the run's flow.num_steps)
    batch_size: int = 256


@dataclass(frozen=True)
class StageSpec:
    recipes: tuple[str, ...]
    fixed: dict[str, Any]
    axes: dict[str, tuple[Any, ...]]


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    path: Path
    vae: StageSpec
    ldm: StageSpec | None
    seeds: tuple[int, ...]
    synthetic: dict[str, Any] | None
    eval: EvalSpec

    @property
    def axes(self) -> list[str]:
        """Every axis key, stage-1 ones first."""
        return list(self.vae.axes) + (list(self.ldm.axes) if self.ldm else [])


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its recipes and overrides, and where it sits on the grid."""

    name: str
    grid: str
    stage: Stage
    recipes: tuple[str, ...]
    overrides: tuple[str, ...]
    point: dict[str, Any]  # axis key -> value
    seed: int
    vae_run: str = ""  # stage 2: name of its stage-1 run


# --------------------------------------------------------------------------------------------- parsing


def _check_keys(mapping: dict, allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
            raise ScldmError(f"{where}: unknown key '{key}'; {hint}")


def _flat(mapping: Any, where: str) -> dict[str, Any]:
    """``{a: {b: 1}}`` or ``{a.b: 1}`` -> ``{"a.b": 1}``."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ScldmError(f"{where}: expected a mapping of config keys to values, got {type(mapping).__name__}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in _flat(value, where).items()})
        else:
            out[str(key)] = value
    return out


def _stage(raw: dict, base: Path, where: str, need_axes: bool) -> StageSpec:
    recipes = raw.get("recipes") or []
    if isinstance(recipes, str):
        recipes = [recipes]
    paths = []
    for recipe in recipes:
        path = Path(recipe) if Path(recipe).is_absolute() else base / recipe
        if not path.is_file():
            raise ScldmError(f"{where}.recipes: {recipe} not found (paths are relative to the grid file {base})")
        paths.append(str(path))
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ScldmError(f"{where}.axes: expected a mapping 'config.key: [values]'")
    axes: dict[str, tuple[Any, ...]] = {}
    for key, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise ScldmError(f"{where}.axes.{key}: expected a non-empty list of values, e.g. [16, 32, 64]")
        if len(set(map(json.dumps, values))) != len(values):
            raise ScldmError(f"{where}.axes.{key}: repeated values {values}; list each value once")
        axes[str(key)] = tuple(values)
    if need_axes and not axes:
        raise ScldmError(f"{where}: no axes; give at least one, e.g. axes: {{vae.d_model: [16, 32, 64]}}")
    fixed = _flat(raw.get("fixed"), f"{where}.fixed")
    both = set(fixed) & set(axes)
    if both:
        raise ScldmError(f"{where}: {sorted(both)} is both fixed and an axis; keep it in one of the two")
    return StageSpec(tuple(paths), fixed, axes)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML (see the module docstring); ``scaling/NAME`` is a shipped grid."""
    path = Path(path)
    if not path.is_file():
        if not str(path).removeprefix("recipes/").startswith("scaling/"):
            raise ScldmError(f"{path}: grid not found; pass a grid YAML such as recipes/scaling/width.yaml")
        path = resolve_recipe(path)  # a shipped grid by name, e.g. scaling/width
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml syntax
        raise ScldmError(f"{path}: not a valid YAML grid ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ScldmError(f"{path}: a grid is a mapping with name, recipes, fixed and axes")
    where = str(path)
    _check_keys(raw, GRID_KEYS, where)
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ScldmError(f"{where}: name '{name}' may only hold letters, digits, '_', '.' and '-'")
    vae = _stage(raw, path.parent, where, need_axes=not raw.get("ldm"))
    ldm = None
    if raw.get("ldm"):
        ldm_raw = raw["ldm"]
        if not isinstance(ldm_raw, dict):
            raise ScldmError(f"{where}.ldm: expected a mapping with recipes, fixed and axes")
        _check_keys(ldm_raw, LDM_KEYS, f"{where}.ldm")
        ldm = _stage(ldm_raw, path.parent, f"{where}.ldm", need_axes=False)
        if not vae.axes and not ldm.axes:
            raise ScldmError(f"{where}: no axes in the grid or its ldm section; give at least one")
    n_axes = len(vae.axes) + (len(ldm.axes) if ldm else 0)
    if n_axes > 2:
        raise ScldmError(f"{where}: {n_axes} axes; a grid has one or two (split it into several grids)")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ScldmError(f"{where}.seeds: expected a non-empty list of integers, e.g. [0, 1, 2]")
    synthetic = raw.get("synthetic")
    if synthetic is not None:
        if not isinstance(synthetic, dict):
            raise ScldmError(f"{where}.synthetic: expected a mapping (cells, genes, shards, heldout_fraction, seed)")
        _check_keys(synthetic, SYNTHETIC_KEYS, f"{where}.synthetic")
    eval_raw = raw.get("eval") or {}
    _check_keys(eval_raw, list(EvalSpec.__dataclass_fields__), f"{where}.eval")
    return Grid(name=name, description=str(raw.get("description") or ""), path=path, vae=vae, ldm=ldm,
                seeds=tuple(int(s) for s in seeds), synthetic=synthetic, eval=EvalSpec(**eval_raw))


# --------------------------------------------------------------------------------------------- expansion


def format_value(value: Any) -> str:
    """An override value as the CLI takes it (``key=VALUE``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _name_part(value: Any) -> str:
    text = format_value(value)
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", text)


def axis_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short label per axis key: its last component, or the full key (dots -> '_') when two collide."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k.replace(".", "_")) for k, leaf in zip(keys, leaves)}


def expand(grid: Grid, out_dir: str | Path, extra: Sequence[str] = ()) -> list[RunSpec]:
    """The grid's runs, stage-1 runs first. ``extra``: ``key=value`` overrides applied to every run last."""
    out_dir = str(out_dir)
    labels = axis_labels(grid.axes)
    vae_keys = list(grid.vae.axes)
    ldm_keys = list(grid.ldm.axes) if grid.ldm else []
    runs: list[RunSpec] = []

    def common(name: str, seed: int) -> list[str]:
        return [f"run.name={name}", f"run.output_dir={out_dir}", f"run.seed={seed}", f"data.seed={seed}",
                f"logging.wandb_group={grid.name}"]

    vae_points = list(itertools.product(*(grid.vae.axes[k] for k in vae_keys)))
    for values in vae_points:
        point = dict(zip(vae_keys, values))
        for seed in grid.seeds:
            name = "-".join(["vae", *(f"{labels[k]}{_name_part(v)}" for k, v in point.items()), f"s{seed}"])
            overrides = [f"run.stage={Stage.VAE.value}", *(f"{k}={format_value(v)}" for k, v in grid.vae.fixed.items()),
                         *(f"{k}={format_value(v)}" for k, v in point.items()), *common(name, seed), *extra]
            runs.append(RunSpec(name, grid.name, Stage.VAE, grid.vae.recipes, tuple(overrides), point, seed))
    if grid.ldm is None:
        return runs
    vae_by_point = {(json.dumps(r.point, sort_keys=True), r.seed): r for r in runs}
    for values in vae_points:
        vae_point = dict(zip(vae_keys, values))
        for ldm_values in itertools.product(*(grid.ldm.axes[k] for k in ldm_keys)):
            ldm_point = dict(zip(ldm_keys, ldm_values))
            for seed in grid.seeds:
                vae_run = vae_by_point[(json.dumps(vae_point, sort_keys=True), seed)]
                point = {**vae_point, **ldm_point}
                name = "-".join(["ldm", *(f"{labels[k]}{_name_part(v)}" for k, v in point.items()), f"s{seed}"])
                overrides = [f"run.stage={Stage.LDM.value}",
                             *(f"{k}={format_value(v)}" for k, v in grid.ldm.fixed.items()),
                             *(f"{k}={format_value(v)}" for k, v in ldm_point.items()), *common(name, seed),
                             f"ldm.vae_run={Path(out_dir) / vae_run.name}", *extra]
                runs.append(RunSpec(name, grid.name, Stage.LDM, grid.vae.recipes + grid.ldm.recipes,
                                    tuple(overrides), point, seed, vae_run=vae_run.name))
    return runs


def resolve(run: RunSpec, world_size: int = 1) -> DictConfig:
    """The run's config: recipes <- overrides, with the size knobs applied for ``world_size`` ranks."""
    cfg = load_config(run.recipes, run.overrides)
    if Stage(cfg.run.stage) != run.stage:
        raise ScldmError(f"run {run.name}: the recipes set run.stage={cfg.run.stage} but the grid makes it a "
                         f"{run.stage.value} run; do not override run.stage in the grid")
    return derive_sizes(cfg, world_size)


def _drop(container: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in container:
        return
    if not rest:
        del container[head]
    elif isinstance(container[head], dict):
        _drop(container[head], rest)


def config_hash(cfg: DictConfig, vae_hash: str = "") -> str:
    """Identity of what a run computes: its resolved config without names, paths of the sweep and
    logging (:data:`VOLATILE_KEYS`); a stage-2 run's VAE enters through ``vae_hash``."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in VOLATILE_KEYS:
        _drop(container, key)
    if vae_hash:
        container.setdefault("ldm", {})["vae_run"] = vae_hash
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
