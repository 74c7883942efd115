"""Generation benchmark pieces: `evaluate` end to end, bad inputs, the scVI baseline, the benchmark harness.

Everything here is tiny (a few hundred cells, <= 80 genes) and trains nothing of ours; the scVI
tests train for one or two epochs and are skipped without scvi-tools.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.errors import ScldmError
from tests.cli_utils import REPO, cli

pytestmark = pytest.mark.integration

TYPES = ("T0", "T1", "T2")


def tiny_counts(n_per_type: int = 40, n_genes: int = 60, seed: int = 0, prefix: str = "c") -> ad.AnnData:
    """NB counts of 3 cell types over ``n_genes`` genes (shared profiles across seeds)."""
    prof = np.random.default_rng(123)
    base_g = prof.normal(0.0, 1.0, n_genes)
    type_tg = np.stack([base_g + np.where(prof.random(n_genes) < 0.2, 2.0, 0.0) for _ in TYPES])
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for t, name in enumerate(TYPES):
        lib_n = rng.lognormal(np.log(800), 0.3, (n_per_type, 1))
        p = np.exp(type_tg[t]) / np.exp(type_tg[t]).sum()
        rows.append(rng.poisson(rng.gamma(5.0, lib_n * p[None] / 5.0)))
        labels += [name] * n_per_type
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)},
                       index=[f"{prefix}{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(np.concatenate(rows).astype(np.int32)), obs=obs, var=var)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_generation", REPO / "benchmarks" / "generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- evaluate end to end


def test_evaluate_cli_writes_json_keys_and_report(tmp_path):
    ref, gen = tmp_path / "ref.h5ad", tmp_path / "gen.h5ad"
    tiny_counts(seed=1).write_h5ad(ref)
    tiny_counts(seed=2, prefix="g").write_h5ad(gen)
    out, report = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "report.png"
    cli("evaluate", "--reference", str(ref), "--generated", str(gen), "--labels", "cell_type",
        "--out", str(out), "--report", str(report))
    metrics = json.loads(out.read_text())
    for key in ("w2", "mmd", "fd", "nn1", "precision", "recall", "mean_r2", "knn_acc/cell_type", "per_condition"):
        assert key in metrics, key
    for key in ("w2", "mmd", "fd", "nn1", "knn_acc/cell_type"):
        assert np.isfinite(metrics[key]), key
    assert metrics["n_ref"] == metrics["n_gen"] == 120
    assert report.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json", "report.png"]


def test_evaluate_cli_aligns_gene_sets_by_id_with_a_warning(tmp_path):
    ref, gen = tmp_path / "ref.h5ad", tmp_path / "gen.h5ad"
    tiny_counts(seed=1).write_h5ad(ref)
    g = tiny_counts(seed=2, prefix="g")
    g[:, list(g.var_names[10:])[::-1]].copy().write_h5ad(gen)  # 10 genes missing, the rest reversed
    out = tmp_path / "metrics.json"
    proc = cli("evaluate", "--reference", str(ref), "--generated", str(gen), "--out", str(out))
    assert "dropped 10 reference genes" in proc.stderr
    assert json.loads(out.read_text())["n_genes"] == 50


def test_evaluate_cli_too_small_gene_overlap_is_a_clear_error(tmp_path):
    ref, gen = tmp_path / "ref.h5ad", tmp_path / "gen.h5ad"
    tiny_counts(seed=1).write_h5ad(ref)
    g = tiny_counts(seed=2, prefix="g")
    g.var_names = [f"OTHER{i}" if i >= 6 else v for i, v in enumerate(g.var_names)]
    g.write_h5ad(gen)
    out = tmp_path / "metrics.json"
    proc = cli("evaluate", "--reference", str(ref), "--generated", str(gen), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "only 6 of 60 reference genes" in proc.stderr
    assert not out.exists()


def test_unknown_condition_value_lists_the_known_values():
    from scldm_scale.data.labels import LabelTables

    tables = LabelTables({"cell_type": ["B cell", "T cell"], "tissue": ["blood"]})
    with pytest.raises(ScldmError, match=r"unknown value 'dragon'; known values: B cell, T cell"):
        tables.code_of("cell_type", "dragon")


# ----------------------------------------------------------------------------- scVI baseline


def test_scvi_missing_names_the_extra(monkeypatch):
    from scldm_scale.eval import scvi_baseline

    monkeypatch.setitem(sys.modules, "scvi", None)  # `import scvi` now raises ImportError
    with pytest.raises(ScldmError, match=r"pip install -e \"\.\[bench\]\""):
        scvi_baseline.import_scvi()


@pytest.fixture(scope="module")
def scvi_model():
    pytest.importorskip("scvi", reason="scvi-tools is not installed (pip install -e '.[bench]')")
    from scldm_scale.eval.scvi_baseline import train_scvi

    return train_scvi(tiny_counts(n_per_type=30, n_genes=50, seed=3), "cell_type", max_epochs=2, seed=0,
                      threads=1, n_hidden=16, n_latent=4)


def test_scvi_generates_requested_labels_as_integer_counts(scvi_model):
    cond = pd.DataFrame({"cell_type": ["T2"] * 7 + ["T0"] * 5 + ["T2"] * 2})
    gen = scvi_model.generate(cond, seed=0)
    assert gen.shape == (14, 50)
    assert list(gen.var_names) == [f"ENSG{i:05d}" for i in range(50)]
    assert list(gen.obs["cell_type"]) == list(cond["cell_type"])
    assert gen.obs["cell_type"].value_counts().to_dict() == {"T2": 9, "T0": 5}
    x = gen.X.toarray()
    assert np.issubdtype(x.dtype, np.integer) and (x >= 0).all() and x.sum() > 0
    assert scvi_model.epochs == 2
    # reproducible by seed, different across seeds
    assert np.array_equal(scvi_model.generate(cond, seed=0).X.toarray(), x)
    assert not np.array_equal(scvi_model.generate(cond, seed=1).X.toarray(), x)


def test_scvi_unknown_label_lists_the_known_values(scvi_model):
    with pytest.raises(ScldmError, match=r"unknown cell_type value\(s\) \['dragon'\]; known values: T0, T1, T2"):
        scvi_model.generate(pd.DataFrame({"cell_type": ["T0", "dragon"]}))


# ----------------------------------------------------------------------------- benchmark harness


def test_stratified_split_is_seeded_and_keeps_every_label_in_training():
    bench = load_benchmark()
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 2 + ["d"])
    held = bench.stratified_split(labels, 0.2, seed=0)
    assert held.sum() == 10 + 4 + 0 + 0  # round(0.2 * n) per label; a label keeps >= 1 training cell
    assert {lab: int(held[labels == lab].sum()) for lab in "abcd"} == {"a": 10, "b": 4, "c": 0, "d": 0}
    assert np.array_equal(bench.stratified_split(labels, 0.2, seed=0), held)
    assert not np.array_equal(bench.stratified_split(labels, 0.2, seed=1), held)


def test_prepare_dataset_picks_hvgs_on_the_training_split(tmp_path):
    bench = load_benchmark()
    a = tiny_counts(n_per_type=50, n_genes=80, seed=4)
    a.var["gene_ids"] = a.var_names
    a.var_names = [f"SYM{i}" for i in range(a.n_vars)]  # Ensembl ids in a column: used as gene ids
    a.write_h5ad(tmp_path / "in.h5ad")
    info = bench.prepare_dataset(tmp_path / "in.h5ad", "cell_type", tmp_path, 0.2, 30, seed=0)
    train, held = ad.read_h5ad(tmp_path / "train.h5ad"), ad.read_h5ad(tmp_path / "heldout.h5ad")
    assert info["n_train"] == train.n_obs == 120 and info["n_heldout"] == held.n_obs == 30
    assert list(train.var_names) == list(held.var_names) and train.n_vars == info["n_genes"] == 30
    assert train.var_names[0].startswith("ENSG")
    assert not set(train.obs_names) & set(held.obs_names)
    assert held.obs["cell_type"].value_counts().to_dict() == {"T0": 10, "T1": 10, "T2": 10}
    full_train = a[a.obs_names.isin(train.obs_names)].copy()
    full_train.var_names = a.var["gene_ids"].to_numpy()
    assert sorted(bench.select_hvg(full_train, 30)) == sorted(train.var_names)


def test_benchmark_runs_on_any_file_and_ends_with_the_json_line(tmp_path):
    data = tmp_path / "tinyset.h5ad"
    tiny_counts(n_per_type=60, n_genes=70, seed=5).write_h5ad(data)
    methods = ["independent", "real"]
    extra = []
    if importlib.util.find_spec("scvi") is not None:
        methods.insert(0, "scvi")
        extra = ["--scvi-epochs", "1"]
    proc = subprocess.run([sys.executable, "benchmarks/generation.py", "--data", str(data), "--label", "cell_type",
                           "--quick", "--methods", *methods, *extra, "--n-hvg", "50", "--gen-seeds", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(result) == ["tinyset"]
    assert list(result["tinyset"]) == methods
    for row in result["tinyset"].values():
        assert set(row) == {"w2", "mmd", "fd", "nn1", "knn_label_acc"}
        assert all(np.isfinite(v) for v in row.values())
        assert 0.0 <= row["knn_label_acc"] <= 1.0 and 0.0 <= row["nn1"] <= 1.0
    assert "tinyset:" in proc.stdout and "wall time of this invocation" in proc.stdout
    # the second table: mean ± sd over generation seeds 0 and 1, with the training cells as a reference row
    table = proc.stdout.split("over generation seeds 0-1", 1)[1].splitlines()
    rows = {line.split("  ")[0].strip(): line for line in table[2:] if "±" in line}
    assert set(rows) == {*[m for m in methods if m != "real"], "train cells"}
    fd_mean = float(rows["independent"].split()[7])  # name, W2 ± sd, MMD ± sd, FD mean
    assert np.isfinite(fd_mean) and fd_mean > 0


def test_benchmark_missing_file_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/generation.py", "--data", str(tmp_path / "nope.h5ad")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.h5ad: data file not found" in proc.stderr
