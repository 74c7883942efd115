"""Atlas-scale run: a million synthetic cells from several studies through the whole pipeline.

    python benchmarks/atlas.py                       # 1,000,000 cells, with the 100,000-cell reference
    python benchmarks/atlas.py --quick               # 100,000 cells, with a 10,000-cell reference
    python benchmarks/atlas.py --cells 3000 --ref-cells 0 --genes 500 --vae-steps 4 --dit-steps 4   # smoke run

For every atlas size (the reference first, then the main one) the stages run in a folder
``OUT/cells_<N>`` (``--out``, default ``.bench/atlas``), each through the CLI in its own process
tree:

1. ``studies``: ``scldm_scale.data.synthetic.write_synthetic_studies``: ``--studies`` raw input
   files (8) of ``--genes`` genes (20,000), about ``--genes-per-cell`` (500) expressed genes per
   cell, with differing cell-type mixes, sequencing depths, gene panels, batch effects, tissues
   and donors; counts in X, in ``.raw.X`` behind normalized X (as CELLxGENE files) or in
   ``layers['counts']``, cycling over the studies.
2. ``prepare_h5ad``: ``scldm-scale prepare h5ad`` -> h5ad shards of ``--shard-size`` cells, cells in a
   seeded global random order across the studies.
3. ``prepare_soma``: ``scldm-scale prepare soma`` -> one TileDB-SOMA experiment (same cell order).
4. ``mixing``: the batch study-mixing figure (:mod:`scldm_scale.data.mixing`): mean per-batch entropy
   of the cells' study relative to random batches, over ``--mixing-batches`` batches that the
   training sources yield (the VAE's SOMA source with its batch settings, and the h5ad source over
   the shards at the same batch size), next to the cells' input order (studies one after another).
5. ``train_vae``: the VAE from SOMA (``data.source=soma``), ``--vae-steps`` steps on ``--nproc`` ranks
   (``torchrun``, DeepSpeed ZeRO-2, gloo on CPU); a small model (``VAE_OVERRIDES``), with a fixed
   glibc mmap threshold (``VAE_ENV``: with the default its heap grows with the steps).
6. ``encode``: every cell through the trained encoder on ``--nproc`` ranks into one latent cache,
   read from the h5ad shards (``--encode-source h5ad``, default) or the SOMA experiment.
7. ``train_dit``: the latent DiT from the cache, ``--dit-steps`` steps on ``--nproc`` ranks.

Figures per stage: wall time (the process tree, start-up included), cells (stages 1-3, 6: every
cell; 4: cells drawn; 5, 7: steps x global batch), cells/s = cells / wall time (for training also
the steady rate, the median ``cells_per_s`` of the trainer's logged windows after the first), peak
RSS per process, disk size of the stage's output. Peak RSS is the kernel's high-water mark
(``VmHWM`` of ``/proc/<pid>/status``) of every process of the stage's tree (the launcher, each rank,
the children a rank forks), sampled every 0.2 s with psutil while the stage runs; the stage's figure is the
largest single process. ``RssAnon`` (anonymous memory, without memory-mapped files) is sampled too.

RSS growth: the memory-relevant stages (``train_vae``, ``encode``, ``train_dit``: the streaming
paths, whose memory must be bounded by batch and buffer sizes, not by the data) run at both sizes
with the same batch settings and steps; ``rss_growth`` is the largest ratio main / reference - 1
over them. ``prepare`` holds one input file in memory by design, so its RSS grows with the
largest study and is reported but not part of ``rss_growth``.

Caching: every finished stage writes a record (figures, fingerprint of its settings and those of
the stages it reads) to ``OUT/cells_<N>/stages.json``; a re-run reuses a stage whose record and
outputs are there and whose fingerprint matches, says so on stderr, and re-runs the stages that
read the output of a stage that ran. Logs of the commands: ``OUT/cells_<N>/logs/<stage>.log``. The table goes to stdout;
the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scldm_scale.io import write_json_atomic  # noqa: E402

LABELS = ("cell_type", "tissue", "donor")
LAYOUTS = ("X", "raw", "layer")  # cycled over the studies
STAGES = ("studies", "prepare_h5ad", "prepare_soma", "mixing", "train_vae", "encode", "train_dit")
MEMORY_STAGES = ("train_vae", "encode", "train_dit")  # the streaming stages: rss_growth is over these
TITLES = {"studies": "synthetic studies", "prepare_h5ad": "prepare h5ad", "prepare_soma": "prepare SOMA",
          "mixing": "study mixing", "train_vae": "train VAE (SOMA)", "encode": "encode", "train_dit": "train DiT"}
# a small set VAE and a small DiT: the run is about the data path at scale, not about model quality
VAE_RECIPES = ["quickstart"]
VAE_OVERRIDES = ["vae_preset=", "vae.d_model=32", "vae.n_heads=2", "vae.n_latent_tokens=8", "vae.d_latent=8",
                 "vae.n_encoder_layers=1", "vae.n_decoder_layers=1", "train.n_zero_genes=256"]
DIT_RECIPES = ["quickstart", "quickstart_ldm"]
DIT_OVERRIDES = ["dit_preset=dit-xs"]
# glibc's default (dynamic) mmap threshold lets the VAE trainer's heap keep the freed buffers of its
# variable-shape batches: its RSS grows with the steps (0.97 -> 1.43 GB over 85 steps and rising; the
# two ranks of one 200-step run ended 1.7 GB apart), which would hide any dependence on the data size.
# A fixed threshold returns large blocks to the system when they are freed: flat at 1.1 GB, at about
# half the training throughput (README_atlas.md).
VAE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SAMPLE_INTERVAL_S = 0.2


def log(msg: str) -> None:
    print(f"[atlas] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    """What the outputs of one atlas size depend on (its ``cells`` aside, the same for both sizes)."""

    cells: int
    genes: int = 20_000
    studies: int = 8
    genes_per_cell: float = 500.0
    shard_size: int = 10_000
    seed: int = 0
    nproc: int = 2
    vae_steps: int = 200
    vae_batch: int = 64  # cells per rank
    max_genes: int = 512
    dit_steps: int = 300
    dit_batch: int = 256  # latents per rank
    encode_batch: int = 256
    encode_source: str = "h5ad"
    mixing_batches: int = 200
    vae_overrides: list[str] = field(default_factory=lambda: list(VAE_OVERRIDES))
    vae_env: dict[str, str] = field(default_factory=lambda: dict(VAE_ENV))
    dit_overrides: list[str] = field(default_factory=lambda: list(DIT_OVERRIDES))

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's output depends on (besides the stages it reads)."""
        keys = {
            "studies": ("cells", "genes", "studies", "genes_per_cell", "seed"),
            "prepare_h5ad": ("shard_size", "seed"),
            "prepare_soma": ("seed",),
            "mixing": ("vae_batch", "max_genes", "mixing_batches", "seed"),
            "train_vae": ("nproc", "vae_steps", "vae_batch", "max_genes", "vae_overrides", "vae_env", "seed"),
            "encode": ("nproc", "encode_batch", "encode_source"),
            "train_dit": ("nproc", "dit_steps", "dit_batch", "dit_overrides", "seed"),
        }[stage]
        return {k: getattr(self, k) for k in keys}


