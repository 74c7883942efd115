"""End-to-end checks of scldm_scale.eval: representation, baselines, evaluate/compare, report."""

import base64
import json
import os
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.errors import ScldmError
from scldm_scale.eval import (
    align_genes,
    compare,
    evaluate,
    fit_representation,
    format_table,
    independent_genes_baseline,
    label_matched_cells,
    real_vs_real_split,
    write_report,
)

N_GENES = 200
TYPES = ("T0", "T1", "T2")
FAST = dict(n_hvg=100, n_pcs=10, max_cells=300, embedding="pca")


def make_adata(n_per_type=100, seed=0, profile_seed=123, sparse=True) -> ad.AnnData:
    """3 cell types, NB counts (theta=5), a per-cell program that correlates genes."""
    prof = np.random.default_rng(profile_seed)
    base_g = prof.normal(0.0, 1.0, N_GENES)
    type_tg = np.stack([base_g + np.where(prof.random(N_GENES) < 0.15, 2.0, 0.0) for _ in TYPES])
    program_g = prof.normal(0.0, 0.8, N_GENES)
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for t, name in enumerate(TYPES):
        act_n = rng.normal(0.0, 1.0, (n_per_type, 1))
        lib_n = rng.lognormal(np.log(2000), 0.3, (n_per_type, 1))
        logit = type_tg[t][None] + act_n * program_g[None]
        p = np.exp(logit) / np.exp(logit).sum(1, keepdims=True)
        mu = lib_n * p
        theta = 5.0
        rows.append(rng.poisson(rng.gamma(theta, mu / theta)))
        labels += [name] * n_per_type
    x = np.concatenate(rows).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels),
                        "donor": rng.choice(["d0", "d1"], len(labels))},
                       index=[f"c{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(N_GENES)])
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


def shuffled_genes(adata, seed=0) -> ad.AnnData:
    """Each gene's column permuted independently: marginals kept, all cell structure gone."""
    rng = np.random.default_rng(seed)
    x = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    x = np.stack([rng.permutation(x[:, j]) for j in range(x.shape[1])], axis=1)
    return ad.AnnData(X=sp.csr_matrix(x), obs=adata.obs.copy(), var=adata.var.copy())


# ----------------------------------------------------------------------------- representation


def test_representation_sparse_dense_and_hvg():
    a = make_adata(60, seed=1)
    dense = a.X.toarray()
    rep = fit_representation(a.X, n_hvg=50, n_pcs=8, seed=0)
    assert rep.n_hvg == 50 and rep.n_pcs == 8
    assert np.all(np.diff(rep.hvg_idx_h) > 0)
    z_sparse = rep.transform(a.X)
    z_dense = fit_representation(dense, n_hvg=50, n_pcs=8, seed=0).transform(dense)
    assert z_sparse.shape == (a.n_obs, 8)
    np.testing.assert_allclose(np.abs(z_sparse), np.abs(z_dense), atol=1e-6)
    # centered on the reference; PC1 carries the most variance
    np.testing.assert_allclose(z_sparse.mean(0), 0.0, atol=1e-8)
    assert z_sparse[:, 0].var() >= z_sparse[:, 1].var()
    # all genes are kept when there are fewer than n_hvg
    assert fit_representation(a.X, n_hvg=5000, n_pcs=5).n_hvg == N_GENES
    with pytest.raises(ScldmError, match="genes"):
        rep.transform(dense[:, :10])


def test_representation_picks_overdispersed_genes():
    """Poisson genes over a range of means, and a few genes with much more variance than their mean
    implies (Gamma-Poisson with shape 0.5): those are the highly variable ones."""
    rng = np.random.default_rng(0)
    mean_g = np.exp(rng.uniform(np.log(0.5), np.log(50.0), size=200))
    x = rng.poisson(mean_g, size=(400, 200)).astype(float)
    dispersed = np.array([11, 57, 123, 180])
    x[:, dispersed] = rng.poisson(rng.gamma(0.5, mean_g[dispersed] / 0.5, size=(400, 4)))
    rep = fit_representation(x, n_hvg=4, n_pcs=2)
    assert sorted(rep.hvg_idx_h.tolist()) == dispersed.tolist()


def test_hvgs_are_scanpys_seurat_v3_gene_for_gene():
    """The one HVG definition (evaluate, the sample check, the benchmark) is scanpy's seurat_v3 on counts."""
    import anndata as ad
    import scanpy as sc

    from scldm_scale.eval.representation import highly_variable_genes

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pbmc3k.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared real data)")
    data = ad.read_h5ad(path)[:600].copy()
    expressed = np.asarray((data.X != 0).sum(0)).ravel() > 0
    data = data[:, expressed].copy()  # scanpy's seurat_v3 needs every gene expressed somewhere
    ours = highly_variable_genes(data.X, 1000)
    table = sc.pp.highly_variable_genes(data.copy(), flavor="seurat_v3", n_top_genes=1000, inplace=False)
    assert ours.tolist() == np.flatnonzero(table["highly_variable"].to_numpy()).tolist()
    # zero genes are dropped before scanpy sees them, and never chosen
    padded = np.hstack([np.zeros((data.n_obs, 5)), data.X.toarray()])
    assert (highly_variable_genes(padded, 1000) - 5).tolist() == ours.tolist()


