"""Training-step benchmark: throughput per ZeRO stage and per-rank model-state bytes vs the ZeRO paper.

    python benchmarks/train_step.py            # VAE + DiT, quickstart width and 4x width, ZeRO 0/1/2/3
    python benchmarks/train_step.py --quick    # quickstart width (+ 4x width for ZeRO-3), < 4 min on 2 cores

The script starts itself under ``torchrun --standalone --nproc_per_node=2`` (gloo on CPU, NCCL on
CUDA). Each rank builds the models as the trainer does (``load_config`` of the quickstart recipes,
``derive``, ``build_engine``) and trains them on synthetic batches with the shapes of the real data:

- VAE (stage 1): 64 cells per rank, ~150 expressed genes out of 1,000 per cell (uniform 100-200),
  packed token batches, the recipe's sampled decode (expressed genes + 256 sampled zeros) through
  ``decode_targets`` and ``vae_loss``, as ``VAEStage.loss``.
- DiT (stage 2): 128 latents per rank (n_tokens x d_latent from the VAE config), labels with the
  synthetic atlas's cardinalities (8 cell types, 4 tissues, 6 donors), label dropout and the
  flow-matching loss, as ``LDMStage.loss``.

Throughput (``steps/s``, global ``cells/s``) is timed between barriers over N steps after a warm-up,
in the recipe's precision (fp32 on CPU, bf16 on CUDA). Model-state bytes are measured in bf16
(mixed precision, the setting of the ZeRO paper's formula; DeepSpeed's bf16 runs on CPU) and in
fp32, on every rank, between ``backward`` and ``step`` of a step after the warm-up (when parameters,
gradients, master weights and Adam moments all exist). "Measured" is the sum of the storages of
every tensor the engine holds, found by walking the DeepSpeed optimizer (and the module's
parameters, their ``.grad`` and ZeRO-3 ``ds_tensor`` partitions), deduplicated by storage, sorted
into parameters / gradients / fp32 master weights / optimizer state. Communication buckets
(``ipg_buckets``: ZeRO-3 allocates ``reduce_bucket_size`` = 5e8 elements per rank whatever the
model) are reported apart, as "buffers", and are not model state.

ZeRO paper (Rajbhandari et al. 2020), bytes per rank for P parameters on N ranks, mixed precision
(2-byte parameters and gradients, K = 12 bytes of fp32 master weights + Adam moments):
stage 0: 16P, stage 1: 4P + 12P/N, stage 2: 2P + 14P/N, stage 3: 16P/N. In fp32 training the same
partitioning with 4-byte parameters and gradients gives: stage 0: 16P (no master copy: K = 8),
stage 1: 8P + 12P/N, stage 2: 4P + 16P/N, stage 3: 20P/N (DeepSpeed ZeRO 1-3 keep an fp32 master
partition even when the parameters are fp32, so K = 12).

On CUDA the bf16 runs are also timed and MFU = train FLOPs per cell * cells_per_s / (peak * world)
(``vae_train_flops`` / ``dit_train_flops``: forward + backward matmul FLOPs, checked against
``FlopCounterMode`` in the tests; the peak from ``scldm_scale.train.metrics.detect_peak_tflops``),
and the peak device memory of every rank (``torch.cuda.max_memory_allocated``) is recorded.

The last line printed is one JSON object: ``zero3_state_bytes_vs_formula`` (measured / 16P/N for the
bf16 ZeRO-3 run of the largest size measured, the trainer's DeepSpeed settings), ``cells_per_s``
(per stage and ZeRO stage, quickstart width, recipe precision), and on a GPU ``mfu_vae``,
``mfu_dit`` (bf16, the best ZeRO stage at the largest size) and ``peak_mem_gib_per_rank``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"vae": ["recipes/quickstart.yaml"], "dit": ["recipes/quickstart.yaml", "recipes/quickstart_ldm.yaml"]}
N_GENES = 1000  # `scldm-scale prepare synthetic ... --genes 1000` of the quickstart
LABEL_CARDINALITIES = [8, 4, 6]  # cell_type, tissue, donor of the synthetic atlas
EXPRESSED = (100, 200)  # expressed genes per cell, uniform: ~150 of 1,000
WIDTH_MULT = 4
STATE_ONLY_BATCH = 2  # cells per rank of the runs that only measure state bytes


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# ZeRO formulas


def formula_bytes(params: int, world: int, zero: int, precision: str) -> float:
    """Model-state bytes per rank (parameters + gradients + master weights + Adam moments)."""
    if precision == "fp32":
        b_param = b_grad = 4
        k = 8 if zero == 0 else 12
    else:  # bf16 / fp16: the ZeRO paper
        b_param = b_grad = 2
        k = 12
    p, n = float(params), float(world)
    if zero == 0:
        return (b_param + b_grad + k) * p
    if zero == 1:
        return (b_param + b_grad) * p + k * p / n
    if zero == 2:
        return b_param * p + (b_grad + k) * p / n
    return (b_param + b_grad + k) * p / n


FORMULA_TEXT = {
    "bf16": {0: "16P", 1: "4P+12P/N", 2: "2P+14P/N", 3: "16P/N"},
    "fp32": {0: "16P", 1: "8P+12P/N", 2: "4P+16P/N", 3: "20P/N"},
}


# ---------------------------------------------------------------------------------------------
# per-rank bytes actually held by the engine

CATEGORIES = ("params", "grads", "master", "optim", "buffers")


def _walk(obj: Any, path: str, out: list, seen: set, depth: int = 0) -> None:
    import torch

    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        ds_tensor = getattr(obj, "ds_tensor", None)
        if isinstance(ds_tensor, torch.Tensor):
            out.append((path + ".ds_tensor", ds_tensor))
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{path}[{key if isinstance(key, (str, int)) else type(key).__name__}]", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, f"{path}[{i}]", out, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) \
            and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        for key, value in vars(obj).items():
            _walk(value, f"{path}.{key}", out, seen, depth + 1)


def _category(path: str, is_model_param: bool) -> str:
    if is_model_param:
        return "params"
    if ".state[" in path:
        return "optim"
    if re.search(r"ipg|bucket", path):
        return "buffers"
    if path.endswith(".grad") or re.search(r"grad", path.rsplit(".", 1)[-1], re.I):
        return "grads"
    if re.search(r"param_groups|fp32|master", path):
        return "master"
    if re.search(r"bit16|fp16_groups|persistent_parameters|ds_tensor", path):
        return "params"
    return "buffers"


def state_bytes(engine) -> dict[str, int]:
    """Bytes of the storages held by this rank's engine, by category (each storage counted once)."""
    import torch

    found: list = []
    model_storages = set()
    for name, p in engine.module.named_parameters():
        found.append((f"module.{name}", p))
        model_storages.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            found.append((f"module.{name}.grad", p.grad))
        ds_tensor = getattr(p, "ds_tensor", None)
        if isinstance(ds_tensor, torch.Tensor):
            found.append((f"module.{name}.ds_tensor", ds_tensor))
            model_storages.add(ds_tensor.untyped_storage().data_ptr())
    _walk(engine.optimizer, "opt", found, set())
    totals = dict.fromkeys(CATEGORIES, 0)
    counted = set()
    for path, tensor in found:
        try:
            storage = tensor.untyped_storage()
        except Exception:  # noqa: BLE001 - meta / sparse tensors
            continue
        key = storage.data_ptr()
        if key == 0 or key in counted:
            continue
        counted.add(key)
        totals[_category(path, key in model_storages)] += storage.nbytes()
    return totals


