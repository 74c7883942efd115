"""Real-data generation benchmark: scldm-scale vs scVI vs baselines on held-out cells.

    python benchmarks/generation.py                      # pbmc3k and paul15 from ../shared/data
    python benchmarks/generation.py --quick              # trimmed budget, a smoke run
    python benchmarks/generation.py --data my.h5ad --label louvain   # any raw-count .h5ad

For every dataset (raw integer counts in X, a label column in obs):

1. Split: a fixed 80/20 train / held-out split, stratified by label, seeded (``--seed``). Cells
   without counts are dropped first.
2. Genes: the top ``--n-hvg`` (2,000) highly variable genes, ``seurat_v3`` on the raw counts of
   the TRAINING cells only; every method and the evaluation use these genes. Cells left without
   counts on them are dropped (training and held-out alike).
3. Methods, all trained on the same training cells and asked for the same conditions:
   - ``ours``: the real CLI pipeline in a work directory: ``prepare h5ad`` -> ``train`` (VAE,
     ``recipes/quickstart.yaml`` + ``recipes/bench_generation.yaml``) -> ``encode`` -> ``train``
     (latent DiT, + ``recipes/quickstart_ldm.yaml`` + ``recipes/bench_generation_ldm.yaml``), each
     under ``torchrun --standalone --nproc_per_node=2`` (DeepSpeed ZeRO-2, gloo on CPU), then
     ``generate`` with the recipe's guidance and sampler;
   - ``scvi``: scVI (scvi-tools, extra ``bench``) with the label as its categorical covariate,
     generating from its prior (``scldm_scale.eval.scvi_baseline``);
   - ``independent``: every gene drawn independently from its per-label empirical distribution
     over the training cells (``scldm_scale.eval.baselines.independent_genes_baseline``);
   - ``real``: the real-vs-real noise floor.
4. Evaluation: the held-out cells are split into two random halves A and B. A is the reference;
   ``real`` is B; every generator makes as many cells as B with the label proportions of the
   whole held-out set (largest remainders). ``scldm_scale.eval.evaluate.compare`` fits one
   representation on A (normalize total, log1p, HVGs, 30 PCs: the defaults of
   ``scldm-scale evaluate``) and scores every set in it: W2, MMD, FD, 1-NN two-sample accuracy
   (0.5 is ideal) and the accuracy of a kNN label classifier trained on A (``knn_label_acc``).
5. Seed spread: each generator also samples with generation seeds ``seed+1 ... seed+K-1``
   (``--gen-seeds K``, default 4) from the same trained models, and a second table gives each
   metric's mean ± sd over the K sets, with a reference row ``train cells``: training cells drawn
   with the requested labels (``label_matched_cells``), what a generator reproducing the training
   distribution exactly would score, spread included.

Tables per dataset go to stdout (progress on stderr); the last line is one JSON object
``{dataset: {method: {"w2", "mmd", "fd", "nn1", "knn_label_acc"}}}`` (the first generation seed's
figures). Budgets, wall times, the full metric dicts and the seed spread are written to
``<out>/results.json``. ``--out DIR`` keeps the work directory
(finished stages are reused by a re-run with the same settings); without it a temporary directory
is used and removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATASETS = ("pbmc3k", "paul15")
METHODS = ("ours", "scvi", "independent", "real")
TRAIN_CELLS = "train cells"  # reference row of the seed-spread table: training cells with the requested labels
METRICS = {"w2": "w2", "mmd": "mmd", "fd": "fd", "nn1": "nn1"}  # JSON key -> compare() key
JSON_KEYS = (*METRICS, "knn_label_acc")  # per method in the JSON line
# table columns: key -> (header, format, width in the seed-0 table); var_ratio is in the tables only
COLUMNS = {"w2": ("W2", ".3f", 8), "mmd": ("MMD", ".4f", 9), "fd": ("FD", ".2f", 9), "nn1": ("1-NN", ".3f", 6),
           "knn_label_acc": ("kNN label", ".3f", 9), "var_ratio": ("var ratio", ".3f", 9)}
VAE_RECIPES = ["recipes/quickstart.yaml", "recipes/bench_generation.yaml"]
LDM_RECIPES = [*VAE_RECIPES, "recipes/quickstart_ldm.yaml", "recipes/bench_generation_ldm.yaml"]

# (VAE steps, DiT steps, scVI epochs); None = the recipe's value / scVI's default for the data size
BUDGETS = {"full": (None, None, None), "quick": (40, 100, 20)}
N_PCS = 30
EVAL_HVG = 2000


def log(msg: str) -> None:
    print(f"[generation] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data: split, genes


def stratified_split(labels, heldout_fraction: float = 0.2, seed: int = 0):
    """Boolean held-out mask: ``round(fraction * n_label)`` cells of every label, seeded.

    A label with a single cell stays in training (the model must know every label it is asked for).
    """
    import numpy as np

    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for lab in sorted(set(labels)):
        idx = np.flatnonzero(labels == lab)
        n_held = min(int(round(heldout_fraction * len(idx))), len(idx) - 1)
        if n_held > 0:
            mask[rng.permutation(idx)[:n_held]] = True
    return mask


def select_hvg(train, n_top: int) -> list[str]:
    """Top ``n_top`` highly variable genes of the training cells (``seurat_v3`` on raw counts, the
    definition ``evaluate`` uses)."""
    from scldm_scale.eval.representation import highly_variable_genes

    if n_top <= 0 or n_top >= train.n_vars:
        return list(train.var_names)
    return list(train.var_names[highly_variable_genes(train.X, n_top)])


def _gene_index(adata):
    """var index = Ensembl ids when a ``gene_ids``-like column holds them (what ``prepare`` keys on)."""
    import pandas as pd

    for col in ("gene_ids", "gene_id", "ensembl_id", "feature_id"):
        if col in adata.var.columns:
            ids = adata.var[col].astype(str)
            if ids.str.startswith("ENS").mean() >= 0.9 and ids.is_unique:
                return pd.Index(ids.to_numpy(), name=None)
    return pd.Index(adata.var_names.astype(str), name=None)


def prepare_dataset(path: Path, label: str, out: Path, heldout_fraction: float, n_hvg: int,
                    seed: int) -> dict:
    """Split and gene-select one dataset; write ``train.h5ad`` / ``heldout.h5ad`` under ``out``."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from scldm_scale.errors import ScldmError

    adata = ad.read_h5ad(path)
    if label not in adata.obs.columns:
        raise ScldmError(f"{path}: obs has no column {label!r}; pass --label with one of {list(adata.obs.columns)}")
    x = sp.csr_matrix(adata.X)
    if x.nnz and (x.data.min() < 0 or not np.allclose(x.data, np.round(x.data))):
        raise ScldmError(f"{path}: X must hold raw integer counts (found negative or non-integer values)")
    x.data = np.round(x.data).astype(np.int32)
    var = pd.DataFrame(index=_gene_index(adata))
    if not var.index.is_unique:
        raise ScldmError(f"{path}: gene ids are not unique; make var_names unique before benchmarking")
    obs = pd.DataFrame({label: adata.obs[label].astype(str).to_numpy()}, index=adata.obs_names.astype(str))
    full = ad.AnnData(X=x, obs=obs, var=var)
    n_in = full.n_obs
    full = full[np.asarray(full.X.sum(axis=1)).ravel() > 0].copy()
    held = stratified_split(full.obs[label].to_numpy(), heldout_fraction, seed)
    train, heldout = full[~held].copy(), full[held].copy()
    genes = select_hvg(train, n_hvg)
    train, heldout = train[:, genes].copy(), heldout[:, genes].copy()
    n_empty = 0
    for name in ("train", "heldout"):
        a = train if name == "train" else heldout
        ok = np.asarray(a.X.sum(axis=1)).ravel() > 0
        n_empty += int((~ok).sum())
        a = a[ok].copy()
        a.obs[label] = pd.Categorical(a.obs[label])
        a.write_h5ad(out / f"{name}.h5ad")
        if name == "train":
            train = a
        else:
            heldout = a
    return {"n_cells_in": n_in, "n_train": train.n_obs, "n_heldout": heldout.n_obs, "n_genes": len(genes),
            "n_genes_in": int(adata.n_vars), "n_dropped_empty": n_in - full.n_obs + n_empty,
            "labels": int(train.obs[label].nunique())}