# ----------------------------------------------------------------------------- align_genes


def test_align_genes_mismatch_warns_and_aligns():
    ref = make_adata(30, seed=1)
    gen = make_adata(30, seed=2)
    keep = list(gen.var_names[20:])[::-1]  # 180 shared genes, reversed order
    extra = ad.AnnData(X=sp.csr_matrix((gen.n_obs, 5), dtype=np.float32), obs=gen.obs.copy(),
                       var=pd.DataFrame(index=[f"EXTRA{i}" for i in range(5)]))
    gen2 = ad.concat([gen[:, keep], extra], axis=1, merge="first")
    with pytest.warns(UserWarning, match=r"dropped 20 reference genes and 5 generated genes"):
        r, g = align_genes(ref, gen2)
    assert list(r.var_names) == list(ref.var_names[20:])
    assert list(g.var_names) == list(r.var_names)
    np.testing.assert_array_equal(g.X.toarray(), gen[:, r.var_names].X.toarray())
    # identical gene lists: returned untouched, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2, g2 = align_genes(ref, gen)
    assert r2 is ref and g2 is gen


def test_align_genes_tiny_overlap_raises():
    ref = make_adata(30, seed=1)
    gen = make_adata(30, seed=2)[:, :40].copy()  # 20% of the reference genes
    with pytest.raises(ScldmError, match="40 of 200"):
        align_genes(ref, gen)
    with pytest.raises(ScldmError):
        evaluate(ref, gen, ["cell_type"], **FAST)


# ----------------------------------------------------------------------------- baselines