# ---------------------------------------------------------------------------------------------
# synthetic batches and losses, as the stages compute them


def vae_batches(n_cells: int, max_genes: int, seed: int, count: int = 4) -> list[dict]:
    """Packed token batches (what the VAE stage trains on) of synthetic cells."""
    import numpy as np
    import scipy.sparse

    from scldm_scale.data.tokenize import tokenize_counts

    rng = np.random.default_rng(seed)
    batches = []
    for j in range(count):
        lengths = rng.integers(EXPRESSED[0], EXPRESSED[1] + 1, n_cells)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.concatenate([np.sort(rng.choice(N_GENES, k, replace=False)) for k in lengths])
        data = 1.0 + rng.geometric(0.4, indptr[-1]).astype(np.float32)
        x = scipy.sparse.csr_matrix((data, indices, indptr), shape=(n_cells, N_GENES))
        batches.append(tokenize_counts(x, np.arange(N_GENES), np.zeros((n_cells, 1)), max_genes,
                                       np.random.default_rng([seed, j]), pad=False))
    return batches


def dit_batches(n_cells: int, n_tokens: int, d_in: int, seed: int, count: int = 4) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"z_nmz": torch.randn(n_cells, n_tokens, d_in, generator=g),
             "labels_na": torch.stack([torch.randint(0, c, (n_cells,), generator=g) for c in LABEL_CARDINALITIES], 1)}
            for _ in range(count)]