NEEDS = {  # the stages whose outputs a stage reads
    "studies": (),
    "prepare_h5ad": ("studies",),
    "prepare_soma": ("studies",),
    "mixing": ("prepare_h5ad", "prepare_soma"),
    "train_vae": ("prepare_soma",),
    "encode": ("train_vae", "prepare_h5ad", "prepare_soma"),
    "train_dit": ("encode",),
}


class Paths:
    """Where the stages of one atlas size write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.studies = root / "studies"
        self.shards = root / "shards"
        self.soma = root / "atlas.soma"
        self.vae = root / "vae"
        self.latents = root / "vae" / "latents"
        self.ldm = root / "ldm"
        self.logs = root / "logs"
        self.mixing = root / "mixing.json"
        self.records = root / "stages.json"

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes (removed before it runs again)."""
        return {
            "studies": [self.studies], "prepare_h5ad": [self.shards], "prepare_soma": [self.soma],
            "mixing": [self.mixing],
            "train_vae": [self.vae], "encode": [self.latents], "train_dit": [self.ldm],
        }[stage]

    def done_marker(self, stage: str) -> Path:
        """A file a stage writes once it finished."""
        return {
            "studies": self.studies / f"study_{0:02d}.h5ad", "prepare_h5ad": self.shards / "metadata.json",
            "prepare_soma": self.soma / "metadata.json", "mixing": self.mixing,
            "train_vae": self.vae / "export" / "model.safetensors", "encode": self.latents / "manifest.json",
            "train_dit": self.ldm / "export" / "model.safetensors",
        }[stage]


