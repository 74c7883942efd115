"""The run plan of ``scldm-scale train RECIPE.yaml --dry-run``: sizes, compute, time and disk, from the
recipe alone (no data is read; the expected data comes from the recipe's ``plan:`` section).

- Sizes: the config after :func:`~scldm_scale.config.derive` with ``plan.n_genes`` genes and
  ``plan.label_cardinalities`` categories (a label file beside the data is used when present);
  parameters counted on a model built on the ``meta`` device (no memory).
- Compute: training FLOPs per cell = 3 x the forward FLOPs of the model's ``flops_per_cell``
  (backward = 2 x forward), for a cell of ``min(plan.genes_per_cell, data.max_genes)`` gene tokens
  decoding all genes (``train.decode_genes=all``) or those tokens plus ``train.n_zero_genes``;
  x cells seen (steps x global batch).
- Time: FLOPs / (``logging.peak_tflops`` x ``plan.mfu``) per GPU, ``plan.nodes`` x
  ``plan.gpus_per_node`` GPUs; the data rate the loaders then need is cells seen / that time.
- Disk: latent cache = ``plan.dataset_cells`` x (m x z float32 + one int64 label code per
  attribute + an int64 cell id); a checkpoint = parameters x (fp32 master weights + two fp32 Adam
  moments + the bf16/fp16 weights when training in low precision + fp32 EMA), times
  ``train.keep_last`` + 1 while a new one is written; the export = fp32 weights (+ EMA).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from scldm_scale.config import DecodeGenes, Precision, Stage, derive, global_batch, load_config, typed_section
from scldm_scale.api.run import has_export, load_export_config
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.source import data_dir
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError
from scldm_scale.nn.dit import DiT, DiTConfig, dit_train_flops
from scldm_scale.nn.vae import ScVAE, VAEConfig, vae_train_flops
from scldm_scale.scaling.loading import EMBEDDING_PARAMS


def _json_beside(cfg: DictConfig, explicit: str, name: str) -> Path | None:
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    path = Path(data_dir(str(cfg.data.path or ""))) / name
    return path if cfg.data.path and path.is_file() else None


def _n_genes(cfg: DictConfig) -> tuple[int, str]:
    if int(cfg.plan.n_genes) > 0:
        return int(cfg.plan.n_genes), "plan.n_genes"
    path = _json_beside(cfg, str(cfg.data.vocab_path), "vocab.json")
    if path is not None:

        return len(GeneVocab.load(path)), str(path)
    raise ScldmError("--dry-run needs the vocabulary size: set plan.n_genes (e.g. plan.n_genes=20000) or "
                     "data.vocab_path to an existing vocab.json")


def _cardinalities(cfg: DictConfig) -> tuple[list[int], str]:
    columns = list(cfg.data.label_columns)
    if list(cfg.plan.label_cardinalities):
        cards = [int(c) for c in cfg.plan.label_cardinalities]
        if len(cards) != len(columns):
            raise ScldmError(f"plan.label_cardinalities has {len(cards)} values but data.label_columns has "
                             f"{len(columns)}; give one per label column")
        return cards, "plan.label_cardinalities"
    path = _json_beside(cfg, str(cfg.data.labels_path), "labels.json")
    if path is not None:

        tables = LabelTables.load(path)
        return [tables.cardinalities[tables.attributes.index(c)] if c in tables.attributes else 1 for c in columns], \
            str(path)
    return [1] * len(columns), "unknown (set plan.label_cardinalities); 1 category per label assumed"


def _count(model: torch.nn.Module) -> tuple[int, int]:
    total = non_embedding = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if not name.startswith(EMBEDDING_PARAMS):
            non_embedding += p.numel()
    return total, non_embedding


def run_plan(cfg: DictConfig) -> dict[str, Any]:
    """Resolve ``cfg`` (in place) for its planned data and hardware and return the plan's figures."""

    plan = cfg.plan
    world = int(plan.nodes) * int(plan.gpus_per_node)
    if world < 1:
        raise ScldmError(f"plan.nodes={plan.nodes} x plan.gpus_per_node={plan.gpus_per_node}: need at least 1 GPU")
    stage = Stage(cfg.run.stage)
    notes: list[str] = []
    out: dict[str, Any] = {"stage": stage.value, "world_size": world}
    cards, cards_from = _cardinalities(cfg)
    if stage == Stage.VAE:
        n_genes, genes_from = _n_genes(cfg)
        derive(cfg, n_genes=n_genes, label_cardinalities=cards, world_size=world)
        vae_cfg: VAEConfig = typed_section(cfg.vae, VAEConfig)
        with torch.device("meta"):
            model = ScVAE(vae_cfg)
        genes_per_cell = float(plan.genes_per_cell)
        if genes_per_cell <= 0:
            raise ScldmError("--dry-run needs the expressed genes per cell for the FLOPs: set plan.genes_per_cell "
                             "(e.g. plan.genes_per_cell=2000)")
        tokens = min(genes_per_cell, float(cfg.data.max_genes))
        decode = float(n_genes) if DecodeGenes(cfg.train.decode_genes) == DecodeGenes.ALL \
            else tokens + float(cfg.train.n_zero_genes)
        train_per_cell = vae_train_flops(vae_cfg, tokens, decode)
        out.update(n_genes=n_genes, n_genes_from=genes_from, tokens_per_cell=tokens, decoded_genes_per_cell=decode)
        m, z = vae_cfg.n_latent_tokens, vae_cfg.d_latent
        sizes = {"vae.d_model": vae_cfg.d_model, "vae.n_heads": vae_cfg.n_heads, "head width": vae_cfg.d_model // max(vae_cfg.n_heads, 1),
                 "MLP width": int(vae_cfg.d_model * vae_cfg.mlp_ratio), "vae.n_latent_tokens (m)": m,
                 "vae.d_latent (z)": z, "vae.n_encoder_layers": vae_cfg.n_encoder_layers,
                 "vae.n_decoder_layers": vae_cfg.n_decoder_layers}
    else:
        vae_run = str(cfg.ldm.vae_run)
        if vae_run and has_export(vae_run):
            vae_cfg = load_export_config(vae_run).vae
            notes.append(f"latent shape from the VAE export in {vae_run}")
        else:
            vae_cfg = typed_section(cfg.vae, VAEConfig)
            notes.append("latent shape from this recipe's vae section (the VAE run is not trained yet)")
        derive(cfg, label_cardinalities=cards, vae=vae_cfg, world_size=world)
        dit_cfg: DiTConfig = typed_section(cfg.dit, DiTConfig)
        with torch.device("meta"):
            model = DiT(dit_cfg)
        train_per_cell = dit_train_flops(dit_cfg)
        m, z = dit_cfg.n_tokens, dit_cfg.d_in
        sizes = {"dit.d_model": dit_cfg.d_model, "dit.depth": dit_cfg.depth, "dit.n_heads": dit_cfg.n_heads,
                 "head width": dit_cfg.d_model // max(dit_cfg.n_heads, 1), "MLP width": int(dit_cfg.d_model * dit_cfg.mlp_ratio),
                 "latent tokens (m)": m, "latent width (z)": z}
    out["label_cardinalities"], out["label_cardinalities_from"] = cards, cards_from
    params, non_embedding = _count(model)
    steps = int(cfg.train.max_steps)
    batch = global_batch(cfg, world)
    cells = steps * batch
    flops = train_per_cell * cells
    out.update(sizes=sizes, params=params, params_non_embedding=non_embedding, flops_per_cell=train_per_cell,
               steps=steps, global_batch=batch, cells=cells, flops=flops, cells_budget=int(cfg.train.cells))
    dataset = int(plan.dataset_cells)
    out["dataset_cells"] = dataset
    out["epochs"] = cells / dataset if dataset > 0 else math.nan
    peak = float(cfg.logging.peak_tflops)
    mfu = float(plan.mfu)
    if peak > 0 and mfu > 0:
        gpu_hours = flops / (peak * 1e12 * mfu) / 3600
        out.update(peak_tflops=peak, mfu=mfu, gpu_hours=gpu_hours, wall_hours=gpu_hours / world,
                   cells_per_s=cells / (gpu_hours / world * 3600) if gpu_hours > 0 else math.nan)
    else:
        notes.append("no time estimate: set logging.peak_tflops (dense bf16 TFLOPs per GPU) and plan.mfu")
    n_attr = len(cfg.data.label_columns)
    out["latent_cache_bytes"] = dataset * (m * z * 4 + n_attr * 8 + 8) if dataset > 0 else math.nan
    low_precision = Precision(cfg.train.precision) != Precision.FP32
    per_param = 4 + 8 + (2 if low_precision else 0) + (4 if float(cfg.train.ema_decay) > 0 else 0)
    out["checkpoint_bytes"] = params * per_param
    out["checkpoints_bytes"] = params * per_param * (int(cfg.train.keep_last) + 1)
    out["export_bytes"] = params * 4 * (2 if float(cfg.train.ema_decay) > 0 else 1)
    out["notes"] = notes
    return out