class VAEStep:
    def __init__(self, cfg, model_cfg) -> None:
        from scldm_scale.config import DecodeGenes

        self.cfg, self.model_cfg = cfg, model_cfg
        self.mode = DecodeGenes(cfg.train.decode_genes)

    def loss(self, engine, batch, generator):
        from scldm_scale.train.vae_loss import decode_targets, token_packing, vae_loss

        tokens = token_packing(batch)
        targets = decode_targets(batch, tokens, self.model_cfg.n_genes, self.mode, int(self.cfg.train.n_zero_genes),
                                 generator)
        dtype = next(engine.module.parameters()).dtype
        out = engine(batch["gene_ids_t"], batch["counts_t"].to(dtype), tokens, targets["gene_ids"], targets["rows"])
        return vae_loss(out, targets, batch["library_size_n"], self.model_cfg.n_genes, float(self.cfg.train.kl_weight),
                        float(self.cfg.train.library_loss_weight))["loss"]

    def train_flops_per_cell(self, batch) -> float:
        """Forward + backward FLOPs per cell, as VAEStage.flops_per_cell."""
        from scldm_scale.nn.vae import vae_train_flops

        tokens = batch["gene_ids_t"].shape[0] / batch["length_n"].shape[0]
        return vae_train_flops(self.model_cfg, tokens, tokens + int(self.cfg.train.n_zero_genes))


class DiTStep:
    def __init__(self, cfg, model_cfg) -> None:
        from scldm_scale.flow.interpolant import TimeSampling

        self.model_cfg = model_cfg
        self.drop = [float(p) for p in cfg.flow.label_dropout]
        self.null = list(model_cfg.label_cardinalities)
        self.time_sampling = TimeSampling(cfg.flow.time_sampling)

    def loss(self, engine, batch, generator):
        from scldm_scale.flow.guidance import drop_labels
        from scldm_scale.flow.loss import flow_matching_loss

        labels = drop_labels(batch["labels_na"], self.drop, self.null, generator)
        dtype = next(engine.module.parameters()).dtype
        return flow_matching_loss(lambda x, t: engine(x.to(dtype), t.to(dtype), labels).float(),
                                  batch["z_nmz"].float(), generator, self.time_sampling)["loss"]

    def train_flops_per_cell(self, batch) -> float:  # noqa: ARG002
        from scldm_scale.nn.dit import dit_train_flops

        return dit_train_flops(self.model_cfg)


# ---------------------------------------------------------------------------------------------
# one configuration on every rank


@dataclass
class Job:
    model: str  # vae | dit
    size: str  # quickstart | 4x
    zero: int
    precision: str  # fp32 | bf16
    timed_steps: int  # 0: state bytes only
    warmup: int
    micro_batch: int = 0  # 0: the recipe's data.batch_size
    variant: str = ""  # "persist0": ZeRO-3 with stage3_param_persistence_threshold=0 (every parameter partitioned)


@dataclass
class Result:
    model: str
    size: str
    zero: int
    precision: str
    d_model: int
    params: int
    micro_batch: int
    world: int
    steps_per_s: float | None = None
    cells_per_s: float | None = None
    tflops_per_rank: float | None = None
    mfu: float | None = None
    state_bytes: int = 0  # max over ranks of params + grads + master + optim
    by_category: dict = field(default_factory=dict)  # rank with the most state
    buffer_bytes: int = 0
    formula_bytes: float = 0.0
    ratio: float = 0.0
    loss: float | None = None
    variant: str = ""
    peak_mem_gib_per_rank: list = field(default_factory=list)  # CUDA: torch.cuda.max_memory_allocated per rank


