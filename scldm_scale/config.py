"""Run configuration: one structured schema, recipes merged left to right, `key=value` overrides.

A run is described by one or more recipe YAMLs (merged in order) plus dotted overrides on the
command line. The schema is a tree of dataclasses held by OmegaConf in struct mode, so a
misspelled key is an error that names the key and the closest valid one. Values that come from
the data (vocabulary size, label cardinalities) or from another stage (latent shape) are left at
their empty defaults in recipes and filled in one place, :func:`derive`.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from scldm_scale.data.config import DataConfig
from scldm_scale.errors import ScldmError
from scldm_scale.io import write_text_atomic
from scldm_scale.flow.guidance import GuidanceMode, check_interval
from scldm_scale.flow.interpolant import TimeSampling
from scldm_scale.flow.samplers import SamplerKind
from scldm_scale.nn.dit import DIT_PRESETS, DiTConfig
from scldm_scale.nn.vae import VAE_PRESETS, VAEConfig


class Stage(str, Enum):
    VAE = "vae"
    LDM = "ldm"


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Schedule(str, Enum):
    COSINE = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    WSD = "wsd"  # linear warmup, constant, linear decay over the last decay_fraction of steps


class DecodeGenes(str, Enum):
    ALL = "all"  # reconstruct every vocabulary gene (exact, O(g) per cell)
    SAMPLED = "sampled"  # expressed genes + a seeded sample of zeros, loss reweighted


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    stage: Stage = Stage.VAE
    seed: int = 0
    resume: bool = False  # continue from <run dir>/checkpoints/latest
    overwrite: bool = False  # start afresh in a run directory that holds a run (its checkpoints, export, metrics go)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak LR for the global batch below; scale it explicitly when you change the batch
    reference_global_batch: int = 0  # if > 0: lr is scaled by global_batch / reference_global_batch (linear rule)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD only
    # LR multipliers for parameters whose name contains the key, e.g. {log_theta_g: 10.0}
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # length of the run (and of the LR schedule)
    # cell budget: > 0 sets max_steps = ceil(cells / global batch), global batch = data.batch_size x
    # grad_accum x world size (see derive_sizes); 0 = max_steps as given
    cells: int = 0
    stop_at_step: int = 0  # if > 0: checkpoint and stop after this step (a planned interruption)
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: Precision = Precision.FP32
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 2
    ema_decay: float = 0.999  # 0 disables EMA
    # LDM stage: every sample_every steps rank 0 generates sample_cells cells with the EMA weights and
    # logs sample/mmd and sample/w2 to held-out cells (ldm.sample_reference); 0 = off
    sample_every: int = 0
    sample_cells: int = 256
    # VAE stage
    kl_weight: float = 0.0
    # genes the decoder reconstructs per cell in training: the expressed ones plus n_zero_genes sampled
    # unexpressed ones, reweighted (cost independent of the vocabulary size), or all genes
    decode_genes: DecodeGenes = DecodeGenes.SAMPLED
    n_zero_genes: int = 256  # unexpressed genes sampled per cell when decode_genes=sampled
    library_loss_weight: float = 0.1
    # raw DeepSpeed keys merged last into the generated DeepSpeed JSON
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlowConfig:
    time_sampling: TimeSampling = TimeSampling.UNIFORM
    label_dropout: list[float] = field(default_factory=list)  # per label attribute; empty = 0.1 for all
    sampler: SamplerKind = SamplerKind.HEUN
    num_steps: int = 50
    sde_diffusion: float = 1.0  # w(t) = sde_diffusion * (1 - t), sampler=sde only
    guidance_mode: GuidanceMode = GuidanceMode.PER_ATTRIBUTE
    guidance: list[float] = field(default_factory=list)  # per label attribute; empty = 1.0 (plain conditional)
    # flow times (t=0 noise, t=1 data) where guidance applies; the plain conditional elsewhere
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])


@dataclass
class LDMConfig:
    vae_run: str = ""  # run directory of the trained VAE (its export/ is loaded)
    latents: str = ""  # latent cache written by `scldm-scale encode` (default <vae_run>/latents)
    # held-out cells (.h5ad, raw counts) for train.sample_every (default <VAE data.path>/heldout.h5ad)
    sample_reference: str = ""


@dataclass
class ModelConfig:
    """Execution options of both stages' models (their sizes live in ``vae`` / ``dit``)."""

    # torch.compile every transformer block (MCABs, latent self-attention, DiT blocks); where it
    # cannot compile, a block runs eagerly after a one-line warning
    compile: bool = False


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "scldm-scale"
    wandb_mode: str = "offline"  # offline | online
    wandb_group: str = ""  # default: the recipe name
    progress: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = detect known GPUs, else no MFU


