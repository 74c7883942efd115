"""GPU check: the whole pipeline on one GPU through the CLI, with throughput, MFU, memory and the
fused-attention speedup, in one command.

    make gpu-check                                  # on a CUDA machine, from dist/wheelhouse (no network)
    python benchmarks/gpu_check.py [--out DIR] [--keep]
    python benchmarks/gpu_check.py --cpu-smoke      # the same stages on CPU, fp32, tiny sizes (tests)

Stages, each one what a user runs (``python -m scldm_scale.cli ...``, one process, one GPU):

1. ``data``: a synthetic atlas (:func:`scldm_scale.data.synthetic.write_synthetic_atlas`, 30,000 cells
   x 4,000 genes, 10% held out), written in this process;
2. ``vae``: ``train recipes/gpu/check_vae.yaml`` (50 steps, bf16, ZeRO-2);
3. ``encode``: the latent cache of the training cells;
4. ``ldm``: ``train recipes/gpu/check_vae.yaml recipes/gpu/check_ldm.yaml`` (50 steps, bf16, ZeRO-2);
5. ``generate``: 2,000 cells with the held-out cells' label proportions;
6. ``evaluate``: generated vs held-out cells (W2, MMD, FD, 1-NN, kNN label accuracy, ...);
7. ``attention``: the attention calls of both models at the check's shapes (batch, heads, latent
   tokens, the atlas's expressed genes per cell), forward + backward, timed with the kernel that
   :func:`scldm_scale.nn.attention.choose_kernel` picks and with plain SDPA over the padded batch with
   a mask (``Kernel.SDPA_MASK``); the speedup is the ratio of their total times over the attention
   calls of one training step of both models (each site times its calls per forward), and the two
   outputs are compared. Until ``scldm_scale.nn.attention`` has the kernel override
   (``attention(..., kernel=Kernel.X)``, ``choose_kernel``) the speedup is reported as unavailable.

Training figures come from the trainer's ``metrics.jsonl`` (``cells_per_s``, ``tokens_per_s``,
``mfu``, ``peak_mem_gib``): the median over the logged windows after the first (which holds
start-up work), and the largest peak memory. ``generate`` cells/s is the sampling time the CLI
reports; wall times include each command's start-up. The last line printed is one JSON object.

Exit status: 0 when every stage ran and its figures are finite, 1 otherwise (the JSON line says which
stage failed; its log is in ``<out>/logs``), 2 without a CUDA device (unless ``--cpu-smoke``).
With ``--cpu-smoke`` the stages run on CPU in fp32 with tiny models, and MFU is taken against a
nominal 1 TFLOP/s peak: it only exercises the code path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "gpu"
BUDGET_S = 480.0  # the whole check on one H100, start-up included
CHECK_OUTPUTS = ("data", "check-vae", "check-ldm", "generated.h5ad", "eval.json", "logs")  # what a check writes in --out
MATCHING_OUTPUT_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class Scale:
    """Sizes of one flavour of the check (the recipes hold the model sizes)."""

    cells: int  # synthetic atlas, held-out cells included
    genes: int
    shards: int
    heldout_fraction: float
    generate_cells: int
    encode_batch: int
    generate_batch: int
    attention_iters: int
    vae_overrides: tuple[str, ...] = ()
    ldm_overrides: tuple[str, ...] = ()
    generate_args: tuple[str, ...] = ()


# generate decodes all 4,000 genes of a block of cells at once (fp32): 512 cells keep that near 4 GiB a tensor
GPU = Scale(cells=30_000, genes=4_000, shards=8, heldout_fraction=0.1, generate_cells=2_000, encode_batch=1024,
            generate_batch=512, attention_iters=20)
# Tiny sizes for CPU: more genes than evaluate's 2,000 HVGs, so the HVG selection runs as on real data.
CPU_SMOKE = Scale(
    cells=480, genes=2_100, shards=2, heldout_fraction=0.25, generate_cells=120, encode_batch=128,
    generate_batch=64, attention_iters=2,
    vae_overrides=("train.precision=fp32", "data.num_workers=0", "data.batch_size=16", "data.max_genes=512",
                   "vae.d_model=32", "vae.n_heads=2", "vae.n_latent_tokens=4", "vae.d_latent=4",
                   "vae.n_encoder_layers=1", "vae.n_decoder_layers=1", "train.n_zero_genes=32",
                   "train.max_steps=12", "train.log_every=3", "optim.warmup_steps=2", "logging.progress=false",
                   "logging.peak_tflops=1.0"),
    ldm_overrides=("data.batch_size=32", "dit.d_model=32", "dit.depth=1", "dit.n_heads=2"),
    generate_args=("--steps", "4"),
)


# --------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    wall_s: float = 0.0
    ok: bool = True
    figures: dict = field(default_factory=dict)
    error: str = ""


class StageFailed(Exception):
    def __init__(self, stage: Stage) -> None:
        super().__init__(stage.error)
        self.stage = stage


def run_cli(stage: Stage, args: list[str], log_dir: Path, env: dict[str, str], cwd: Path) -> str:
    """``python -m scldm_scale.cli ARGS`` in one process; its output goes to ``<log_dir>/<stage>.log``
    and is returned. A non-zero exit raises :class:`StageFailed` with the log's last lines."""
    cmd = [sys.executable, "-m", "scldm_scale.cli", *args]
    log = log_dir / f"{stage.name}.log"
    print(f"[{stage.name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    stage.wall_s = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        stage.ok = False
        tail = "\n".join(text.splitlines()[-40:])
        stage.error = f"exit {proc.returncode} ({log})"
        print(f"[{stage.name}] failed after {stage.wall_s:.1f} s, exit {proc.returncode}; last lines of {log}:\n{tail}",
              flush=True)
        raise StageFailed(stage)
    print(f"[{stage.name}] done in {stage.wall_s:.1f} s", flush=True)
    return text


def training_figures(run_dir: Path) -> dict:
    """Throughput, MFU and peak memory of a training run from its ``metrics.jsonl``.

    Median over the logged windows after the first one (start-up: allocations, kernel selection,
    the loader's first batches); peak memory is the largest recorded (device memory on a GPU, the
    process's peak RSS on CPU); the loss of the first and the last window.
    """
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in (json.loads(line) for line in lines if line.strip()) if "cells_per_s" in r]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training records")
    steady = records[1:] or records

    def median(key: str) -> float | None:
        values = [float(r[key]) for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    mem_key = "peak_mem_gib" if any("peak_mem_gib" in r for r in records) else "peak_rss_gib"
    return {
        "cells_per_s": median("cells_per_s"),
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "peak_mem_gib": max(float(r.get(mem_key, 0.0)) for r in records),
        "peak_mem_kind": "device" if mem_key == "peak_mem_gib" else "host RSS",
        "steps": int(records[-1]["step"]),
        "loss_first": float(records[0]["loss"]),
        "loss_last": float(records[-1]["loss"]),
    }


GENERATED_RE = re.compile(r"wrote (\d+) cells to .*\(generated in ([0-9.]+) s")


def generate_figures(output: str, n_cells: int, wall_s: float) -> dict:
    """Sampling cells/s from the CLI's ``wrote N cells to OUT (generated in S s, ...)`` line, else
    from the command's wall time."""
    match = GENERATED_RE.search(output)
    if match:
        cells, seconds = int(match.group(1)), float(match.group(2))
        return {"cells": cells, "seconds": seconds, "cells_per_s": cells / max(seconds, 1e-9), "timed": "sampling"}
    return {"cells": n_cells, "seconds": wall_s, "cells_per_s": n_cells / max(wall_s, 1e-9), "timed": "wall"}


# --------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionSite:
    """One attention call of a model at the check's shapes: per cell, ``q_len_n`` queries attend to
    ``k_len_n`` keys (lengths that vary between cells make a packed / padded batch)."""

    name: str
    calls: int  # calls per forward pass of the model
    heads: int
    head_dim: int
    q_len_n: tuple[int, ...]
    k_len_n: tuple[int, ...]
    biased: bool = False  # a per-key additive bias (the pooling's expression prior)

    @property
    def n(self) -> int:
        return len(self.q_len_n)

    @property
    def q_varies(self) -> bool:
        return len(set(self.q_len_n)) > 1

    @property
    def k_varies(self) -> bool:
        return len(set(self.k_len_n)) > 1


def attention_sites(vae_cfg, ldm_cfg, expressed_n: np.ndarray) -> list[AttentionSite]:
    """The attention calls of the check's VAE and DiT: DiT self-attention, the VAE's latent
    self-attention, pooling (m latent queries over each cell's expressed genes, with the expression
    prior) and unpooling (each cell's decoded genes over the m latents)."""
    vae, dit = vae_cfg.vae, ldm_cfg.dit
    m = int(vae.n_latent_tokens)
    n_vae, n_dit = int(vae_cfg.data.batch_size), int(ldm_cfg.data.batch_size)
    tokens_n = np.resize(np.minimum(expressed_n, int(vae_cfg.data.max_genes)), n_vae).astype(int)
    if str(vae_cfg.train.decode_genes).lower().endswith("sampled"):
        decoded_n = tokens_n + int(vae_cfg.train.n_zero_genes)
    else:
        decoded_n = np.full(n_vae, int(vae.n_genes))
    vh, vd = int(vae.n_heads), int(vae.d_model) // int(vae.n_heads)
    sites = [
        AttentionSite("dit_self", int(dit.depth), int(dit.n_heads), int(dit.d_model) // int(dit.n_heads),
                      (m,) * n_dit, (m,) * n_dit),
        AttentionSite("vae_pool", 1, vh, vd, (m,) * n_vae, tuple(int(t) for t in tokens_n),
                      biased=str(vae.pool_prior).lower().endswith("expression")),
        AttentionSite("vae_unpool", 1, vh, vd, tuple(int(t) for t in decoded_n), (m,) * n_vae),
    ]
    n_self = int(vae.n_encoder_layers) + int(vae.n_decoder_layers)
    if n_self:
        sites.insert(1, AttentionSite("vae_self", n_self, vh, vd, (m,) * n_vae, (m,) * n_vae))
    return sites


def kernel_api():
    """The attention module when it has the kernel override API (``attention(..., kernel=)``,
    ``Kernel``, ``choose_kernel``), else None."""
    from scldm_scale.nn import attention as attn

    if not (hasattr(attn, "Kernel") and hasattr(attn, "choose_kernel")
            and "kernel" in inspect.signature(attn.attention).parameters):
        return None
    return attn


def _lengths_mask(len_n: tuple[int, ...], device: torch.device) -> torch.Tensor:
    lengths = torch.tensor(len_n, device=device)
    return torch.arange(max(len_n), device=device)[None, :] < lengths[:, None]  # (n, L) bool


def _timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def time_site(attn, site: AttentionSite, device: torch.device, dtype: torch.dtype, iters: int,
              seed: int = 0) -> dict:
    """Forward + backward time of one site with the chosen kernel and with SDPA + mask on the padded
    batch, and the largest difference between their outputs over the real query rows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, h, d = site.n, site.heads, site.head_dim
    lq, lk = max(site.q_len_n), max(site.k_len_n)
    q_mask_nl, k_mask_nl = _lengths_mask(site.q_len_n, device), _lengths_mask(site.k_len_n, device)
    q_rows = q_mask_nl.flatten().nonzero().squeeze(1)  # (Q,) real query rows of the padded layout

    def real_rows(out_nlhd: torch.Tensor) -> torch.Tensor:  # (n, Lq, h, d) -> (Q, h, d), no host sync
        rows = out_nlhd.reshape(n * lq, h, d)
        return rows.index_select(0, q_rows) if site.q_varies else rows

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q_nlhd, k_nlhd, v_nlhd = rand(n, lq, h, d), rand(n, lk, h, d), rand(n, lk, h, d)
    bias_nl = (torch.rand(n, lk, generator=gen) * 4 - 2).to(device, torch.float32) if site.biased else None
    packing = getattr(attn, "attend", None) is not None and (site.q_varies or site.k_varies)
    if packing:
        from scldm_scale.nn.packing import Packing

        def pack(x_nl, mask_nl, varies):
            return (x_nl[mask_nl], Packing.from_lengths(mask_nl.sum(1), mask_nl.shape[1], int(mask_nl.sum()))) \
                if varies else (x_nl, None)

        q_in, q_pack = pack(q_nlhd, q_mask_nl, site.q_varies)
        k_in, k_pack = pack(k_nlhd, k_mask_nl, site.k_varies)
        v_in, _ = pack(v_nlhd, k_mask_nl, site.k_varies)
        b_in = (bias_nl[k_mask_nl] if site.k_varies else bias_nl) if bias_nl is not None else None
        kernel = attn.choose_kernel(device.type, dtype, d, packed=True, masked=False, biased=site.biased)
        leaves = [t.detach().requires_grad_() for t in (q_in, k_in, v_in)]

        def chosen():
            out = attn.attend(*leaves, key_bias=b_in, q_pack=q_pack, k_pack=k_pack, kernel=kernel)
            return out if q_pack is not None else real_rows(out)  # (Q, h, d)
    else:
        mask = k_mask_nl if site.k_varies else None
        kernel = attn.choose_kernel(device.type, dtype, d, packed=False, masked=mask is not None,
                                    biased=site.biased)
        leaves = [t.transpose(1, 2).detach().requires_grad_() for t in (q_nlhd, k_nlhd, v_nlhd)]  # (n, h, L, d)

        def chosen():
            out_nhld = attn.attention(*leaves, mask, bias_nl, kernel=kernel)
            return real_rows(out_nhld.transpose(1, 2))  # (Q, h, d)

    base_leaves = [t.transpose(1, 2).detach().requires_grad_() for t in (q_nlhd, k_nlhd, v_nlhd)]  # (n, h, L, d)

    def baseline():
        out_nhld = attn.attention(*base_leaves, k_mask_nl, bias_nl, kernel=attn.Kernel.SDPA_MASK)
        return real_rows(out_nhld.transpose(1, 2))  # (Q, h, d)

    with torch.no_grad():
        diff = float((chosen().float() - baseline().float()).abs().max())
    grad = torch.randn(q_rows.numel(), h, d, generator=gen).to(device, dtype)

    def step(fn, params):
        for p in params:
            p.grad = None
        fn().backward(grad)

    warmup = 3 if device.type == "cuda" else 1
    t_chosen = _timed(lambda: step(chosen, leaves), iters, warmup, device)
    t_base = _timed(lambda: step(baseline, base_leaves), iters, warmup, device)
    return {"kernel": getattr(kernel, "value", str(kernel)), "calls": site.calls, "chosen_ms": 1e3 * t_chosen,
            "sdpa_mask_ms": 1e3 * t_base, "speedup": t_base / max(t_chosen, 1e-12), "max_abs_diff": diff,
            "shape": f"n={n} h={h} d={d} q<={lq} k<={lk}" + (" bias" if site.biased else "")}


def attention_speedup(sites: list[AttentionSite], device: torch.device, dtype: torch.dtype, iters: int) -> dict:
    """Per-site timings and the overall speedup (SDPA + mask time / chosen-kernel time, summed over one
    forward of both models: each site times its calls). ``speedup`` is None, with the reason, when the
    attention module has no kernel override."""
    attn = kernel_api()
    if attn is None:
        return {"speedup": None, "reason": "scldm_scale.nn.attention has no kernel override "
                                           "(attention(..., kernel=Kernel.X), choose_kernel)"}
    per_site = {site.name: time_site(attn, site, device, dtype, iters, seed=i) for i, site in enumerate(sites)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    chosen = sum(s["calls"] * s["chosen_ms"] for s in per_site.values())
    base = sum(s["calls"] * s["sdpa_mask_ms"] for s in per_site.values())
    tol = MATCHING_OUTPUT_TOL.get(dtype, 1e-2)
    return {"speedup": base / max(chosen, 1e-12), "sites": per_site,
            "outputs_match": all(s["max_abs_diff"] <= tol for s in per_site.values()), "tolerance": tol}


# --------------------------------------------------------------------------------------------- report


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": np.__version__}
    for dist in ("deepspeed", "anndata", "scanpy", "cellarium-ml", "scldm-scale"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import flash_attn  # noqa: F401

        out["flash_attn"] = importlib.metadata.version("flash-attn")
    except Exception:  # noqa: BLE001 - optional: absent or a broken build
        out["flash_attn"] = None
    return out


def _fmt(value, spec: str = "", missing: str = "-") -> str:
    """``value`` with ``spec``; by default thousands separators from 100 up, 3 significant digits below."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec or (",.0f" if abs(value) >= 100 else ".3g"))


def print_table(stages: list[Stage]) -> None:
    print()
    print(f"{'stage':<10} {'wall s':>8} {'cells/s':>10} {'tokens/s':>12} {'MFU':>9} {'peak GiB':>9}")
    for s in stages:
        f = s.figures
        mfu = _fmt(100 * f["mfu"], ".3g") + "%" if f.get("mfu") is not None else "-"
        mem = _fmt(f.get("peak_mem_gib"), ".2f")
        if f.get("peak_mem_kind") == "host RSS":
            mem += " (RSS)"
        status = "" if s.ok else "  FAILED"
        print(f"{s.name:<10} {s.wall_s:>8.1f} {_fmt(f.get('cells_per_s')):>10} {_fmt(f.get('tokens_per_s')):>12} "
              f"{mfu:>9} {mem:>9}{status}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summary(stages: dict[str, Stage], device: str, versions: dict, wall_s: float, smoke: bool,
            attention: dict | None, failed: Stage | None) -> dict:
    vae, ldm = stages["vae"].figures, stages["ldm"].figures
    gen, ev = stages["generate"].figures, stages["evaluate"].figures
    out: dict = {
        "ok": failed is None,
        "device": device,
        "cpu_smoke": smoke,
        "wall_s": round(wall_s, 1),
        "budget_s": BUDGET_S,
        "within_budget": wall_s <= BUDGET_S,
        "data_wall_s": stages["data"].wall_s,
        "vae_wall_s": stages["vae"].wall_s,
        "vae_cells_per_s": vae.get("cells_per_s"),
        "vae_tokens_per_s": vae.get("tokens_per_s"),
        "mfu_vae": vae.get("mfu"),
        "vae_peak_mem_gib": vae.get("peak_mem_gib"),
        "peak_mem_kind": vae.get("peak_mem_kind"),  # device (torch.cuda.max_memory_allocated) or host RSS
        "vae_loss_first": vae.get("loss_first"),
        "vae_loss_last": vae.get("loss_last"),
        "encode_wall_s": stages["encode"].wall_s,
        "encode_cells_per_s": stages["encode"].figures.get("cells_per_s"),
        "ldm_wall_s": stages["ldm"].wall_s,
        "ldm_cells_per_s": ldm.get("cells_per_s"),
        "ldm_tokens_per_s": ldm.get("tokens_per_s"),
        "mfu_dit": ldm.get("mfu"),
        "ldm_peak_mem_gib": ldm.get("peak_mem_gib"),
        "ldm_loss_first": ldm.get("loss_first"),
        "ldm_loss_last": ldm.get("loss_last"),
        "generate_wall_s": stages["generate"].wall_s,
        "generate_cells": gen.get("cells"),
        "generate_cells_per_s": gen.get("cells_per_s"),
        "evaluate_wall_s": stages["evaluate"].wall_s,
    }
    for key in ("w2", "mmd", "fd", "nn1", "precision", "recall", "mean_r2", "var_r2", "knn_acc/cell_type"):
        out["eval_" + key.replace("/", "_")] = ev.get(key)
    out["attention_speedup"] = attention.get("speedup") if attention else None
    if attention and attention.get("sites"):
        out["attention_outputs_match"] = attention["outputs_match"]
        out["attention_sites"] = attention["sites"]
    elif attention:
        out["attention_unavailable"] = attention.get("reason")
    out["versions"] = versions
    if failed is not None:
        out["failed_stage"] = failed.name
        out["error"] = failed.error
    else:
        problems = [k for k in ("vae_cells_per_s", "vae_peak_mem_gib", "ldm_cells_per_s", "ldm_peak_mem_gib",
                                "generate_cells_per_s", "eval_w2", "eval_mmd", "vae_loss_last", "ldm_loss_last")
                    if not _finite(out[k])]
        problems += [k for k in ("mfu_vae", "mfu_dit") if not _finite(out[k])]  # unknown GPU: --peak-tflops
        if out["generate_cells"] != stages["generate"].figures.get("requested"):
            problems.append("generate_cells")
        if attention and attention.get("sites") and not attention["outputs_match"]:
            problems.append("attention_outputs_match")
        if problems:
            out["ok"] = False
            out["error"] = "not finite or wrong: " + ", ".join(problems)
    return out


# --------------------------------------------------------------------------------------------- main


def _read_config(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml")


def _expressed_genes(data_dir: Path, n: int) -> np.ndarray:
    """Expressed genes per cell of the first ``n`` cells of the first shard."""
    import anndata as ad

    adata = ad.read_h5ad(sorted(data_dir.glob("shard_*.h5ad"))[0])
    x = adata.X[: min(n, adata.n_obs)]
    return np.asarray((x != 0).sum(axis=1)).ravel()


def run_check(out: Path, scale: Scale, smoke: bool, peak_tflops: float = 0.0) -> tuple[dict, list[Stage]]:
    """Every stage in order; the first that fails (a non-zero exit, or an error reading its results)
    stops the check. Returns the summary (the JSON line) and the stages."""
    from scldm_scale.data.synthetic import write_synthetic_atlas

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    versions = _versions()
    print(f"device: {device_name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    import scldm_scale

    print(f"scldm_scale from {Path(scldm_scale.__file__).parent}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECK_OUTPUTS:  # a re-run into the same --out starts afresh
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CLI stages on CPU too
    data = out / "data"
    vae_run, ldm_run = out / "check-vae", out / "check-ldm"
    gen_path, eval_path = out / "generated.h5ad", out / "eval.json"
    common = [f"run.output_dir={out}", f"data.path={data}", *scale.vae_overrides]
    if peak_tflops > 0:
        common.append(f"logging.peak_tflops={peak_tflops}")
    n_train = scale.cells - int(round(scale.cells * scale.heldout_fraction))  # as write_synthetic_atlas splits

    def run_data(stage: Stage) -> None:
        print(f"[data] synthetic atlas: {scale.cells} cells x {scale.genes} genes -> {data}", flush=True)
        t0 = time.perf_counter()
        meta = write_synthetic_atlas(data, n_cells=scale.cells, n_genes=scale.genes, n_shards=scale.shards,
                                     heldout_fraction=scale.heldout_fraction, seed=0, progress=False, overwrite=True)
        stage.wall_s = time.perf_counter() - t0
        stage.figures["cells_per_s"] = scale.cells / stage.wall_s
        print(f"[data] done in {stage.wall_s:.1f} s ({meta['n_cells']} training cells, sparsity "
              f"{meta['sparsity']:.3f})", flush=True)

    def run_vae(stage: Stage) -> None:
        run_cli(stage, ["train", str(RECIPES / "check_vae.yaml"), *common], log_dir, env, out)
        stage.figures = training_figures(vae_run)

    def run_encode(stage: Stage) -> None:
        run_cli(stage, ["encode", "--vae-run", str(vae_run), "--batch-size", str(scale.encode_batch), "--quiet"],
                log_dir, env, out)
        stage.figures["cells_per_s"] = n_train / stage.wall_s

    def run_ldm(stage: Stage) -> None:
        run_cli(stage, ["train", str(RECIPES / "check_vae.yaml"), str(RECIPES / "check_ldm.yaml"),
                        f"ldm.vae_run={vae_run}", *common, *scale.ldm_overrides], log_dir, env, out)
        stage.figures = training_figures(ldm_run)

    def run_generate(stage: Stage) -> None:
        text = run_cli(stage, ["generate", "--ldm-run", str(ldm_run), "--out", str(gen_path), "--match",
                               str(data / "heldout.h5ad"), "--n-cells", str(scale.generate_cells), "--seed", "0",
                               "--batch-size", str(scale.generate_batch), "--quiet", *scale.generate_args],
                       log_dir, env, out)
        stage.figures = {**generate_figures(text, scale.generate_cells, stage.wall_s),
                         "requested": scale.generate_cells}

    def run_evaluate(stage: Stage) -> None:
        run_cli(stage, ["evaluate", "--reference", str(data / "heldout.h5ad"), "--generated", str(gen_path),
                        "--labels", "cell_type", "--out", str(eval_path)], log_dir, env, out)
        stage.figures = {k: v for k, v in json.loads(eval_path.read_text()).items() if not isinstance(v, dict)}

    def run_attention(stage: Stage) -> None:
        print("[attention] chosen kernel vs SDPA + mask at the check's shapes (forward + backward)", flush=True)
        t0 = time.perf_counter()
        vae_cfg, ldm_cfg = _read_config(vae_run), _read_config(ldm_run)
        sites = attention_sites(vae_cfg, ldm_cfg, _expressed_genes(data, int(vae_cfg.data.batch_size)))
        stage.figures = attention_speedup(sites, device, torch.bfloat16 if cuda else torch.float32,
                                          scale.attention_iters)
        stage.wall_s = time.perf_counter() - t0
        print(f"[attention] done in {stage.wall_s:.1f} s", flush=True)

    steps = {"data": run_data, "vae": run_vae, "encode": run_encode, "ldm": run_ldm, "generate": run_generate,
             "evaluate": run_evaluate, "attention": run_attention}
    stages = {name: Stage(name) for name in steps}
    failed = None
    for name, step in steps.items():
        stage = stages[name]
        try:
            step(stage)
        except StageFailed:
            failed = stage
            break
        except Exception as err:  # noqa: BLE001 - report it in the JSON line, with the figures so far
            stage.ok = False
            stage.error = f"{type(err).__name__}: {err}"
            print(f"[{name}] failed: {stage.error}", flush=True)
            traceback.print_exc(file=sys.stdout)
            failed = stage
            break
    attention = stages["attention"].figures or None
    result = summary(stages, device_name, versions, time.perf_counter() - t_start, smoke, attention, failed)
    return result, list(stages.values())


def print_report(result: dict, stages: list[Stage]) -> None:
    print_table(stages)
    evals = {k[5:]: v for k, v in result.items() if k.startswith("eval_")}
    if any(v is not None for v in evals.values()):
        print("\nevaluation (generated vs held-out): " + ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in evals.items()))
    gen_rate = result.get("generate_cells_per_s")
    if gen_rate is not None:
        print(f"generate: {result['generate_cells']} cells at {_fmt(gen_rate)} cells/s")
    if result.get("attention_sites"):
        print("\nattention (ms per forward + backward; calls per model forward):")
        for name, s in result["attention_sites"].items():
            print(f"  {name:<11} x{s['calls']:<3} {s['kernel']:<17} {s['chosen_ms']:9.3f} ms   sdpa+mask "
                  f"{s['sdpa_mask_ms']:9.3f} ms   {s['speedup']:5.2f}x   max |diff| {s['max_abs_diff']:.2e}   "
                  f"{s['shape']}")
    if result.get("attention_speedup") is not None:
        print(f"fused vs SDPA + mask attention speedup: {result['attention_speedup']:.2f}x")
    elif result.get("attention_unavailable"):
        print(f"attention speedup: unavailable ({result['attention_unavailable']})")
    verdict = "PASS" if result["ok"] else f"FAIL ({result.get('error', '')})"
    budget = "" if result["cpu_smoke"] else \
        f" ({'within' if result['within_budget'] else 'OVER'} the budget of {BUDGET_S:.0f} s)"
    print(f"\nGPU check {verdict}: {result['wall_s']:.0f} s on {result['device']}{budget}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  python benchmarks/gpu_check.py\n"
                                            "  python benchmarks/gpu_check.py --out runs/gpu-check --keep\n"
                                            "  python benchmarks/gpu_check.py --cpu-smoke")
    parser.add_argument("--out", help="working directory of the check (e.g. --out runs/gpu-check; default: a "
                                      "temporary directory, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (runs, logs, generated cells)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense bf16 peak TFLOP/s of the GPU for MFU, when the trainer does not know the device "
                             "(e.g. --peak-tflops 989)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same stages on CPU in fp32 with tiny sizes (a test of the script itself)")
    args = parser.parse_args(argv)
    smoke = bool(args.cpu_smoke)
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False): run the GPU check on a machine with a "
              "GPU, or pass --cpu-smoke for the CPU smoke run", file=sys.stderr)
        return 2
    scale = CPU_SMOKE if smoke else GPU
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="scldm-gpu-check-"))
    result, stages = run_check(out, scale, smoke, args.peak_tflops)
    print_report(result, stages)
    if result["ok"] and not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"working directory: {out}")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