def build(job: Job, device):
    import torch

    from scldm_scale.config import derive, load_config
    from scldm_scale.nn.dit import DiT, DiTConfig
    from scldm_scale.nn.vae import ScVAE, VAEConfig
    from scldm_scale.config import typed_section

    overrides = [f"train.zero_stage={job.zero}", f"train.precision={job.precision}", "train.ema_decay=0",
                 "logging.wandb=false"]
    cfg = load_config([os.path.join(REPO, r) for r in RECIPES["vae"]], overrides)
    if job.size != "quickstart":
        cfg.vae.d_model = WIDTH_MULT * int(cfg.vae.d_model)
    derive(cfg, n_genes=N_GENES, label_cardinalities=LABEL_CARDINALITIES)
    # ZeRO-3 with every parameter partitioned (train.deepspeed keys merge into the generated section)
    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if job.variant == "persist0" else {}
    cfg.train.deepspeed = extra
    vae_cfg: VAEConfig = typed_section(cfg.vae, VAEConfig)
    if job.model == "dit":
        cfg = load_config([os.path.join(REPO, r) for r in RECIPES["dit"]], overrides)
        if job.size != "quickstart":
            cfg.dit.d_model = WIDTH_MULT * int(cfg.dit.d_model)
        cfg.train.deepspeed = extra
        derive(cfg, label_cardinalities=LABEL_CARDINALITIES, vae=typed_section(load_config(
            [os.path.join(REPO, r) for r in RECIPES["vae"]]).vae, VAEConfig))  # the quickstart VAE's latent shape
        model_cfg = typed_section(cfg.dit, DiTConfig)
        torch.manual_seed(int(cfg.run.seed))
        return cfg, model_cfg, DiT(model_cfg), DiTStep(cfg, model_cfg)
    torch.manual_seed(int(cfg.run.seed))
    return cfg, vae_cfg, ScVAE(vae_cfg), VAEStep(cfg, vae_cfg)