def test_independent_genes_baseline():
    ref = make_adata(150, seed=3, sparse=False)
    want = {"T0": 500, "T1": 300, "T2": 400}
    req = pd.DataFrame({"cell_type": np.random.default_rng(0).permutation(
        np.repeat(list(want), list(want.values())))})
    out = independent_genes_baseline(ref, "cell_type", req, seed=0)
    x = out.X.toarray()
    assert out.shape == (1200, N_GENES)
    assert list(out.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(x, np.round(x))
    assert x.min() >= 0
    # requested labels honoured exactly, in the requested order
    np.testing.assert_array_equal(out.obs["cell_type"].astype(str), req["cell_type"].astype(str))
    assert out.obs["cell_type"].value_counts().to_dict() == want
    # per-gene per-class means within 5 standard errors of the reference class means
    xr = ref.X
    for t, m in want.items():
        ref_c = xr[(ref.obs["cell_type"] == t).to_numpy()]
        gen_c = x[(out.obs["cell_type"] == t).to_numpy()]
        se = ref_c.std(0) / np.sqrt(m)
        assert np.all(np.abs(gen_c.mean(0) - ref_c.mean(0)) <= 5 * se + 1e-9)
        # every generated value of a gene occurs in that gene's reference class values
        j = int(np.argmax(ref_c.mean(0)))
        assert set(np.unique(gen_c[:, j])) <= set(np.unique(ref_c[:, j]))
    # seeded
    again = independent_genes_baseline(ref, "cell_type", req, seed=0)
    np.testing.assert_array_equal(again.X.toarray(), x)
    with pytest.raises(ScldmError, match="no reference cells"):
        independent_genes_baseline(ref, "cell_type", pd.DataFrame({"cell_type": ["nope"]}))
    with pytest.raises(ScldmError, match="tissue"):
        independent_genes_baseline(ref, "tissue", req)


def test_label_matched_cells_are_real_rows_with_the_requested_labels():
    ref = make_adata(40, seed=5, sparse=True)  # 40 cells per type
    req = pd.DataFrame({"cell_type": ["T2", "T0", "T0", "T1"] * 8 + ["T0"] * 20})  # T0: 36, T1: 8, T2: 8
    out = label_matched_cells(ref, "cell_type", req, seed=0)
    x, xr = out.X.toarray(), ref.X.toarray()
    np.testing.assert_array_equal(out.obs["cell_type"].astype(str), req["cell_type"])
    assert list(out.var_names) == list(ref.var_names)
    ref_rows = {tuple(r): str(t) for r, t in zip(xr, ref.obs["cell_type"])}
    assert all(ref_rows[tuple(r)] == t for r, t in zip(x, req["cell_type"]))  # each row a ref cell of its label
    t0 = x[(req["cell_type"] == "T0").to_numpy()]
    assert len({tuple(r) for r in t0}) == 36  # without replacement while the label has enough cells
    np.testing.assert_array_equal(label_matched_cells(ref, "cell_type", req, seed=0).X.toarray(), x)
    assert not np.array_equal(label_matched_cells(ref, "cell_type", req, seed=1).X.toarray(), x)
    many = label_matched_cells(ref, "cell_type", pd.DataFrame({"cell_type": ["T1"] * 100}), seed=0)
    assert many.n_obs == 100  # more than the label has: with replacement
    with pytest.raises(ScldmError, match="label_matched_cells.*no reference cells"):
        label_matched_cells(ref, "cell_type", pd.DataFrame({"cell_type": ["nope"]}))


def test_real_vs_real_split():
    a = make_adata(50, seed=4)
    h1, h2 = real_vs_real_split(a, seed=0)
    assert h1.n_obs == 75 and h2.n_obs == 75
    assert set(h1.obs_names).isdisjoint(h2.obs_names)
    assert set(h1.obs_names) | set(h2.obs_names) == set(a.obs_names)


# ----------------------------------------------------------------------------- evaluate


KEYS = ["w2", "mmd", "fd", "nn1", "precision", "recall", "density", "coverage", "mean_r2",
        "var_r2", "var_ratio", "knn_acc/cell_type", "knn_acc/donor", "per_condition"]


def test_evaluate_writes_json_and_png(tmp_path):
    ref = make_adata(100, seed=1)
    gen = make_adata(80, seed=2)
    out_json = tmp_path / "eval" / "metrics.json"
    png = tmp_path / "eval" / "report.png"
    with pytest.warns(UserWarning, match="batch"):
        res = evaluate(ref, gen, ["cell_type", "donor", "batch"], out_json=str(out_json),
                       report_path=str(png), **FAST)
    for k in KEYS:
        assert k in res, k
    assert "knn_acc/batch" not in res
    on_disk = json.loads(out_json.read_text())
    assert set(KEYS) <= set(on_disk)
    assert on_disk["w2"] == pytest.approx(res["w2"])
    pc = on_disk["per_condition"]["cell_type"]
    assert set(pc) == set(TYPES)
    assert pc["T0"]["n_ref"] == 100 and pc["T0"]["n_gen"] == 80
    assert pc["T1"]["w2"] > 0 and pc["T1"]["mmd"] >= 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path / "eval")) == ["metrics.json", "report.png"]  # no temp files
    # same distribution: close to the ideal values
    assert res["knn_acc/cell_type"] > 0.95
    assert res["mean_r2"] > 0.9
    assert 0.3 < res["nn1"] < 0.75
    # deterministic
    again = evaluate(ref, gen, ["cell_type"], per_condition=False, **FAST)
    assert again["w2"] == res["w2"] and again["mmd"] == res["mmd"]
    assert "per_condition" not in again