@dataclass
class ScaleConfig:
    """Size knobs (applied by :func:`derive_sizes`): a width sets the heads at a fixed head width.

    ``vae.n_heads: 0`` means ``vae.d_model / vae_head_dim``, ``dit.n_heads: 0`` means
    ``dit.d_model / dit_head_dim``; the MLP widths follow the model width through ``mlp_ratio``.
    """

    vae_head_dim: int = 16
    dit_head_dim: int = 32


@dataclass
class PlanConfig:
    """Expected data and hardware for the run plan of ``scldm-scale train --dry-run`` (reads no data).

    Training ignores this section; the vocabulary size and label tables then come from the data.
    """

    n_genes: int = 0  # vocabulary size (0: read data.vocab_path / <data.path>/vocab.json if it exists)
    dataset_cells: int = 0  # training cells the data selects (for epochs and the latent cache size)
    genes_per_cell: float = 0.0  # mean expressed (nonzero) in-vocabulary genes per cell, before data.max_genes
    label_cardinalities: list[int] = field(default_factory=list)  # categories per data.label_columns entry
    nodes: int = 1
    gpus_per_node: int = 1
    mfu: float = 0.3  # model FLOPs utilization assumed for the time estimate (peak: logging.peak_tflops)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae_preset: str = ""  # a name from VAE_PRESETS; explicit vae.* keys override it
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit_preset: str = ""  # a name from DIT_PRESETS; explicit dit.* keys override it
    dit: DiTConfig = field(default_factory=DiTConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# ---------------------------------------------------------------------------------------------
# loading, merging, overrides
# ---------------------------------------------------------------------------------------------


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema (for 'did you mean' suggestions)."""
    keys: list[str] = []
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_valid_keys(default, key + "."))
    return keys


def _explain(err: OmegaConfBaseException, where: str) -> ScldmError:
    full_key = getattr(err, "full_key", "") or getattr(err, "key", "") or "?"
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(Config)
        close = difflib.get_close_matches(str(full_key), valid, n=1, cutoff=0.5)
        if not close:  # compare the last component within the same section
            section, _, leaf = str(full_key).rpartition(".")
            siblings = [k for k in valid if k.rpartition(".")[0] == section]
            close = [s for s in difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1)]
            close = [f"{section}.{c}" if section else c for c in close]
        hint = f"did you mean '{close[0]}'?" if close else "see recipes/quickstart.yaml for the valid keys"
        return ScldmError(f"{where}: unknown config key '{full_key}'; {hint}")
    if isinstance(err, ValidationError):
        return ScldmError(f"{where}: bad value for '{full_key}': {str(err).splitlines()[0]}")
    return ScldmError(f"{where}: {str(err).splitlines()[0]}")


# ---------------------------------------------------------------------------------------------
# shipped recipes: a recipe argument is a YAML path or the name of a recipe shipped with the package
# (``quickstart``, ``gpu/vae_b_8gpu``, ``recipes/quickstart.yaml``), so the command line works the same
# inside the repository (whose recipes/ links to the packaged folder) and in an installed environment
# ---------------------------------------------------------------------------------------------

RECIPE_DIR = Path(__file__).resolve().with_name("recipes")


def recipe_names() -> list[str]:
    """Names of the shipped recipes (``gpu/vae_b_8gpu`` for ``recipes/gpu/vae_b_8gpu.yaml``), sorted."""
    return sorted(str(p.relative_to(RECIPE_DIR).with_suffix("")) for p in RECIPE_DIR.rglob("*.yaml"))


def resolve_recipe(item: str | Path) -> Path:
    """The file of a recipe argument: an existing path, else a shipped recipe of that name."""
    path = Path(item)
    if path.is_file():
        return path
    name = str(item).removesuffix(".yaml").removesuffix(".yml")
    name = name.removeprefix("recipes/")
    shipped = RECIPE_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name, recipe_names(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`scldm-scale recipes` lists the shipped ones"
    raise ScldmError(f"{item}: recipe not found (neither a file nor a shipped recipe); {hint}")


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe (its one-line description), or ''."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _layers(recipes: Sequence[str | os.PathLike], overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    layers = []
    for recipe in recipes:
        path = resolve_recipe(recipe)
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # yaml syntax errors
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ScldmError(f"{path}: not a valid YAML recipe ({first}); fix the syntax") from None
    for item in overrides:
        if "=" not in item:
            raise ScldmError(f"override '{item}': expected key=value (e.g. train.max_steps=100)")
        if item.endswith("="):  # `key=` sets an empty string
            item += "''"
        layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
    return layers


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    for free_form in (cfg.train.deepspeed, cfg.optim.lr_scale):  # user-defined keys allowed here
        OmegaConf.set_struct(free_form, False)
    return cfg


def _merge(cfg: DictConfig, layers: list[tuple[str, DictConfig]]) -> DictConfig:
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, where) from None
    return cfg


def load_config(recipes: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Schema <- model presets <- recipe 1 <- recipe 2 ... <- `key=value` overrides (later wins)."""
    layers = _layers(recipes, overrides)
    merged = _merge(_schema(), layers)
    cfg = _schema()
    for preset_key, section, presets in (("vae_preset", "vae", VAE_PRESETS), ("dit_preset", "dit", DIT_PRESETS)):
        name = merged[preset_key]
        if not name:
            continue
        if name not in presets:
            raise ScldmError(f"{preset_key}='{name}' is not a known preset; choose one of {sorted(presets)}")
        cfg[section] = OmegaConf.merge(cfg[section], presets[name])  # presets sit below every recipe
    return _merge(cfg, layers)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A typed config with ``key=value`` overrides applied (same checks and messages as recipes)."""
    base = OmegaConf.structured(cfg)
    OmegaConf.set_struct(base, True)
    return to_object(_merge(base, _layers([], overrides)))


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config atomically."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_object(cfg: DictConfig) -> Config:
    """Typed view of the config (dataclass instances with enums)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def typed_section(section: DictConfig, cls):
    """A config section as its typed dataclass (``typed_section(cfg.vae, VAEConfig)``)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), section))


def run_dir(cfg: DictConfig | Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


# ---------------------------------------------------------------------------------------------
# derived values: the one place where data-dependent fields are filled
# ---------------------------------------------------------------------------------------------


def derive_sizes(cfg: DictConfig, world_size: int | None = None) -> DictConfig:
    """Apply the size knobs: heads from the widths, steps from the cell budget.

    - ``vae.n_heads: 0`` -> ``vae.d_model / scale.vae_head_dim`` (``dit`` likewise with
      ``scale.dit_head_dim``): one axis (the width) moves, the head width stays fixed.
    - ``train.cells > 0`` -> ``train.max_steps = ceil(cells / (data.batch_size x train.grad_accum x
      world_size))``; ``world_size`` defaults to ``WORLD_SIZE`` of the environment (1 when unset).
    """
    for section, head_key in (("vae", "vae_head_dim"), ("dit", "dit_head_dim")):
        if int(cfg[section].n_heads) != 0:
            continue
        width, head_dim = int(cfg[section].d_model), int(cfg.scale[head_key])
        if head_dim <= 0 or width % head_dim:
            raise ScldmError(f"{section}.n_heads=0 derives the heads from {section}.d_model={width} and "
                             f"scale.{head_key}={head_dim}, but {width} is not a positive multiple of {head_dim}; "
                             f"pick a multiple or set {section}.n_heads")
        cfg[section].n_heads = width // head_dim
    cells = int(cfg.train.cells)
    if cells < 0:
        raise ScldmError(f"train.cells={cells}: the cell budget must be >= 0 (0 = use train.max_steps)")
    if cells > 0:
        world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
        batch = global_batch(cfg, world)
        if batch <= 0:
            raise ScldmError(f"train.cells={cells} needs a positive global batch (data.batch_size x train.grad_accum "
                             f"x world size = {batch}); fix data.batch_size / train.grad_accum")
        cfg.train.max_steps = math.ceil(cells / batch)
    return cfg


def global_batch(cfg: DictConfig | Config, world_size: int) -> int:
    """Cells per optimizer step: ``data.batch_size x train.grad_accum x world_size``."""
    return int(cfg.data.batch_size) * int(cfg.train.grad_accum) * int(world_size)


def derive(cfg: DictConfig, *, n_genes: int | None = None, label_cardinalities: Sequence[int] | None = None,
           vae: VAEConfig | None = None, log_library: tuple[float, float] | None = None,
           world_size: int | None = None) -> DictConfig:
    """Fill data-dependent fields: vocabulary size, label cardinalities, log library size mean and
    std, latent shape, per-attribute lists; then the size knobs (:func:`derive_sizes`)."""
    if n_genes is not None:
        cfg.vae.n_genes = int(n_genes)
    if log_library is not None:
        cfg.vae.log_library_loc, cfg.vae.log_library_scale = float(log_library[0]), float(log_library[1])
    if label_cardinalities is not None:
        cfg.dit.label_cardinalities = [int(c) for c in label_cardinalities]
        n_attr = len(label_cardinalities)
        for key, default in (("label_dropout", 0.1), ("guidance", 1.0)):
            values = list(cfg.flow[key])
            if not values:
                values = [default] * n_attr
            elif len(values) == 1 and n_attr > 1:
                values = values * n_attr
            if len(values) != n_attr:
                raise ScldmError(
                    f"flow.{key} has {len(values)} values but data.label_columns has {n_attr}; give one per label column"
                )
            cfg.flow[key] = values
        try:
            check_interval(cfg.flow.guidance_interval)
        except ValueError as err:
            raise ScldmError(f"flow.guidance_interval: {err}; e.g. flow.guidance_interval=[0.3,0.8]") from None
    if vae is not None:
        cfg.vae = OmegaConf.merge(cfg.vae, OmegaConf.structured(vae))
        cfg.dit.n_tokens = vae.n_latent_tokens
        cfg.dit.d_in = vae.d_latent
    return derive_sizes(cfg, world_size)