def run_job(job: Job, info, peak_tflops: float, batch_scale: int = 1) -> Result:
    import torch
    import torch.distributed as dist

    from scldm_scale.train.engine import build_engine

    cfg, model_cfg, model, step = build(job, info.device)
    params = sum(p.numel() for p in model.parameters())
    micro = job.micro_batch or int(cfg.data.batch_size) * batch_scale
    seed = 1000 * info.rank + 17
    if job.model == "vae":
        batches = vae_batches(micro, int(cfg.data.max_genes), seed)
    else:
        batches = dit_batches(micro, model_cfg.n_tokens, model_cfg.d_in, seed)
    batches = [{k: (v.to(info.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = build_engine(model, cfg, micro)
    generator = torch.Generator(device=info.device).manual_seed(seed)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)

    def one_step(i: int, measure: bool = False):
        loss = step.loss(engine, batches[i % len(batches)], generator)
        engine.backward(loss)
        held = state_bytes(engine) if measure else None
        engine.step()
        return loss, held

    warmup = max(1, job.warmup)  # Adam allocates its moments at the first step(): measure after one
    for i in range(warmup):
        one_step(i)
    loss, held = one_step(warmup, measure=True)
    res = Result(job.model, job.size, job.zero, job.precision, int(model_cfg.d_model), params, micro, info.world_size,
                 variant=job.variant)
    res.loss = float(loss.detach())
    if job.timed_steps:
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(job.timed_steps):
            one_step(warmup + 1 + i)
        sync()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        res.steps_per_s = job.timed_steps / elapsed
        res.cells_per_s = res.steps_per_s * micro * info.world_size
        flops = step.train_flops_per_cell(batches[0])
        res.tflops_per_rank = flops * res.cells_per_s / info.world_size / 1e12
        if peak_tflops > 0:
            res.mfu = flops * res.cells_per_s / (peak_tflops * 1e12 * info.world_size)
    peak_mem = torch.cuda.max_memory_allocated() if info.device.type == "cuda" else 0
    peaks: list = [None] * info.world_size
    dist.all_gather_object(peaks, peak_mem)
    res.peak_mem_gib_per_rank = [round(b / 2**30, 3) for b in peaks] if info.device.type == "cuda" else []
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, held)
    model_state = [sum(v for k, v in h.items() if k != "buffers") for h in everyone]
    worst = max(range(info.world_size), key=lambda r: model_state[r])
    res.state_bytes = model_state[worst]
    res.by_category = {k: v for k, v in everyone[worst].items() if k != "buffers"}
    res.buffer_bytes = max(h["buffers"] for h in everyone)
    res.formula_bytes = formula_bytes(params, info.world_size, job.zero, job.precision)
    res.ratio = res.state_bytes / res.formula_bytes
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    del engine, model, batches
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def plan(args, cuda: bool) -> list[Job]:
    timed_precision = "bf16" if cuda else "fp32"  # the recipe runs fp32 on CPU
    warmup, steps = args.warmup, args.steps
    jobs: list[Job] = []
    sizes = ["quickstart"] if args.quick else ["quickstart", "4x"]
    for size in sizes:
        for model in ("vae", "dit"):
            for zero in (0, 1, 2, 3):
                # timed in the recipe precision (which also gives its state bytes) ...
                jobs.append(Job(model, size, zero, timed_precision, steps, warmup))
                # ... and the state bytes in the other precision (bf16: the paper's formula); they do not
                # depend on the batch, so 2 cells per rank (bf16 matmuls are slow on CPUs without AMX)
                other = "fp32" if timed_precision == "bf16" else "bf16"
                jobs.append(Job(model, size, zero, other, 0, 1, STATE_ONLY_BATCH))
            # DeepSpeed keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on
            # every rank; with 0 every parameter is partitioned, the assumption of the paper's formula
            jobs.append(Job(model, size, 3, "bf16", 0, 1, STATE_ONLY_BATCH, "persist0"))
    if args.quick:  # the 4x width for ZeRO-3 only
        for model in ("vae", "dit"):
            jobs.append(Job(model, "4x", 3, timed_precision, max(2, steps // 2), 1))
            jobs.append(Job(model, "4x", 3, "fp32" if timed_precision == "bf16" else "bf16", 0, 1, STATE_ONLY_BATCH))
    return jobs


def worker(args) -> None:
    import torch

    from scldm_scale.comm import destroy as destroy_distributed
    from scldm_scale.train.engine import init_distributed
    from scldm_scale.train.metrics import detect_peak_tflops

    info = init_distributed()
    cuda = info.device.type == "cuda"
    peak = detect_peak_tflops() if cuda else 0.0
    results = []
    for job in plan(args, cuda):
        t = time.perf_counter()
        res = run_job(job, info, peak, args.batch_scale)
        results.append(asdict(res))
        if info.rank == 0:
            rate = f"{res.cells_per_s:8.1f} cells/s" if res.cells_per_s else "   (state only)"
            name = f"{job.model} {job.size:10s} {job.precision} zero{job.zero}{job.variant and '-' + job.variant}"
            log(f"{name}: {rate}  state {res.state_bytes / 2**20:7.2f} MiB/rank ({res.ratio:.2f} x formula)  "
                f"[{time.perf_counter() - t:.0f} s]")
    if info.rank == 0:
        meta = {"world": info.world_size, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "backend": "nccl" if cuda else "gloo", "torch": torch.__version__,
                "deepspeed": __import__("deepspeed").__version__, "peak_tflops": peak,
                "warmup": args.warmup, "steps": args.steps, "quick": args.quick, "batch_scale": args.batch_scale}
        with open(args.result, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh)
    destroy_distributed()


# ---------------------------------------------------------------------------------------------
# report


def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def report(data: dict) -> dict:
    meta, rows = data["meta"], data["results"]
    world = meta["world"]
    print(f"train_step benchmark: {world} ranks ({meta['backend']}, {meta['device']}), torch {meta['torch']}, "
          f"deepspeed {meta['deepspeed']}; warm-up {meta['warmup']}, {meta['steps']} timed steps"
          f"{' (quick)' if meta['quick'] else ''}")
    print()
    header = (f"{'model':5s} {'size':10s} {'d':>4s} {'params':>9s} {'prec':4s} {'zero':>4s} {'steps/s':>8s} "
              f"{'cells/s':>8s} {'TF/s/rk':>8s} {'state MiB/rk':>12s} {'formula':>8s} {'= MiB':>8s} {'ratio':>6s}  "
              f"{'params':>7s} {'grads':>7s} {'master':>7s} {'optim':>7s}  {'buffers':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        c = r["by_category"]
        timed = r["steps_per_s"] is not None
        steps = f"{r['steps_per_s']:.2f}" if timed else "-"
        cells = f"{r['cells_per_s']:.0f}" if timed else "-"
        tflops = f"{r['tflops_per_rank']:.4f}" if timed else "-"
        mfu = f"  mfu {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        if r.get("peak_mem_gib_per_rank"):
            mfu += f"  peak {max(r['peak_mem_gib_per_rank']):.2f} GiB/rank"
        zero = f"{r['zero']}{'p0' if r.get('variant') == 'persist0' else ''}"
        print(f"{r['model']:5s} {r['size']:10s} {r['d_model']:4d} {r['params']:9d} {r['precision']:4s} {zero:>4s} "
              f"{steps:>8s} {cells:>8s} {tflops:>8s} {mib(r['state_bytes']):>12s} "
              f"{FORMULA_TEXT[r['precision']][r['zero']]:>8s} {mib(r['formula_bytes']):>8s} {r['ratio']:6.2f}  "
              f"{mib(c['params']):>7s} {mib(c['grads']):>7s} {mib(c['master']):>7s} {mib(c['optim']):>7s}  "
              f"{mib(r['buffer_bytes']):>8s}{mfu}")
    print()
    print("state = parameters + gradients + fp32 master weights + Adam moments held by one rank (max over ranks),")
    print("between backward and step; buffers = communication buckets (not model state). P = parameters, N = ranks.")
    print("formula: ZeRO paper, mixed precision (bf16 rows); the same partitioning with 4-byte params/grads")
    print("(fp32 rows).")
    print("zero 3p0: ZeRO-3 with stage3_param_persistence_threshold=0 (DeepSpeed's default 1e5 keeps smaller")
    print("parameters whole on every rank). Rows without steps/s measure state only (2 cells per rank).")

    def pick(model, size, zero, precision):
        for r in rows:
            if (r["model"], r["size"], r["zero"], r["precision"], r.get("variant", "")) == (model, size, zero,
                                                                                              precision, ""):
                return r
        return None

    timed_precision = next(r["precision"] for r in rows if r["steps_per_s"] is not None)
    out: dict[str, Any] = {"world": world, "device": meta["device"]}
    largest = "4x" if any(r["size"] == "4x" for r in rows) else "quickstart"
    z3 = {m: pick(m, largest, 3, "bf16") for m in ("vae", "dit")}
    z3 = {m: r for m, r in z3.items() if r is not None}
    if z3:
        # the worse of the two models, bf16 (the formula's setting), the trainer's DeepSpeed settings
        out["zero3_state_bytes_vs_formula"] = round(max(r["ratio"] for r in z3.values()), 4)
        out["zero3_state_bytes_vs_formula_by_model"] = {m: round(r["ratio"], 4) for m, r in z3.items()}
        out["zero3_size"] = largest
    out["cells_per_s"] = {m: {f"zero{z}": round(r["cells_per_s"], 1) for z in range(4)
                              if (r := pick(m, "quickstart", z, timed_precision)) and r["cells_per_s"]}
                          for m in ("vae", "dit")}
    out["cells_per_s_4x"] = {m: {f"zero{z}": round(r["cells_per_s"], 1) for z in range(4)
                                 if (r := pick(m, "4x", z, timed_precision)) and r["cells_per_s"]}
                             for m in ("vae", "dit")}
    out["steps_per_s"] = {m: {f"zero{z}": round(r["steps_per_s"], 3) for z in range(4)
                              if (r := pick(m, "quickstart", z, timed_precision)) and r["steps_per_s"]}
                          for m in ("vae", "dit")}
    out["cells_per_s_precision"] = timed_precision
    out["state_bytes_vs_formula"] = {
        f"{r['model']}/{r['size']}/{r['precision']}/zero{r['zero']}{r.get('variant') and '-' + r['variant']}":
            round(r["ratio"], 4) for r in rows}
    out["params"] = {f"{r['model']}/{r['size']}": r["params"] for r in rows}
    mfu = {}
    for m in ("vae", "dit"):
        timed = [r for r in rows if r["model"] == m and r.get("mfu") is not None and r["size"] == largest]
        if timed:
            best = max(timed, key=lambda r: r["mfu"])
            mfu[m] = round(best["mfu"], 4)
            out[f"mfu_{m}"] = mfu[m]  # bf16 MFU of the stage (best ZeRO stage at the largest size)
            out.setdefault("peak_mem_gib_per_rank", {})[m] = best["peak_mem_gib_per_rank"]
    if mfu:
        out["mfu"] = mfu
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quickstart width (+ 4x for ZeRO-3), fewer steps")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 20, quick 5)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 3, quick 2)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="multiply the recipes' cells per rank of the timed runs (for MFU on a GPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if args.worker:
        sys.path.insert(0, REPO)
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.abspath(__file__), "--worker", "--result", result, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-scale", str(args.batch_scale)]
        cmd += ["--quick"] if args.quick else []
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        lines: list[str] = []
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # progress lines live; the launcher's and DeepSpeed's chatter kept for errors
            lines.append(line)
            if line.startswith("[bench]"):
                print(line, end="", file=sys.stderr, flush=True)
        if proc.wait() != 0 or not os.path.isfile(result):
            sys.stderr.write("".join(lines[-80:]))
            sys.exit(f"benchmark workers failed (exit {proc.returncode})")
        with open(result) as fh:
            data = json.load(fh)
    log(f"total {time.perf_counter() - t0:.0f} s")
    summary = report(data)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