def vae_overrides(s: Settings, p: Paths) -> list[str]:
    return [
        "run.name=vae", f"run.output_dir={p.root}", f"run.seed={s.seed}", "run.overwrite=true",
        "data.source=soma", f"data.path={p.soma}", f"data.label_columns=[{','.join(LABELS)}]",
        f"data.batch_size={s.vae_batch}", f"data.max_genes={s.max_genes}", "data.num_workers=0", f"data.seed={s.seed}",
        f"train.max_steps={s.vae_steps}", "train.ckpt_every=0", "train.log_every=10", "logging.progress=false",
        f"optim.warmup_steps={max(1, min(50, s.vae_steps // 5))}", *s.vae_overrides,
    ]


def dit_overrides(s: Settings, p: Paths) -> list[str]:
    return [
        "run.name=ldm", f"run.output_dir={p.root}", f"run.seed={s.seed}", "run.overwrite=true",
        f"ldm.vae_run={p.vae}", f"data.batch_size={s.dit_batch}", "data.num_workers=0",
        f"train.max_steps={s.dit_steps}", "train.ckpt_every=0", "train.log_every=10", "train.sample_every=0",
        "logging.progress=false", f"optim.warmup_steps={max(1, min(100, s.dit_steps // 5))}", *s.dit_overrides,
    ]


def encode_overrides(s: Settings, p: Paths) -> list[str]:
    if s.encode_source == "h5ad":
        return ["data.source=h5ad", f"data.path={p.shards}"]
    return ["data.source=soma", f"data.path={p.soma}"]


def _cli(nproc: int, args: list[str]) -> list[str]:
    from scldm_scale.demo import torchrun

    return torchrun(nproc, args)


def stage_command(stage: str, s: Settings, p: Paths) -> list[str]:
    py = sys.executable
    if stage == "studies":
        call = (f"from scldm_scale.data.synthetic import write_synthetic_studies; "
                f"write_synthetic_studies({str(p.studies)!r}, n_cells={s.cells}, n_genes={s.genes}, "
                f"n_studies={s.studies}, genes_per_cell={s.genes_per_cell}, layouts={LAYOUTS!r}, seed={s.seed}, "
                f"progress=False, overwrite=True)")
        return [py, "-c", call]
    if stage in ("prepare_h5ad", "prepare_soma"):
        kind, out = ("h5ad", p.shards) if stage == "prepare_h5ad" else ("soma", p.soma)
        extra = ["--shard-size", str(s.shard_size)] if kind == "h5ad" else []
        return _cli(1, ["prepare", kind, str(p.studies), str(out), "--labels", *LABELS, *extra,
                        "--seed", str(s.seed), "--overwrite", "--quiet"])
    if stage == "mixing":
        return [py, str(Path(__file__).resolve()), "--mixing-child", str(p.root)]
    if stage == "train_vae":
        return _cli(s.nproc, ["train", *VAE_RECIPES, *vae_overrides(s, p)])
    if stage == "encode":
        return _cli(s.nproc, ["encode", "--vae-run", str(p.vae), "--out", str(p.latents),
                              "--batch-size", str(s.encode_batch), "--quiet", *encode_overrides(s, p)])
    if stage == "train_dit":
        return _cli(s.nproc, ["train", *DIT_RECIPES, *dit_overrides(s, p)])
    raise ValueError(stage)