def _si(value: float, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _bytes(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def format_plan(cfg: DictConfig, plan: dict[str, Any], recipes: Sequence[str], overrides: Sequence[str]) -> str:
    data = cfg.data
    lines = [f"run plan: {cfg.run.name} (stage {plan['stage']}), output {Path(cfg.run.output_dir) / cfg.run.name}"]
    if plan["stage"] == "vae":
        source = f"{data.source.value if hasattr(data.source, 'value') else data.source} {data.path}"
        if str(data.census_version):
            source += f" (Census {data.census_version})"
        lines.append(f"  data        {source}")
        if str(data.value_filter):
            lines.append(f"  obs filter  {data.value_filter}")
    else:
        latents = str(cfg.ldm.latents) or str(Path(str(cfg.ldm.vae_run)) / "latents")
        lines.append(f"  data        latent cache {latents} (VAE run {cfg.ldm.vae_run})")
    lines.append(f"  labels      {', '.join(data.label_columns)}: categories {plan['label_cardinalities']} "
                 f"({plan['label_cardinalities_from']})")
    if plan["stage"] == "vae":
        lines.append(f"  genes       {plan['n_genes']:,} ({plan['n_genes_from']}); {plan['tokens_per_cell']:.0f} tokens and "
                     f"{plan['decoded_genes_per_cell']:.0f} decoded genes per cell")
    lines.append("  sizes       " + ", ".join(f"{k} {v}" for k, v in plan["sizes"].items()))
    lines.append(f"  parameters  {plan['params']:,} ({plan['params_non_embedding']:,} non-embedding)")
    lines.append(f"  FLOPs/cell  {_si(plan['flops_per_cell'], 'FLOP')} (training: 3 x forward)")
    budget = f"train.cells={plan['cells_budget']:,} -> " if plan["cells_budget"] else ""
    lines.append(f"  steps       {budget}{plan['steps']:,} steps x global batch {plan['global_batch']:,} "
                 f"({data.batch_size} per GPU x {cfg.train.grad_accum} accumulation x {plan['world_size']} GPUs)")
    epochs = f" = {plan['epochs']:.2f} epochs of {plan['dataset_cells']:,} cells" if plan["dataset_cells"] else ""
    lines.append(f"  cells       {plan['cells']:,}{epochs}")
    lines.append(f"  compute     {_si(plan['flops'], 'FLOP')}")
    if "gpu_hours" in plan:
        lines.append(f"  time        {plan['gpu_hours']:,.0f} GPU-hours at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:g} "
                     f"TFLOPs = {plan['wall_hours']:,.1f} h on {plan['world_size']} GPUs")
    if "cells_per_s" in plan:
        lines.append(f"  data rate   the loaders must deliver {plan['cells_per_s']:,.0f} cells/s "
                     f"({plan['cells_per_s'] / plan['world_size']:,.0f} per GPU) to keep up")
    precision = cfg.train.precision.value if hasattr(cfg.train.precision, "value") else cfg.train.precision
    lines.append(f"  training    {precision}, ZeRO stage {cfg.train.zero_stage}, checkpoint every "
                 f"{cfg.train.ckpt_every} steps, keep {cfg.train.keep_last}")
    disk = [f"checkpoints {_bytes(plan['checkpoints_bytes'])} ({_bytes(plan['checkpoint_bytes'])} each)",
            f"export {_bytes(plan['export_bytes'])}"]
    if plan["stage"] == "vae" and plan["dataset_cells"]:
        disk.append(f"latent cache (encode) {_bytes(plan['latent_cache_bytes'])}")
    lines.append("  disk        " + ", ".join(disk))
    nodes, gpus = int(cfg.plan.nodes), int(cfg.plan.gpus_per_node)
    args = shlex.join([*map(str, recipes), *overrides])
    lines.append(f"  launch      sbatch --nodes={nodes} --gpus-per-node={gpus} launch/slurm.sbatch {args}")
    for note in plan["notes"]:
        lines.append(f"  note        {note}")
    return "\n".join(lines)


def dry_run(recipes: Sequence[str], overrides: Sequence[str]) -> str:
    """Load, resolve and describe a run without reading data or training."""
    cfg = load_config(recipes, overrides)
    plan = run_plan(cfg)
    return format_plan(cfg, plan, recipes, overrides)