# ---------------------------------------------------------------------------------------------
# methods


def _run(cmd: list[str], logfile: Path, env: dict, done: Path) -> None:
    log(f"$ {shlex.join(cmd)}   (log: {logfile})")
    with open(logfile, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 and done.is_file():
        # every stage writes its completion file last (atomically): the work is complete
        log(f"warning: exit status {proc.returncode} after {done.name} was written; continuing")
    elif proc.returncode != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"step failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")


def _cli(nproc: int, args: list[str]) -> list[str]:
    from scldm_scale.demo import torchrun

    return torchrun(nproc, args)


def generated_path(work: Path, method: str, gen_seed: int, seed: int) -> Path:
    """Where a method's cells for generation seed ``gen_seed`` are kept (the main seed's without a suffix)."""
    return work / (f"generated_{method}.h5ad" if gen_seed == seed else f"generated_{method}_seed{gen_seed}.h5ad")


def run_ours(work: Path, label: str, n_train: int, nproc: int, vae_steps, ldm_steps, conditions,
             seed: int, gen_seeds: list[int]) -> tuple[list, dict]:
    """prepare -> train VAE -> encode -> train DiT -> generate (once per seed in ``gen_seeds``, the
    first being ``seed``), through the CLI; returns ([AnnData per generation seed], info)."""
    import anndata as ad

    from scldm_scale.api import ScLDM
    from scldm_scale.io import write_h5ad_atomic

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    logfile = work / "ours.log"
    data = work / "shards"
    shard = max(64, math.ceil(n_train / 4))
    common = [f"data.path={data}", f"run.output_dir={work}", f"data.label_columns=[{label}]", f"run.seed={seed}"]
    vae_extra = [f"train.max_steps={vae_steps}"] if vae_steps else []
    ldm_extra = [f"train.max_steps={ldm_steps}"] if ldm_steps else []
    stages = [
        ("prepare", data / "metadata.json",
         _cli(1, ["prepare", "h5ad", str(work / "train.h5ad"), str(data), "--shard-size", str(shard),
                  "--labels", label, "--quiet"])),
        ("train VAE", work / "vae" / "export" / "model.safetensors",
         _cli(nproc, ["train", *VAE_RECIPES, "run.name=vae", *common, *vae_extra])),
        ("encode", work / "vae" / "latents" / "manifest.json",
         _cli(nproc, ["encode", "--vae-run", str(work / "vae"), "--quiet"])),
        ("train DiT", work / "ldm" / "export" / "model.safetensors",
         _cli(nproc, ["train", *LDM_RECIPES, "run.name=ldm", f"ldm.vae_run={work / 'vae'}", *common, *ldm_extra])),
    ]
    times_file = work / "ours_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    for name, done, cmd in stages:
        if done.is_file():
            log(f"ours: {name}: done ({done})")
            continue
        t0 = time.perf_counter()
        _run(cmd, logfile, env, done)
        times[name] = round(time.perf_counter() - t0, 1)
        times_file.write_text(json.dumps(times))
        log(f"ours: {name}: {times[name]:.0f} s")
    model = None
    for gen_seed in gen_seeds:
        out = generated_path(work, "ours", gen_seed, seed)
        if out.is_file():
            continue
        t0 = time.perf_counter()
        model = model or ScLDM.load(work / "ldm", device="cpu")
        write_h5ad_atomic(model.generate(conditions, seed=gen_seed), out)
        if gen_seed == seed:  # the budget counts one generation
            times["generate"] = round(time.perf_counter() - t0, 1)
            times_file.write_text(json.dumps(times))
    from omegaconf import OmegaConf

    cfg_vae = OmegaConf.load(work / "vae" / "config.yaml")
    cfg_ldm = OmegaConf.load(work / "ldm" / "config.yaml")
    info = {"vae_steps": int(cfg_vae.train.max_steps), "ldm_steps": int(cfg_ldm.train.max_steps),
            "vae_global_batch": int(cfg_vae.data.batch_size) * nproc,
            "ldm_global_batch": int(cfg_ldm.data.batch_size) * nproc, "nproc": nproc, "seconds": times}
    return [ad.read_h5ad(generated_path(work, "ours", s, seed)) for s in gen_seeds], info