# ---------------------------------------------------------------------------------------------
# measuring a process tree


def proc_status(pid: int) -> dict[str, int] | None:
    """``VmHWM``, ``VmRSS``, ``RssAnon`` and ``RssFile`` (kB) of a process; None once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return out


class TreeMonitor(threading.Thread):
    """Samples every process of the tree under ``root_pid``: peak RSS (``VmHWM``), peak ``RssAnon``,
    its role (``launcher``/``main``, ``rank R``, ``rank R child``, ``child``) and the load average."""

    def __init__(self, root_pid: int, launcher: bool, interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.launcher, self.interval = root_pid, launcher, interval
        self.procs: dict[int, dict[str, Any]] = {}
        self.loads: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_load = 0.0
        while not self._stop_event.is_set():
            self.sample()
            if time.monotonic() - last_load >= 5.0:
                self.loads.append(os.getloadavg()[0])
                last_load = time.monotonic()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            status = proc_status(proc.pid)
            if status is None:
                continue
            rec = self.procs.get(proc.pid)
            if rec is None:
                rec = self.procs[proc.pid] = {"pid": proc.pid, "role": "child", "peak_rss_kb": 0, "peak_anon_kb": 0}
            if rec["role"] == "child":  # until it is known: a rank is a plain child until its exec sets RANK
                rec["role"] = self._role(proc)
            rec["peak_rss_kb"] = max(rec["peak_rss_kb"], status.get("VmHWM", 0), status.get("VmRSS", 0))
            rec["peak_anon_kb"] = max(rec["peak_anon_kb"], status.get("RssAnon", 0))

    def _role(self, proc) -> str:
        import psutil

        if proc.pid == self.root_pid:
            return "launcher" if self.launcher else "main"
        try:
            rank = proc.environ().get("RANK")
            parent = proc.parent()
            parent_rank = parent.environ().get("RANK") if parent is not None else None
        except psutil.Error:
            return "child"
        if rank is None:
            return "child"
        return f"rank {rank} child" if parent_rank is not None else f"rank {rank}"

    def summary(self) -> dict[str, Any]:
        """Per process (largest first) and the stage's figures."""
        procs = sorted(self.procs.values(), key=lambda r: -r["peak_rss_kb"])
        rows = [{"role": r["role"], "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
                 "peak_anon_mb": round(r["peak_anon_kb"] / 1024, 1)} for r in procs]
        ranks = [r for r in rows if r["role"].startswith("rank") and "child" not in r["role"]] or \
            [r for r in rows if r["role"] == "main"]
        return {
            "processes": rows,
            "peak_rss_mb": max((r["peak_rss_mb"] for r in rows), default=None),
            "rank_peak_rss_mb": max((r["peak_rss_mb"] for r in ranks), default=None),
            "rank_peak_anon_mb": max((r["peak_anon_mb"] for r in ranks), default=None),
            "load_avg": round(sum(self.loads) / len(self.loads), 2) if self.loads else round(os.getloadavg()[0], 2),
        }