def test_evaluate_gene_mismatch_aligns():
    ref = make_adata(60, seed=1)
    gen = make_adata(60, seed=2)[:, 30:].copy()
    with pytest.warns(UserWarning, match="dropped 30 reference genes"):
        res = evaluate(ref, gen, ["cell_type"], per_condition=False, **FAST)
    assert res["n_genes"] == N_GENES - 30
    assert np.isfinite(res["w2"])


def test_compare_real_vs_real_beats_naive(tmp_path):
    data = make_adata(200, seed=5)
    half_a, half_b = real_vs_real_split(data, seed=0)
    naive = shuffled_genes(half_b, seed=1)
    indep = independent_genes_baseline(half_a, "cell_type", half_b.obs[["cell_type"]], seed=0)
    results = compare(half_a, {"real_vs_real": half_b, "independent": indep, "shuffled": naive},
                      ["cell_type"], out_json=str(tmp_path / "cmp.json"),
                      report_dir=str(tmp_path / "reports"), per_condition=False, **FAST)
    real, ind, shuf = results["real_vs_real"], results["independent"], results["shuffled"]
    assert real["w2"] < shuf["w2"] and real["mmd"] < shuf["mmd"]
    assert real["fd"] < shuf["fd"] and real["nn1"] < shuf["nn1"]
    assert real["w2"] < ind["w2"]
    assert ind["knn_acc/cell_type"] > shuf["knn_acc/cell_type"]
    assert json.loads((tmp_path / "cmp.json").read_text()).keys() == results.keys()
    assert (tmp_path / "reports" / "shuffled.png").read_bytes().startswith(b"\x89PNG")

    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "w2", "mmd", "fd", "nn1", "knn_acc/cell_type"]
    assert [ln.split()[0] for ln in lines[2:]] == ["real_vs_real", "independent", "shuffled"]
    assert len({len(ln) for ln in lines[:2]}) == 1  # header and rule aligned
    assert f"{real['w2']:.4g}" in lines[2]
    assert format_table({"x": {"w2": 1.0}}, keys=("w2", "mmd")).splitlines()[2].split() == ["x", "1", "-"]


# ----------------------------------------------------------------------------- report


def test_write_report_html_and_umap_fallback(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ref_np, gen_np = rng.standard_normal((80, 5)), rng.standard_normal((60, 5)) + 1
    gene_stats = {"mean_real_g": rng.random(20), "mean_gen_g": rng.random(20),
                  "var_real_g": rng.random(20), "var_gen_g": rng.random(20)}
    metrics = {"w2": 1.25, "mmd": 0.01, "per_condition": {"x": {}}}
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` fails -> PCA-2
    html_path = tmp_path / "r.html"
    write_report(str(html_path), ref_np, gen_np, ["a"] * 80, ["b"] * 60, metrics, gene_stats,
                 embedding="auto")
    page = html_path.read_text()
    assert "<td>w2</td><td>1.25</td>" in page
    b64 = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(b64).startswith(b"\x89PNG")
    png_path = tmp_path / "r.png"
    write_report(str(png_path), ref_np, gen_np, None, None, metrics, None, embedding="pca")
    assert png_path.read_bytes().startswith(b"\x89PNG")
