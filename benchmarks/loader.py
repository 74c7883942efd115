"""Loader benchmark: our SOMA source vs tiledbsoma-ml, our h5ad token path vs raw cellarium DADC.

    python benchmarks/loader.py            # 500k cells x 2,000 genes (data cached under .bench/)
    python benchmarks/loader.py --quick    # 20k cells, a few minutes on 2 cores

Data: ``write_synthetic_atlas`` h5ad shards (50k cells each) and a SOMA copy of the same
cells written shard by shard with ``tiledbsoma.io`` (registration + append, memory bounded by
one shard). Each shard's cells are stored in the SOMA experiment sorted by cell_type, as real
atlases are grouped by dataset / donor, so that neighbouring ``soma_joinid``s are correlated
and the shuffle-quality figure measures something. The 10x data for the RSS figure reuses the
same files (symlinked h5ad shards; a SOMA experiment whose X blocks are copies of the 1x one
with shifted ``soma_joinid``s), so the loaders see 10x the cells.

Every figure runs in its own subprocess (clean peak RSS, no shared caches) with batch 1024 and
2 dataloader workers. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, ".bench")
SHARD_CELLS = 50_000
MEASUREMENT = "RNA"
LAYER = "data"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data


def atlas_path(n_cells: int, n_genes: int) -> str:
    return os.path.join(BENCH, f"atlas_c{n_cells}_g{n_genes}")


def soma_path(n_cells: int, n_genes: int, copies: int = 1) -> str:
    return os.path.join(BENCH, f"soma_c{n_cells}_g{n_genes}" + (f"_x{copies}" if copies > 1 else ""))


def ensure_atlas(n_cells: int, n_genes: int) -> str:
    from scldm_scale.data.synthetic import write_synthetic_atlas

    out = atlas_path(n_cells, n_genes)
    if not os.path.isfile(os.path.join(out, "metadata.json")):
        t = time.perf_counter()
        n_shards = max(1, -(-n_cells // SHARD_CELLS))
        write_synthetic_atlas(out, n_cells=n_cells, n_genes=n_genes, n_shards=n_shards, seed=0, overwrite=True)
        log(f"wrote {out} ({time.perf_counter() - t:.0f} s)")
    return out


def _read_obs_var(path: str):
    import anndata
    import h5py

    with h5py.File(path, "r") as f:
        return anndata.io.read_elem(f["obs"]), anndata.io.read_elem(f["var"])


def _type_order(obs) -> np.ndarray:
    return np.argsort(obs["cell_type"].cat.codes.to_numpy(), kind="stable")


def ensure_soma(atlas: str, uri: str) -> str:
    """SOMA copy of the atlas shards (cells of each shard sorted by cell_type)."""
    import anndata
    import tiledbsoma.io

    done = os.path.join(uri, "bench_done.json")
    if os.path.isfile(done):
        return uri
    t = time.perf_counter()
    tmp = f"{uri}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(glob.glob(os.path.join(atlas, "shard_*.h5ad")))
    lite = []
    for f in files:  # obs / var only: registration assigns soma_joinids in this (sorted) order
        obs, var = _read_obs_var(f)
        lite.append(anndata.AnnData(obs=obs.iloc[_type_order(obs)], var=var))
    rm = tiledbsoma.io.register_anndatas(
        None, lite, measurement_name=MEASUREMENT, obs_field_name="obs_id", var_field_name="var_id"
    )
    del lite
    for i, f in enumerate(files):
        a = anndata.read_h5ad(f)
        a = a[_type_order(a.obs)].copy()
        kw = dict(X_layer_name=LAYER, registration_mapping=rm, use_relative_uri=True, uns_keys=[])
        if i == 0:
            tiledbsoma.io.from_anndata(tmp, a, MEASUREMENT, ingest_mode="schema_only", **kw)
            rm.prepare_experiment(tmp)
        tiledbsoma.io.from_anndata(tmp, a, MEASUREMENT, **kw)
        del a
    with open(os.path.join(tmp, "bench_done.json"), "w") as fh:
        json.dump({"atlas": atlas, "shards": len(files)}, fh)
    shutil.rmtree(uri, ignore_errors=True)
    os.replace(tmp, uri)
    log(f"wrote {uri} ({time.perf_counter() - t:.0f} s)")
    return uri


def _link_shards(atlas: str, out: str, links: list[tuple[str, str]]) -> str:
    """``out``: a shard directory of symlinks ``(name, shard file of atlas)`` with atlas's vocab / labels."""
    if os.path.isfile(os.path.join(out, "metadata.json")):
        return out
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(atlas, "metadata.json")) as f:
        meta = json.load(f)
    sizes = {s["file"]: s["n_cells"] for s in meta["shards"]}
    shards = []
    for name, src in links:
        os.symlink(os.path.join(atlas, src), os.path.join(tmp, name))
        shards.append({"file": name, "n_cells": sizes[src]})
    for name in ("vocab.json", "labels.json"):
        shutil.copy(os.path.join(atlas, name), os.path.join(tmp, name))
    meta.update(shards=shards, shard_sizes=[s["n_cells"] for s in shards], n_shards=len(shards))
    meta.update(n_cells=sum(meta["shard_sizes"]), heldout=None, n_heldout=0)
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
        json.dump(meta, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _shard_files(atlas: str) -> list[str]:
    with open(os.path.join(atlas, "metadata.json")) as f:
        return [s["file"] for s in json.load(f)["shards"]]


def ensure_atlas_copies(atlas: str, copies: int) -> str:
    """A shard directory listing every shard of ``atlas`` ``copies`` times (symlinks)."""
    files = _shard_files(atlas) * copies
    return _link_shards(atlas, f"{atlas}_x{copies}", [(f"shard_{i:04d}.h5ad", f) for i, f in enumerate(files)])


def ensure_atlas_subset(atlas: str, n_shards: int) -> str:
    """A shard directory with the first ``n_shards`` shards of ``atlas`` (symlinks)."""
    return _link_shards(atlas, f"{atlas}_first{n_shards}", [(f, f) for f in _shard_files(atlas)[:n_shards]])


def ensure_soma_copies(src: str, copies: int, block: int = 50_000) -> str:
    """SOMA experiment holding ``copies`` copies of ``src`` (obs and X blocks with shifted joinids)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import tiledbsoma

    uri = f"{src}_x{copies}"
    if os.path.isfile(os.path.join(uri, "bench_done.json")):
        return uri
    t = time.perf_counter()
    tmp = f"{uri}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tiledbsoma.Experiment.open(src) as exp:
        n_obs = exp.obs.count
        obs_schema = exp.obs.schema
        ms = exp.ms[MEASUREMENT]
        var = ms.var.read().concat()
        x_type = ms.X[LAYER].schema.field("soma_data").type
    n_var = var.num_rows
    with tiledbsoma.Experiment.create(tmp) as out:
        out.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n_obs * copies - 1)])
        rna = out.add_new_collection("ms").add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
        rna.add_new_dataframe("var", schema=var.schema, domain=[(0, n_var - 1)]).write(var)
        rna.add_new_collection("X").add_new_sparse_ndarray(LAYER, type=x_type, shape=(n_obs * copies, n_var))
    with tiledbsoma.Experiment.open(src) as exp, tiledbsoma.Experiment.open(tmp, "w") as out:
        x_in, x_out = exp.ms[MEASUREMENT].X[LAYER], out.ms[MEASUREMENT].X[LAYER]
        for k in range(copies):
            for lo in range(0, n_obs, block):
                hi = min(n_obs, lo + block) - 1
                obs = exp.obs.read(coords=(slice(lo, hi),)).concat()
                obs = obs.set_column(0, "soma_joinid", pc.add(obs["soma_joinid"], k * n_obs))
                i = obs.schema.get_field_index("obs_id")
                suffix, sep = pa.scalar(f"-{k}", pa.large_string()), pa.scalar("", pa.large_string())
                obs = obs.set_column(i, "obs_id", pc.binary_join_element_wise(obs["obs_id"], suffix, sep))
                out.obs.write(obs)
                x = x_in.read(coords=(slice(lo, hi),)).tables().concat()
                x_out.write(x.set_column(0, "soma_dim_0", pc.add(x["soma_dim_0"], k * n_obs)))
    with open(os.path.join(tmp, "bench_done.json"), "w") as fh:
        json.dump({"src": src, "copies": copies}, fh)
    shutil.rmtree(uri, ignore_errors=True)
    os.replace(tmp, uri)
    log(f"wrote {uri} ({time.perf_counter() - t:.0f} s)")
    return uri


# ---------------------------------------------------------------------------------------------
# measurements (each runs in a child process: `loader.py --child TASK JSON`)


def _entropy(codes: np.ndarray) -> float:
    p = np.bincount(np.asarray(codes, dtype=np.int64)) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _peak_rss_mb() -> float:
    """Peak RSS of this process and of its joined dataloader workers, in MB.

    This process: ``VmHWM`` (per address space; ``ru_maxrss`` of RUSAGE_SELF would include the
    high-water mark of the parent that started us, which Linux carries across fork + exec).
    Workers: ``ru_maxrss`` of RUSAGE_CHILDREN (forked from this process, so clean).
    """
    import resource

    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as f:
            self_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, children_kb) / 1024.0


def _vocab_labels(atlas: str):
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.vocab import GeneVocab

    return GeneVocab.load(os.path.join(atlas, "vocab.json")), LabelTables.load(os.path.join(atlas, "labels.json"))


def _run_loader(source, workers: int, n_batches: int, type_col: int | None) -> dict:
    """Iterate a source's training batches for ``n_batches``; cells/s from the start (worker start-up included)."""
    t0 = time.perf_counter()
    it = source.batches(num_workers=workers)
    cells, entropies = 0, []
    for _ in range(n_batches):
        batch = next(it)
        cells += len(batch["cell_index_n"])
        if type_col is not None:
            entropies.append(_entropy(batch["labels_na"][:, type_col].numpy()))
    dt = time.perf_counter() - t0
    del it
    out = {"cells": cells, "seconds": dt, "cells_per_s": cells / dt}
    if entropies:
        out["entropy"] = float(np.mean(entropies))
    return out


def task_soma_ours(a: dict) -> dict:
    from scldm_scale.data.config import DataConfig, SourceKind
    from scldm_scale.data.loader import build_source

    vocab, labels = _vocab_labels(a["atlas"])
    cfg = DataConfig(
        source=SourceKind.SOMA, path=a["uri"], measurement=MEASUREMENT, x_layer=LAYER, batch_size=a["batch"],
        chunk_size=a["chunk"], shuffle_buffer=a["buffer"], max_genes=a["max_genes"], seed=0,
    )
    t = time.perf_counter()
    ds = build_source(cfg, vocab, labels)
    setup = time.perf_counter() - t
    col = labels.attributes.index("cell_type")
    out = _run_loader(ds, a["workers"], a["batches"], col)
    # fully random order of the same cells: the reference entropy
    codes = ds.label_codes_na[:, col].astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(codes))
    n = min(len(codes) // a["batch"], max(a["batches"], 200))
    out["entropy_random"] = float(np.mean([_entropy(codes[perm[i * a["batch"] : (i + 1) * a["batch"]]]) for i in range(n)]))
    out.update(setup_s=setup, rss_mb=_peak_rss_mb())
    return out


def task_soma_ml(a: dict) -> dict:
    try:
        import tiledbsoma
        from tiledbsoma_ml import ExperimentDataset, experiment_dataloader
    except ImportError as e:
        return {"error": f"tiledbsoma-ml not importable ({e}); pip install --no-deps tiledbsoma-ml==0.1.0"}
    t = time.perf_counter()
    with tiledbsoma.Experiment.open(a["uri"]) as exp, exp.axis_query(MEASUREMENT) as query:
        ds = ExperimentDataset(
            query, layer_name=LAYER, obs_column_names=["soma_joinid", "cell_type"], batch_size=a["batch"],
            shuffle=True, shuffle_chunk_size=a["chunk"], io_batch_size=a["buffer"], seed=0,
        )
    setup = time.perf_counter() - t
    t0 = time.perf_counter()
    it = iter(experiment_dataloader(ds, num_workers=a["workers"]))
    cells, entropies = 0, []
    for _ in range(a["batches"]):
        x, obs = next(it)
        cells += len(obs)
        entropies.append(_entropy(obs["cell_type"].cat.codes.to_numpy()))
    dt = time.perf_counter() - t0
    del it
    return {"cells": cells, "seconds": dt, "cells_per_s": cells / dt, "entropy": float(np.mean(entropies)),
            "setup_s": setup, "rss_mb": _peak_rss_mb()}


def _keep(x):
    return x


def task_h5ad(a: dict) -> dict:
    """Raw cellarium DADC iteration and our h5ad token path, same data, batch, workers, shuffle."""
    import torch
    from cellarium.ml.data import DistributedAnnDataCollection, IterableDistributedAnnDataCollectionDataset
    from cellarium.ml.utilities.data import AnnDataField

    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.loader import build_source
    from scldm_scale.data.validate import resolve_shards

    from cellarium.ml.utilities.data import densify

    out = {}
    files = resolve_shards(a["atlas"])
    with open(os.path.join(a["atlas"], "metadata.json")) as f:
        limits = np.cumsum([s["n_cells"] for s in json.load(f)["shards"]]).tolist()
    dadc = DistributedAnnDataCollection(files, limits=limits, max_cache_size=2, obs_columns_to_validate=["cell_type"])
    # "dense": x_ng as cellarium-ml models consume it (AnnDataField convert_fn=densify);
    # "sparse": the CSR rows as read, no conversion at all
    for name, convert in (("raw_dadc", densify), ("raw_dadc_sparse", _keep)):
        raw = IterableDistributedAnnDataCollectionDataset(
            dadc,
            batch_keys={
                "x_ng": AnnDataField(attr="X", convert_fn=convert),
                "cell_type": AnnDataField(attr="obs", key="cell_type", convert_fn=_keep),
            },
            batch_size=a["batch"], iteration_strategy="same_order", shuffle=True, shuffle_seed=0,
            drop_last_indices=True, drop_incomplete_batch=True,
        )
        raw.set_epoch(0)
        t0 = time.perf_counter()
        it = iter(torch.utils.data.DataLoader(raw, batch_size=None, num_workers=a["workers"]))
        cells = 0
        for _ in range(a["batches"]):
            cells += next(it)["x_ng"].shape[0]
        dt = time.perf_counter() - t0
        del it
        out[name] = {"cells": cells, "seconds": dt, "cells_per_s": cells / dt}
    vocab, labels = _vocab_labels(a["atlas"])
    cfg = DataConfig(path=a["atlas"], batch_size=a["batch"], max_genes=a["max_genes"], seed=0)
    ds = build_source(cfg, vocab, labels, validate=False)
    out["tokens"] = _run_loader(ds, a["workers"], a["batches"], None)
    return out


def task_rss(a: dict) -> dict:
    """Peak RSS of our full path to token batches (h5ad or SOMA) for a fixed number of batches."""
    from scldm_scale.data.config import DataConfig, SourceKind
    from scldm_scale.data.loader import build_source

    if a["source"] == "raw_dadc":  # reference: cellarium's own iteration, no tokens
        import torch
        from cellarium.ml.data import DistributedAnnDataCollection, IterableDistributedAnnDataCollectionDataset
        from cellarium.ml.utilities.data import AnnDataField, densify

        from scldm_scale.data.validate import resolve_shards

        with open(os.path.join(a["path"], "metadata.json")) as f:
            limits = np.cumsum([s["n_cells"] for s in json.load(f)["shards"]]).tolist()
        dadc = DistributedAnnDataCollection(resolve_shards(a["path"]), limits=limits, max_cache_size=2)
        raw = IterableDistributedAnnDataCollectionDataset(
            dadc, batch_keys={"x_ng": AnnDataField(attr="X", convert_fn=densify)}, batch_size=a["batch"],
            iteration_strategy="same_order", shuffle=True, shuffle_seed=0, drop_last_indices=True,
            drop_incomplete_batch=True,
        )
        it = iter(torch.utils.data.DataLoader(raw, batch_size=None, num_workers=a["workers"]))
        for _ in range(a["batches"]):
            next(it)
        del it
        return {"n_cells": int(limits[-1]), "rss_mb": _peak_rss_mb()}
    vocab, labels = _vocab_labels(a["atlas_meta"])
    if a["source"] == "soma":
        cfg = DataConfig(source=SourceKind.SOMA, path=a["path"], batch_size=a["batch"], chunk_size=a["chunk"],
                         shuffle_buffer=a["buffer"], max_genes=a["max_genes"], seed=0)
    else:
        cfg = DataConfig(path=a["path"], batch_size=a["batch"], max_genes=a["max_genes"], seed=0)
    ds = build_source(cfg, vocab, labels, validate=False)
    out = _run_loader(ds, a["workers"], a["batches"], None)
    out.update(n_cells=int(ds.n_cells), rss_mb=_peak_rss_mb())
    return out


TASKS = {"soma_ours": task_soma_ours, "soma_ml": task_soma_ml, "h5ad": task_h5ad, "rss": task_rss}


def child_cmd(task: str, args: dict) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", task, json.dumps(args)]


def _parse_child(task: str, proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"error": f"{task} failed (exit {proc.returncode}): " + " | ".join(tail)}
    return json.loads(lines[-1])


def run_child(task: str, args: dict, timeout: float = 3600) -> dict:
    log(f"running {task} {({k: v for k, v in args.items() if k not in ('atlas', 'uri', 'atlas_meta')})}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(child_cmd(task, args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return _parse_child(task, proc)


def run_children_parallel(jobs: list[tuple[str, dict]], timeout: float = 3600) -> list[dict]:
    """Peak-RSS runs: independent processes, started together (memory, not time, is measured)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(child_cmd(t, a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for t, a in jobs]
    out = []
    for (task, _), p in zip(jobs, procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(_parse_child(task, subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    return out


# ---------------------------------------------------------------------------------------------
# main


def _fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k cells, few batches (a smoke run in a few minutes)")
    p.add_argument("--cells", type=int, default=None, help="cells of the 1x data (default 500k; 20k with --quick)")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batches", type=int, default=None, help="batches per throughput figure (default 300; 12 quick)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64, help="chunk_size (ours) = shuffle_chunk_size (tiledbsoma-ml)")
    p.add_argument("--buffer", type=int, default=65536, help="shuffle_buffer (ours) = io_batch_size (tiledbsoma-ml)")
    p.add_argument("--max-genes", type=int, default=1024)
    p.add_argument("--only", choices=("all", "soma", "h5ad", "rss"), default="all", help="run only these figures")
    p.add_argument("--child", nargs=2, metavar=("TASK", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(TASKS[args.child[0]](json.loads(args.child[1]))), flush=True)
        return

    t_start = time.perf_counter()
    n_cells = args.cells or (20_000 if args.quick else 500_000)
    n_batches = args.batches or (12 if args.quick else 300)
    rss_batches = 8 if args.quick else 40
    os.makedirs(BENCH, exist_ok=True)
    atlas = ensure_atlas(n_cells, args.genes)
    soma = ensure_soma(atlas, soma_path(n_cells, args.genes))
    atlas10 = ensure_atlas_copies(atlas, 10)
    # SOMA 1x / 10x pair for the RSS figure: quick -> the data and 10 copies of it; full -> the
    # first 10% of the shards and the data (10 copies of 500k cells would take long to write)
    if args.quick:
        soma_small, soma_big = soma, ensure_soma_copies(soma, 10)
    else:
        n_sub = max(1, len(glob.glob(os.path.join(atlas, "shard_*.h5ad"))) // 10)
        subset = ensure_atlas_subset(atlas, n_sub)
        soma_small, soma_big = ensure_soma(subset, soma_path(n_cells, args.genes) + f"_first{n_sub}"), soma
    t_data = time.perf_counter() - t_start

    common = dict(batch=args.batch_size, workers=args.workers, max_genes=args.max_genes, batches=n_batches)
    shuffle = dict(chunk=args.chunk, buffer=args.buffer)
    skipped = {"error": "skipped (--only)"}
    run_soma, run_h5ad, run_rss = (args.only in ("all", k) for k in ("soma", "h5ad", "rss"))
    ours = run_child("soma_ours", dict(common, **shuffle, atlas=atlas, uri=soma)) if run_soma else skipped
    ml = run_child("soma_ml", dict(common, **shuffle, uri=soma)) if run_soma else skipped
    h5 = run_child("h5ad", dict(common, atlas=atlas)) if run_h5ad else skipped
    # peak RSS: recipe-default shuffle settings (chunk 256, shuffle_buffer 16384), the buffer capped
    # at 1/8 of the smallest 1x data so that the measured batches use full-size buffers in both
    # runs (buffers, not data, are what must stay fixed)
    n_small = n_cells if args.quick else n_sub * SHARD_CELLS
    rss_buffer = max(args.batch_size, min(16384, n_small // 8))
    rss_args = dict(common, chunk=256, buffer=rss_buffer, batches=rss_batches, atlas_meta=atlas)
    rss_jobs = [
        ("rss", dict(rss_args, source="h5ad", path=atlas)),
        ("rss", dict(rss_args, source="h5ad", path=atlas10)),
        ("rss", dict(rss_args, source="soma", path=soma_small)),
        ("rss", dict(rss_args, source="soma", path=soma_big)),
    ]
    rss_jobs += [("rss", dict(rss_args, source="raw_dadc", path=p)) for p in (atlas, atlas10)]
    rss = run_children_parallel(rss_jobs) if run_rss else [skipped] * len(rss_jobs)

    def get(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    ours_cps, ml_cps = get(ours, "cells_per_s"), get(ml, "cells_per_s")
    rand = get(ours, "entropy_random")
    q_ours = get(ours, "entropy") / rand if rand and get(ours, "entropy") is not None else None
    q_ml = get(ml, "entropy") / rand if rand and get(ml, "entropy") is not None else None
    raw_cps, tok_cps = get(h5, "raw_dadc", "cells_per_s"), get(h5, "tokens", "cells_per_s")
    raw_sparse_cps = get(h5, "raw_dadc_sparse", "cells_per_s")
    growth = {}
    for name, (r1, r10) in {"h5ad": rss[0:2], "soma": rss[2:4]}.items():
        a1, a10 = get(r1, "rss_mb"), get(r10, "rss_mb")
        growth[name] = (a10 / a1 - 1.0) if a1 and a10 else None
    valid = [g for g in growth.values() if g is not None]
    result = {
        "mode": "quick" if args.quick else "full",
        "n_cells": n_cells,
        "n_genes": args.genes,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "chunk_size": args.chunk,
        "shuffle_buffer": args.buffer,
        "batches_measured": n_batches,
        "soma_cells_per_s": ours_cps,
        "tiledbsoma_ml_cells_per_s": ml_cps,
        "soma_vs_tiledbsoma_ml": ours_cps / ml_cps if ours_cps and ml_cps else None,
        "shuffle_quality_ours": q_ours,
        "shuffle_quality_tiledbsoma_ml": q_ml,
        "raw_dadc_cells_per_s": raw_cps,
        "h5ad_tokens_cells_per_s": tok_cps,
        "h5ad_tokens_vs_raw_dadc": tok_cps / raw_cps if tok_cps and raw_cps else None,
        "raw_dadc_sparse_cells_per_s": raw_sparse_cps,
        "h5ad_tokens_vs_raw_dadc_sparse": tok_cps / raw_sparse_cps if tok_cps and raw_sparse_cps else None,
        "rss_mb_h5ad_1x": get(rss[0], "rss_mb"),
        "rss_mb_h5ad_10x": get(rss[1], "rss_mb"),
        "rss_mb_soma_1x": get(rss[2], "rss_mb"),
        "rss_mb_soma_10x": get(rss[3], "rss_mb"),
        "rss_growth_10x_h5ad": growth["h5ad"],
        "rss_growth_10x_soma": growth["soma"],
        "rss_growth_10x": max(valid) if valid else None,
        "rss_mb_raw_dadc_1x": get(rss[4], "rss_mb"),
        "rss_mb_raw_dadc_10x": get(rss[5], "rss_mb"),
        "rss_growth_10x_raw_dadc": (get(rss[5], "rss_mb") / get(rss[4], "rss_mb") - 1.0)
        if get(rss[4], "rss_mb") and get(rss[5], "rss_mb") else None,
        "rss_cells_h5ad": [get(rss[0], "n_cells"), get(rss[1], "n_cells")],
        "rss_cells_soma": [get(rss[2], "n_cells"), get(rss[3], "n_cells")],
        "rss_shuffle_buffer": rss_buffer,
        "data_prep_s": t_data,
        "total_s": time.perf_counter() - t_start,
        "errors": {k: v["error"] for k, v in {"soma_ours": ours, "soma_ml": ml, "h5ad": h5, "rss_h5ad_1x": rss[0],
                   "rss_h5ad_10x": rss[1], "rss_soma_1x": rss[2], "rss_soma_10x": rss[3],
                   "rss_raw_dadc_1x": rss[4], "rss_raw_dadc_10x": rss[5]}.items() if isinstance(v, dict) and "error" in v},
    }
    if ml_cps is None:
        result["tiledbsoma_ml_note"] = get(ml, "error") or "tiledbsoma-ml figure missing"

    rows = [
        ("SOMA, ours (token batches)", _fmt(ours_cps), _fmt(q_ours, ".4f"), f"chunk {args.chunk}, shuffle_buffer {args.buffer}"),
        ("SOMA, tiledbsoma-ml ExperimentDataset", _fmt(ml_cps), _fmt(q_ml, ".4f"), f"shuffle_chunk_size {args.chunk}, io_batch_size {args.buffer}"),
        ("h5ad, raw cellarium DADC (dense x_ng)", _fmt(raw_cps), "", "AnnDataField(X, densify) + cell_type"),
        ("h5ad, raw cellarium DADC (sparse X)", _fmt(raw_sparse_cps), "", "AnnDataField(X) as read + cell_type"),
        ("h5ad, ours (token batches)", _fmt(tok_cps), "", "via cellarium DADC"),
    ]
    print(f"\nloader benchmark ({result['mode']}): {n_cells:,} cells x {args.genes:,} genes, batch {args.batch_size}, "
          f"{args.workers} workers, {n_batches} batches per figure")
    print(f"{'loader':40s} {'cells/s':>10s} {'shuffle q.':>11s}  settings")
    for name, cps, q, note in rows:
        print(f"{name:40s} {cps:>10s} {q:>11s}  {note}")
    print(f"ours / tiledbsoma-ml: {_fmt(result['soma_vs_tiledbsoma_ml'], '.2f')}x (target >= 1.5x at >= shuffle quality); "
          f"h5ad tokens / raw DADC: {_fmt(result['h5ad_tokens_vs_raw_dadc'], '.2f')}x dense, "
          f"{_fmt(result['h5ad_tokens_vs_raw_dadc_sparse'], '.2f')}x sparse (target >= 0.85x)")
    print(f"peak RSS MB (1x -> 10x cells): h5ad {_fmt(result['rss_mb_h5ad_1x'])} -> {_fmt(result['rss_mb_h5ad_10x'])} "
          f"({_fmt(growth['h5ad'] and 100 * growth['h5ad'], '+.1f')}%), SOMA {_fmt(result['rss_mb_soma_1x'])} -> "
          f"{_fmt(result['rss_mb_soma_10x'])} ({_fmt(growth['soma'] and 100 * growth['soma'], '+.1f')}%) (target < 15%); "
          f"reference, raw cellarium DADC {_fmt(result['rss_mb_raw_dadc_1x'])} -> {_fmt(result['rss_mb_raw_dadc_10x'])}")
    if result["errors"]:
        print(f"errors: {result['errors']}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