def run_scvi(work: Path, train, label: str, conditions_obs, epochs, seed: int, threads: int,
             gen_seeds: list[int]) -> tuple[list, dict]:
    """Train scVI and generate once per seed in ``gen_seeds`` (the first being ``seed``); the cells
    and the budget are kept in ``work`` and reused by a re-run."""
    import anndata as ad

    from scldm_scale.eval.scvi_baseline import train_scvi

    outs, info_file = [generated_path(work, "scvi", s, seed) for s in gen_seeds], work / "scvi.json"
    if all(out.is_file() for out in outs) and info_file.is_file():
        log(f"scvi: done ({outs[0]})")
        return [ad.read_h5ad(out) for out in outs], json.loads(info_file.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = train_scvi(train, label, max_epochs=epochs, seed=seed, threads=threads)
        t0 = time.perf_counter()
        gens = [model.generate(conditions_obs, seed=seed)]
        seconds = round(time.perf_counter() - t0, 1)  # the budget counts one generation
        gens += [model.generate(conditions_obs, seed=s) for s in gen_seeds[1:]]
    info = {"epochs": model.epochs, "batch_size": 128, "threads": threads,
            "seconds": {"train": round(model.train_seconds, 1), "generate": seconds}}
    info["wall_s"] = round(sum(info["seconds"].values()), 1)
    for gen, out in zip(gens, outs):
        gen.write_h5ad(out)
    info_file.write_text(json.dumps(info))
    return gens, info


# ---------------------------------------------------------------------------------------------
# one dataset


def conditions_frame(conditions, label: str):
    import pandas as pd

    rows = [values[label] for values, n in conditions for _ in range(n)]
    return pd.DataFrame({label: pd.Categorical(rows)}, index=[f"c{i}" for i in range(len(rows))])


def bench_dataset(name: str, path: Path, label: str, root: Path, args, budget) -> dict:
    import anndata as ad

    from scldm_scale.eval.baselines import independent_genes_baseline, label_matched_cells, real_vs_real_split
    from scldm_scale.eval.evaluate import compare
    from scldm_scale.api import conditions_matching

    vae_steps, ldm_steps, scvi_epochs = budget
    settings = {"data": str(path.resolve()), "label": label, "seed": args.seed, "heldout": args.heldout_fraction,
                "n_hvg": args.n_hvg, "budget": list(budget), "nproc": args.nproc,
                "recipes": {r: hashlib.sha256((REPO / r).read_bytes()).hexdigest()[:12] for r in LDM_RECIPES}}
    work = root / name
    stamp = work / "settings.json"
    if work.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        log(f"{name}: settings changed, starting over in {work}")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings, indent=1))

    t_start = time.perf_counter()
    log(f"{name}: split {1 - args.heldout_fraction:.0%}/{args.heldout_fraction:.0%} (seed {args.seed}), "
        f"{args.n_hvg} HVGs on the training cells")
    data_info = prepare_dataset(path, label, work, args.heldout_fraction, args.n_hvg, args.seed)
    log(f"{name}: {data_info}")
    train = ad.read_h5ad(work / "train.h5ad")
    heldout = ad.read_h5ad(work / "heldout.h5ad")
    reference, real_b = real_vs_real_split(heldout, seed=args.seed)
    conditions = conditions_matching(heldout.obs, [label], n_cells=real_b.n_obs)
    cond_obs = conditions_frame(conditions, label)

    gen_seeds = [args.seed + k for k in range(args.gen_seeds)]
    draws, info = {}, {}  # method -> one generated AnnData per generation seed
    if "ours" in args.methods:
        log(f"{name}: ours (VAE + latent DiT through the CLI, {args.nproc} ranks)")
        draws["ours"], info["ours"] = run_ours(work, label, train.n_obs, args.nproc, vae_steps, ldm_steps,
                                               conditions, args.seed, gen_seeds)
        info["ours"]["wall_s"] = round(sum(info["ours"]["seconds"].values()), 1)
    if "scvi" in args.methods:
        log(f"{name}: scVI")
        draws["scvi"], info["scvi"] = run_scvi(work, train, label, cond_obs, scvi_epochs, args.seed,
                                               args.scvi_threads, gen_seeds)
    if "independent" in args.methods:
        draws["independent"] = [independent_genes_baseline(train, label, cond_obs, seed=s) for s in gen_seeds]
    if "real" in args.methods:
        draws["real"] = [real_b]
    if len(gen_seeds) > 1:
        draws[TRAIN_CELLS] = [label_matched_cells(train, label, cond_obs, seed=s) for s in gen_seeds]
    candidates = {_draw_key(m, k): gen for m, gens in draws.items() for k, gen in enumerate(gens)}
    log(f"{name}: evaluate {list(draws)} ({len(candidates)} sets) against {reference.n_obs} held-out reference cells")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scored = compare(reference, candidates, label_keys=[label], n_pcs=N_PCS, n_hvg=EVAL_HVG,
                         seed=args.seed, per_condition=False)
    results = {m: scored[m] for m in METHODS if m in draws}  # the first generation seed
    spread = {m: seed_spread([scored[_draw_key(m, k)] for k in range(len(gens))], label)
              for m, gens in draws.items() if len(gens) > 1}
    out = {"data": data_info, "n_reference": reference.n_obs, "n_generated": real_b.n_obs, "methods": info,
           "metrics": results, "gen_seeds": gen_seeds, "seed_spread": spread,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    (work / "results.json").write_text(json.dumps(out, indent=1, default=float))
    return out


def _draw_key(method: str, k: int) -> str:
    return method if k == 0 and method in METHODS else f"{method}@{k}"


def seed_spread(scores: list[dict], label: str) -> dict:
    """``{metric: {"mean", "sd", "values"}}`` of a method's results over its generation seeds."""
    import numpy as np

    out = {}
    rows = [metric_values(r, label) for r in scores]
    for key in COLUMNS:
        values = [row[key] for row in rows if row[key] is not None]
        if values:
            out[key] = {"mean": _num(np.mean(values)), "sd": _num(np.std(values, ddof=1) if len(values) > 1 else 0.0),
                        "values": [_num(v) for v in values]}
    return out


# ---------------------------------------------------------------------------------------------
# output


def metric_values(result: dict, label: str) -> dict:
    """The table's figures (``COLUMNS`` keys) from one ``compare`` result; None where missing."""
    values = {k: _num(result.get(src)) for k, src in METRICS.items()}
    values["knn_label_acc"] = _num(result.get(f"knn_acc/{label}"))
    values["var_ratio"] = _num(result.get("var_ratio"))
    return values


def summary(results: dict, label_of: dict) -> dict:
    """The JSON line: ``{dataset: {method: {JSON_KEYS}}}`` for the first generation seed."""
    out = {}
    for ds, res in results.items():
        out[ds] = {}
        for method in METHODS:
            m = res["metrics"].get(method)
            if m is None:
                continue
            values = metric_values(m, label_of[ds])
            out[ds][method] = {k: values[k] for k in JSON_KEYS}
    return out


def _num(v):
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def format_tables(results: dict, label_of: dict) -> str:
    lines = []
    for ds, res in results.items():
        d = res["data"]
        lines.append(f"\n{ds}: {d['n_train']} training / {d['n_heldout']} held-out cells x {d['n_genes']} genes, "
                     f"{d['labels']} labels; reference = {res['n_reference']} held-out cells, "
                     f"{res['n_generated']} cells per method; {N_PCS} PCs")
        lines.append(f"{'method':<12} " + " ".join(f"{h:>{w}}" for h, _, w in COLUMNS.values()) + "  budget")
        for method in METHODS:
            if method not in res["metrics"]:
                continue
            row = metric_values(res["metrics"][method], label_of[ds])
            budget = ""
            mi = res["methods"].get(method)
            if method == "ours" and mi:
                budget = (f"VAE {mi['vae_steps']} x {mi['vae_global_batch']}, DiT {mi['ldm_steps']} x "
                          f"{mi['ldm_global_batch']}, {mi['wall_s']:.0f} s")
            elif method == "scvi" and mi:
                budget = f"{mi['epochs']} epochs x batch {mi['batch_size']}, {mi['wall_s']:.0f} s"
            cells = [format("-" if row[k] is None else format(row[k], spec), f">{w}")
                     for k, (_, spec, w) in COLUMNS.items()]
            lines.append(f"{method:<12} " + " ".join(cells) + f"  {budget}")
        spread = res.get("seed_spread") or {}
        if spread:
            seeds = res["gen_seeds"]
            lines.append(f"\nover generation seeds {seeds[0]}-{seeds[-1]} of the same trained models, mean ± sd "
                         f"('{TRAIN_CELLS}': training cells drawn with the requested labels, one draw per seed)")
            lines.append(f"{'method':<12} " + " ".join(f"{h:>17}" for h, _, _ in COLUMNS.values()))
            for method, row in spread.items():
                cells = [f"{format(row[k]['mean'], sp)} ± {format(row[k]['sd'], sp)}" if k in row else "-"
                         for k, (_, sp, _) in COLUMNS.items()]
                lines.append(f"{method:<12} " + " ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", type=Path,
                   help="a raw-count .h5ad (repeatable); default: pbmc3k and paul15 from ../shared/data")
    p.add_argument("--label", default="cell_type", help="obs column with the labels to condition on")
    p.add_argument("--quick", action="store_true", help="trimmed budget: a smoke run of the whole harness")
    p.add_argument("--out", type=Path, help="work directory to keep (default: a temporary one, removed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1), help="training ranks (torchrun)")
    p.add_argument("--seed", type=int, default=0, help="split seed and first generation seed")
    p.add_argument("--gen-seeds", type=int, default=4,
                   help="generation seeds per trained model (seed, seed+1, ...): the table's figures are the "
                        "first seed's, a second table gives mean ± sd over all (1 = no second table)")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--n-hvg", type=int, default=2000, help="genes kept (HVGs of the training split); 0 = all")
    p.add_argument("--vae-steps", type=int, help="override the VAE steps of the budget")
    p.add_argument("--ldm-steps", type=int, help="override the DiT steps of the budget")
    p.add_argument("--scvi-epochs", type=int, help="override the scVI epochs of the budget")
    p.add_argument("--scvi-threads", type=int, default=1,
                   help="torch threads for scVI training (1: fastest on a shared 2-core machine; 0 = torch's default)")
    args = p.parse_args(argv)
    if args.gen_seeds < 1:
        p.error("--gen-seeds must be >= 1")

    from scldm_scale.errors import ScldmError

    if args.data:
        datasets = [(path.stem, path) for path in args.data]
    else:
        datasets = [(name, SHARED_DATA / f"{name}.h5ad") for name in DEFAULT_DATASETS]
    for _, path in datasets:
        if not path.is_file():
            print(f"error: {path}: data file not found; pass --data PATH.h5ad", file=sys.stderr)
            return 2
    if "scvi" in args.methods:
        try:
            from scldm_scale.eval.scvi_baseline import import_scvi

            import_scvi()
        except ScldmError as e:
            print(f"error: {e}; or leave it out with --methods ours independent real", file=sys.stderr)
            return 2
    budget = list(BUDGETS["quick" if args.quick else "full"])
    for i, v in enumerate((args.vae_steps, args.ldm_steps, args.scvi_epochs)):
        if v is not None:
            budget[i] = v
    root = args.out or Path(tempfile.mkdtemp(prefix="scldm-bench-generation-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    try:
        for name, path in datasets:
            results[name] = bench_dataset(name, path, args.label, root, args, tuple(budget))
    except ScldmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    short = summary(results, {ds: args.label for ds in results})
    if args.out is not None:
        (root / "results.json").write_text(json.dumps({"budget": budget, "quick": args.quick, "wall_s": wall,
                                                       "datasets": results}, indent=1, default=float))
    print(format_tables(results, {ds: args.label for ds in results}))
    print(f"\nwall time of this invocation {wall:.0f} s (stages reused from --out are not counted) "
          f"on {os.cpu_count()} CPU cores ({'--quick' if args.quick else 'full'} budget)")
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