def run_measured(cmd: list[str], logfile: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` (output appended to ``logfile``) while sampling its process tree; raises on failure."""
    launcher = "torch.distributed.run" in cmd
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        monitor = TreeMonitor(proc.pid, launcher)
        monitor.start()
        try:
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
        finally:
            monitor.stop()
        wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"stage failed (exit {rc}): {shlex.join(cmd)}\n{tail}")
    return {"wall_s": round(wall, 1), **monitor.summary()}


def disk_bytes(paths: list[Path]) -> int:
    """Bytes allocated on disk by the files under ``paths``."""
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_blocks * 512
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    pass
    return total


# ---------------------------------------------------------------------------------------------
# per-stage figures


def steady_cells_per_s(run_dir: Path) -> float | None:
    """Median ``cells_per_s`` of the trainer's logged windows after the first (start-up excluded)."""
    import numpy as np

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [json.loads(line).get("cells_per_s") for line in path.read_text().splitlines() if line.strip()]
    rates = [r for r in rates if r is not None]
    rates = rates[1:] if len(rates) > 1 else rates
    return round(float(np.median(rates)), 1) if rates else None


def stage_cells(stage: str, s: Settings, p: Paths, extra: dict[str, Any]) -> int:
    if stage in ("studies", "prepare_h5ad", "prepare_soma"):
        return s.cells
    if stage == "mixing":
        return int(extra.get("cells_read", 0))
    if stage == "train_vae":
        return s.vae_steps * s.vae_batch * s.nproc
    if stage == "encode":
        return int(json.loads((p.latents / "manifest.json").read_text())["n_cells"])
    if stage == "train_dit":
        return s.dit_steps * s.dit_batch * s.nproc
    raise ValueError(stage)


def stage_disk(stage: str, p: Paths) -> int:
    if stage == "train_vae":  # the run without its latent cache
        return disk_bytes([c for c in p.vae.iterdir() if c.name != "latents"]) if p.vae.is_dir() else 0
    return disk_bytes(p.outputs(stage))


# ---------------------------------------------------------------------------------------------
# one atlas size


def fingerprint(stage: str, s: Settings, records: dict[str, dict]) -> str:
    payload = {"stage": stage, "settings": s.stage_settings(stage),
               "needs": {n: records.get(n, {}).get("fingerprint") for n in NEEDS[stage]}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_size(s: Settings, out: Path, env: dict[str, str]) -> dict[str, dict]:
    """Run (or reuse) the stages of one atlas size; returns ``{stage: record}``."""
    p = Paths(out / f"cells_{s.cells}")
    p.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p.root / "settings.json", asdict(s))  # what the mixing child reads
    records: dict[str, dict] = json.loads(p.records.read_text()) if p.records.is_file() else {}
    ran: set[str] = set()
    for stage in STAGES:
        fp = fingerprint(stage, s, records)
        rec = records.get(stage)
        marker = p.done_marker(stage)
        upstream_ran = any(n in ran for n in NEEDS[stage])
        if rec and rec.get("fingerprint") == fp and not upstream_ran and marker.is_file():
            log(f"{s.cells:,} cells: {stage}: reused ({rec['wall_s']:.0f} s, {rec['cells_per_s']:,.0f} cells/s, "
                f"measured {rec['finished']}; outputs in {p.root})")
            continue
        why = ("not run yet" if not rec else "an input stage ran again" if upstream_ran
               else "settings changed" if rec.get("fingerprint") != fp else "outputs missing")
        for path in p.outputs(stage):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        cmd = stage_command(stage, s, p)
        stage_env = s.vae_env if stage == "train_vae" else {}
        log(f"{s.cells:,} cells: {stage} ({why}): {''.join(f'{k}={v} ' for k, v in stage_env.items())}"
            f"{shlex.join(cmd)}")
        res = run_measured(cmd, p.logs / f"{stage}.log", {**env, **stage_env})
        extra: dict[str, Any] = {}
        if stage == "mixing":
            extra = json.loads(p.mixing.read_text())
        cells = stage_cells(stage, s, p, extra)
        rec = {"fingerprint": fp, "cells": cells, **res, "cells_per_s": round(cells / max(res["wall_s"], 1e-9), 1),
               "disk_bytes": stage_disk(stage, p), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        if stage in ("train_vae", "train_dit"):
            rec["steady_cells_per_s"] = steady_cells_per_s(p.vae if stage == "train_vae" else p.ldm)
        records[stage] = rec
        ran.add(stage)
        write_json_atomic(p.records, records)
        log(f"{s.cells:,} cells: {stage}: {rec['wall_s']:.0f} s, {rec['cells_per_s']:,.0f} cells/s, "
            f"peak RSS {rec['peak_rss_mb']:,.0f} MB, load {rec['load_avg']:.1f}")
    return records


# ---------------------------------------------------------------------------------------------
# the study-mixing figure (a child process: ``--mixing-child SIZE_DIR``)


def mixing_child(root: Path) -> None:
    """Study mixing of the batches the training sources yield; writes ``ROOT/mixing.json``."""
    import numpy as np

    from scldm_scale.config import apply_overrides, load_config, to_object
    from scldm_scale.data.loader import build_source
    from scldm_scale.data.mixing import source_study_mixing, study_mixing, study_of_cells

    s = Settings(**json.loads((root / "settings.json").read_text()))
    p = Paths(root)
    cfg = to_object(load_config(VAE_RECIPES, vae_overrides(s, p)))  # the VAE's own data section
    study_n = study_of_cells(p.shards)
    out: dict[str, Any] = {"mixing_batches": s.mixing_batches, "mixing_batch_size": int(cfg.data.batch_size)}
    t0 = time.perf_counter()
    for name, overrides in (("soma", []), ("h5ad", ["data.source=h5ad", f"data.path={p.shards}"])):
        source = build_source(apply_overrides(cfg, overrides).data)
        out[f"study_mixing_{name}"] = round(source_study_mixing(source.batches(0), study_n, s.mixing_batches,
                                                                seed=s.seed), 4)
    out["mixing_read_s"] = round(time.perf_counter() - t0, 1)
    out["cells_read"] = 2 * s.mixing_batches * int(cfg.data.batch_size)
    # the cells as they come: the studies one after another, cut into batches of the same size
    b = int(cfg.data.batch_size)
    in_order = np.sort(study_n[study_n >= 0])
    batches = [in_order[a: a + b] for a in range(0, len(in_order) - b + 1, max(b, len(in_order) // s.mixing_batches))]
    out["study_mixing_input_order"] = round(study_mixing(batches[: s.mixing_batches], study_n[study_n >= 0],
                                                         seed=s.seed), 4)
    write_json_atomic(p.mixing, out)


# ---------------------------------------------------------------------------------------------
# report


def _mb(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, k in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def atlas_meta(p: Paths) -> dict[str, Any] | None:
    """What ``prepare`` wrote about the atlas: cells, genes, expressed genes per cell, the studies."""
    path = p.shards / "metadata.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {"cells": meta["n_cells"], "genes": meta["n_genes"],
            "genes_per_cell": round(meta["nnz"] / max(meta["n_cells"], 1), 1),
            "studies": [{"cells": i["n_cells"], "genes": i["n_genes"], "counts_from": i["counts_from"]}
                        for i in meta["inputs"]]}


def format_stage_table(cells: int, records: dict[str, dict], meta: dict[str, Any] | None) -> str:
    head = (f"{'stage':<18} {'cells':>10} {'wall s':>8} {'cells/s':>9} {'steady':>8} {'peak RSS MB':>11} "
            f"{'anon MB':>8} {'disk':>9}  load  processes (peak RSS MB)")
    lines = [f"\n{cells:,} cells", head]
    if meta is not None:
        studies = ", ".join(f"{st['cells']:,} ({st['counts_from']}, {st['genes']:,} genes)" for st in meta["studies"])
        lines[0] += (f" x {meta['genes']:,} genes, {meta['genes_per_cell']:.0f} expressed genes per cell on average; "
                     f"{len(meta['studies'])} studies (cells, counts in, panel): {studies}")
    for stage in STAGES:
        r = records.get(stage)
        if r is None:
            continue
        procs = ", ".join(f"{x['role']} {x['peak_rss_mb']:,.0f}" for x in r["processes"][:5])
        lines.append(
            f"{TITLES[stage]:<18} {r['cells']:>10,} {r['wall_s']:>8,.0f} {r['cells_per_s']:>9,.0f} "
            f"{_mb(r.get('steady_cells_per_s')):>8} {_mb(r['peak_rss_mb']):>11} {_mb(r.get('rank_peak_anon_mb')):>8} "
            f"{_size(r['disk_bytes']):>9}  {r['load_avg']:>4.1f}  {procs}")
    return "\n".join(lines)


def rss_growth(main: dict[str, dict], ref: dict[str, dict] | None) -> dict[str, float | None]:
    """``{stage: main peak / reference peak - 1}`` per stage measured at both sizes."""
    if not ref:
        return {}
    return {st: round(main[st]["peak_rss_mb"] / ref[st]["peak_rss_mb"] - 1.0, 4)
            for st in STAGES if st in main and st in ref and ref[st].get("peak_rss_mb")}


def buffer_cells(s: Settings) -> dict[str, int]:
    """Cells the streaming sources hold at most, whatever the data size: SOMA, two super-buffers of
    ``READ_LANES`` shuffle buffers; h5ad, ``max_cache_size`` shards."""
    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.soma_source import READ_LANES

    d = DataConfig()
    return {"soma": 2 * READ_LANES * d.shuffle_buffer, "h5ad": d.max_cache_size * s.shard_size}


def format_growth_table(main_cells: int, ref_cells: int, main: dict, ref: dict, growth: dict,
                        buffers: dict[str, int]) -> str:
    lines = [f"\npeak RSS of the largest process, {ref_cells:,} vs {main_cells:,} cells "
             "(same batch settings and steps)",
             f"{'stage':<18} {ref_cells:>12,} {main_cells:>12,} {'growth':>8}"]
    if ref_cells < max(buffers.values()):
        lines.insert(1, f"note: the reference holds fewer cells than the sources' buffers ({buffers['soma']:,} SOMA, "
                        f"{buffers['h5ad']:,} h5ad): the growth includes the buffers filling up")
    for st, g in growth.items():
        note = "" if st in MEMORY_STAGES else "  (holds one input file: grows with the largest study)"
        if st == "mixing":
            note = "  (both sources' buffers and every cell's study id in one process)"
        lines.append(f"{TITLES[st]:<18} {ref[st]['peak_rss_mb']:>12,.0f} {main[st]['peak_rss_mb']:>12,.0f} "
                     f"{g:>+8.1%}{note}")
    return "\n".join(lines)


def summary(s: Settings, main: dict[str, dict], ref: dict[str, dict] | None, ref_cells: int) -> dict[str, Any]:
    growth = rss_growth(main, ref)
    mem = [growth[st] for st in MEMORY_STAGES if st in growth]
    out: dict[str, Any] = {
        "cells": s.cells, "genes": s.genes, "studies": s.studies, "nproc": s.nproc, "ref_cells": ref_cells or None,
        "study_mixing": main.get("mixing", {}).get("study_mixing_soma"),
        "study_mixing_h5ad": main.get("mixing", {}).get("study_mixing_h5ad"),
        "study_mixing_input_order": main.get("mixing", {}).get("study_mixing_input_order"),
        "rss_growth": max(mem) if mem else None,
    }
    for st in STAGES:
        r = main.get(st)
        if r is None:
            continue
        out[f"{st}_cells_per_s"] = r["cells_per_s"]
        out[f"{st}_peak_rss_mb"] = r["peak_rss_mb"]
        out[f"{st}_wall_s"] = r["wall_s"]
        if r.get("steady_cells_per_s") is not None:
            out[f"{st}_steady_cells_per_s"] = r["steady_cells_per_s"]
        if st in growth:
            out[f"{st}_rss_growth"] = growth[st]
    out["wall_s"] = round(sum(r["wall_s"] for r in main.values()), 1)
    out["disk_gb"] = round(sum(r["disk_bytes"] for r in main.values()) / (1 << 30), 2)
    out["load_avg"] = round(sum(r["load_avg"] * r["wall_s"] for r in main.values()) / max(out["wall_s"], 1e-9), 2)
    return out


# ---------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100,000 cells with a 10,000-cell reference")
    p.add_argument("--cells", type=int, help="cells of the atlas (default 1,000,000; 100,000 with --quick)")
    p.add_argument("--ref-cells", type=int,
                   help="cells of the reference atlas for the RSS growth (default cells / 10; 0 = none)")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "atlas",
                   help="work directory; finished stages are reused (default .bench/atlas)")
    d = Settings(cells=0)
    p.add_argument("--genes", type=int, default=d.genes, help=f"genes of the atlas (default {d.genes})")
    p.add_argument("--studies", type=int, default=d.studies, help=f"input studies (default {d.studies})")
    p.add_argument("--genes-per-cell", type=float, default=d.genes_per_cell,
                   help=f"mean expressed genes per cell (default {d.genes_per_cell:g})")
    p.add_argument("--shard-size", type=int, default=d.shard_size,
                   help=f"cells per h5ad shard (default {d.shard_size})")
    p.add_argument("--nproc", type=int, default=d.nproc, help=f"ranks of train and encode (default {d.nproc})")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help=f"VAE steps (default {d.vae_steps})")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch, help=f"VAE cells per rank (default {d.vae_batch})")
    p.add_argument("--max-genes", type=int, default=d.max_genes, help=f"data.max_genes (default {d.max_genes})")
    p.add_argument("--dit-steps", type=int, default=d.dit_steps, help=f"DiT steps (default {d.dit_steps})")
    p.add_argument("--dit-batch", type=int, default=d.dit_batch, help=f"DiT latents per rank (default {d.dit_batch})")
    p.add_argument("--encode-batch", type=int, default=d.encode_batch, help=f"encode batch (default {d.encode_batch})")
    p.add_argument("--encode-source", choices=("h5ad", "soma"), default=d.encode_source,
                   help="what encode reads: the h5ad shards or the SOMA experiment (default h5ad)")
    p.add_argument("--mixing-batches", type=int, default=d.mixing_batches,
                   help=f"batches per study-mixing figure (default {d.mixing_batches})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mixing-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mixing_child is not None:
        mixing_child(args.mixing_child)
        return 0

    cells = args.cells or (100_000 if args.quick else 1_000_000)
    ref_cells = cells // 10 if args.ref_cells is None else args.ref_cells
    if ref_cells and ref_cells >= cells:
        p.error(f"--ref-cells {ref_cells} must be smaller than --cells {cells} (or 0 for no reference)")
    for name in ("genes", "studies", "shard_size", "nproc", "vae_steps", "vae_batch", "dit_steps", "dit_batch",
                 "encode_batch", "mixing_batches", "max_genes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    common = {k: getattr(args, k) for k in ("genes", "studies", "genes_per_cell", "shard_size", "seed", "nproc",
                                            "vae_steps", "vae_batch", "max_genes", "dit_steps", "dit_batch",
                                            "encode_batch", "encode_source", "mixing_batches")}
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[int, dict[str, dict]] = {}
    for n in ([ref_cells] if ref_cells else []) + [cells]:
        s = Settings(cells=n, **common)
        log(f"atlas of {n:,} cells x {s.genes:,} genes from {s.studies} studies in {out / f'cells_{n}'}")
        results[n] = run_size(s, out, env)
    main_s = Settings(cells=cells, **common)
    main_rec, ref_rec = results[cells], results.get(ref_cells)
    growth = rss_growth(main_rec, ref_rec)
    for n, recs in sorted(results.items()):
        print(format_stage_table(n, recs, atlas_meta(Paths(out / f"cells_{n}"))))
    mix = main_rec["mixing"]
    print(f"\nstudy mixing ({cells:,} cells; mean per-batch entropy of the study / random batches, "
          f"{mix['mixing_batches']} batches of {mix['mixing_batch_size']}): "
          f"SOMA source {mix['study_mixing_soma']:.3f}, "
          f"h5ad source {mix['study_mixing_h5ad']:.3f}; the input order (studies one after another) "
          f"{mix['study_mixing_input_order']:.3f}")
    if ref_rec:
        print(format_growth_table(cells, ref_cells, main_rec, ref_rec, growth, buffer_cells(main_s)))
    res = summary(main_s, main_rec, ref_rec, ref_cells)
    meta = atlas_meta(Paths(out / f"cells_{cells}"))
    if meta is not None:
        res["expressed_genes_per_cell"] = meta["genes_per_cell"]
    (out / f"results_{cells}.json").write_text(json.dumps({"summary": res, "stages": results}, indent=1))
    print(f"\n{cells:,} cells: stage wall time {res['wall_s']:.0f} s in all, mean 1-min load {res['load_avg']:.1f} on "
          f"{os.cpu_count()} cores; this invocation {time.perf_counter() - t0:.0f} s (reused stages not counted); "
          f"disk {res['disk_gb']:.1f} GB")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
