"""Synthetic atlas generator: format, statistics, biology, determinism, atomicity."""

from __future__ import annotations

import json
import os

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from scldm_scale.data import writers
from scldm_scale.data.labels import UNKNOWN, LabelTables
from scldm_scale.data.synthetic import write_synthetic_atlas, write_synthetic_studies
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError


def _read_all(path: str, meta: dict) -> list[anndata.AnnData]:
    return [anndata.read_h5ad(os.path.join(path, s["file"])) for s in meta["shards"]]


def test_shards_share_var_and_categories(tiny_atlas, tiny_atlas_meta):
    path, meta = str(tiny_atlas), tiny_atlas_meta
    shards = _read_all(path, meta)
    heldout = anndata.read_h5ad(os.path.join(path, "heldout.h5ad"))
    ref = shards[0]
    assert ref.var_names[0] == "ENSSYN00000000001" and "gene_symbol" in ref.var
    for ad in [*shards[1:], heldout]:
        assert ad.var.equals(ref.var)
        for col in ("cell_type", "tissue", "donor"):
            assert isinstance(ad.obs[col].dtype, pd.CategoricalDtype)
            assert list(ad.obs[col].cat.categories) == list(ref.obs[col].cat.categories)
            assert list(ad.obs[col].cat.categories) == meta["label_categories"][col]
    cell_index = np.concatenate([ad.obs["cell_index"].to_numpy() for ad in shards])
    np.testing.assert_array_equal(cell_index, np.arange(meta["n_cells"]))
    np.testing.assert_array_equal(heldout.obs["cell_index"], np.arange(meta["n_cells"], 500))
    names = pd.Index(np.concatenate([ad.obs_names for ad in [*shards, heldout]]))
    assert names.is_unique
    assert all(scipy.sparse.isspmatrix_csr(ad.X) and ad.X.dtype == np.int32 for ad in shards)


def test_count_statistics(tiny_atlas, tiny_atlas_meta):
    x = scipy.sparse.vstack([ad.X for ad in _read_all(str(tiny_atlas), tiny_atlas_meta)]).tocsr()
    assert x.data.min() >= 0 and np.issubdtype(x.dtype, np.integer)
    sparsity = 1.0 - (x.toarray() > 0).mean()
    assert 0.80 <= sparsity <= 0.95, sparsity
    lib = np.asarray(x.sum(axis=1)).ravel()
    q01, q99 = np.quantile(lib, [0.01, 0.99])
    assert q99 / q01 >= 8.0, (q01, q99)
    assert tiny_atlas_meta["sparsity"] == pytest.approx(
        1.0 - (x.nnz + anndata.read_h5ad(os.path.join(str(tiny_atlas), "heldout.h5ad")).X.nnz) / (500 * 200)
    )


def _pca_features(x: np.ndarray, basis=None, k: int = 10):
    lib = x.sum(axis=1, keepdims=True)
    y = np.log1p(x / np.maximum(lib, 1) * 1e4)
    if basis is None:
        mean = y.mean(axis=0)
        _, _, vt = np.linalg.svd(y - mean, full_matrices=False)
        basis = (mean, vt[:k].T)
    mean, v = basis
    return (y - mean) @ v, basis


def test_cell_types_separable_on_heldout(tiny_atlas, tiny_atlas_meta):
    """Nearest-centroid in PCA of log1p-normalized counts, fit on shards, scored on held-out cells."""
    train = anndata.concat(_read_all(str(tiny_atlas), tiny_atlas_meta))
    test = anndata.read_h5ad(os.path.join(str(tiny_atlas), "heldout.h5ad"))
    z_train, basis = _pca_features(train.X.toarray().astype(float))
    z_test, _ = _pca_features(test.X.toarray().astype(float), basis)
    y_train = train.obs["cell_type"].cat.codes.to_numpy()
    y_test = test.obs["cell_type"].cat.codes.to_numpy()
    types = np.unique(y_train)
    centroids = np.stack([z_train[y_train == t].mean(axis=0) for t in types])
    pred = types[((z_test[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)]
    assert (pred == y_test).mean() > 0.9
    # and it is not trivially separable by chance: shuffled labels score low
    rng = np.random.default_rng(0)
    assert (pred == rng.permutation(y_test)).mean() < 0.5


def test_metadata_vocab_labels_match_files(tiny_atlas, tiny_atlas_meta):
    path, meta = str(tiny_atlas), tiny_atlas_meta
    with open(os.path.join(path, "metadata.json")) as f:
        assert json.load(f) == json.loads(json.dumps(meta))
    shards = _read_all(path, meta)
    assert [ad.n_obs for ad in shards] == meta["shard_sizes"] == [150, 150, 150]
    assert sorted(f for f in os.listdir(path) if f.endswith(".h5ad")) == [
        "heldout.h5ad",
        "shard_0000.h5ad",
        "shard_0001.h5ad",
        "shard_0002.h5ad",
    ]
    assert meta["n_cells"] == 450 and meta["n_heldout"] == 50 and meta["n_cells_total"] == 500
    assert meta["heldout"] == {"file": "heldout.h5ad", "n_cells": 50}
    assert meta["n_genes"] == 200 and meta["seed"] == 0
    vocab = GeneVocab.load(os.path.join(path, "vocab.json"))
    assert vocab.gene_ids == list(shards[0].var_names) and vocab.symbols == list(shards[0].var["gene_symbol"])
    labels = LabelTables.load(os.path.join(path, "labels.json"))
    assert labels.attributes == ["cell_type", "tissue", "donor"]
    assert labels.categories["cell_type"] == meta["label_categories"]["cell_type"] + [UNKNOWN]
    assert labels.cardinalities == [9, 5, 7]


def test_deterministic_by_seed(tmp_path):
    kw = dict(n_cells=60, n_genes=40, n_shards=2, n_cell_types=3, progress=False)
    write_synthetic_atlas(tmp_path / "a", seed=1, **kw)
    write_synthetic_atlas(tmp_path / "b", seed=1, **kw)
    write_synthetic_atlas(tmp_path / "c", seed=2, **kw)
    for shard in ("shard_0000.h5ad", "shard_0001.h5ad"):
        a, b, c = (anndata.read_h5ad(tmp_path / d / shard) for d in "abc")
        assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
        assert (a.X != c.X).nnz > 0


def test_atomic_when_a_shard_write_fails(tmp_path, monkeypatch):
    calls = []
    real = writers.write_h5ad

    def failing(adata, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full")
        real(adata, path)

    monkeypatch.setattr(writers, "write_h5ad", failing)
    out = tmp_path / "atlas"
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_atlas(out, n_cells=40, n_genes=20, n_shards=2, progress=False)
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []  # neither the atlas nor its temp sibling is left behind


def test_refuses_existing_output_and_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ScldmError, match="already exists"):
        write_synthetic_atlas(tmp_path / "full", n_cells=20, n_genes=20, n_shards=1, progress=False)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    with pytest.raises(ScldmError, match="n_shards"):
        write_synthetic_atlas(tmp_path / "x", n_cells=3, n_genes=20, n_shards=5, progress=False)
    with pytest.raises(ScldmError, match="heldout_fraction"):
        write_synthetic_atlas(tmp_path / "x", n_cells=30, n_genes=20, n_shards=1, heldout_fraction=1.5, progress=False)


def test_overwrite_replaces_existing_atlas(tmp_path):
    kw = dict(n_cells=30, n_genes=20, n_shards=1, progress=False)
    write_synthetic_atlas(tmp_path / "a", seed=1, **kw)
    meta = write_synthetic_atlas(tmp_path / "a", seed=2, overwrite=True, **{**kw, "n_shards": 2})
    assert meta["seed"] == 2 and sorted(os.listdir(tmp_path)) == ["a"]
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".h5ad")) == ["shard_0000.h5ad", "shard_0001.h5ad"]


def test_studies_differ_in_composition_depth_and_panel(tmp_path):
    paths = write_synthetic_studies(tmp_path / "studies", n_cells=2400, n_genes=400, n_studies=4, genes_per_cell=60,
                                    n_cell_types=5, layouts=("X", "raw", "layer"), seed=3, progress=False)
    assert [os.path.basename(p) for p in paths] == [f"study_{i:02d}.h5ad" for i in range(4)]
    studies = [anndata.read_h5ad(p) for p in paths]
    assert sum(a.n_obs for a in studies) == 2400
    counts = [studies[0].X, studies[1].raw.X, studies[2].layers["counts"], studies[3].X]
    for a, x in zip(studies, counts):
        assert scipy.sparse.isspmatrix_csr(x) and np.issubdtype(x.dtype, np.integer) and x.data.min() >= 1
        assert list(a.obs.columns) == ["cell_type", "tissue", "donor", "study"] and a.obs["study"].nunique() == 1
        assert a.var_names[0].startswith("ENSSYN") and "feature_name" in a.var
    assert np.issubdtype(studies[1].X.dtype, np.floating) and (studies[1].X.data != np.round(studies[1].X.data)).any()
    assert studies[1].raw.var_names.equals(studies[1].var_names)
    # gene panels: study 0 measures every gene, the others a subset
    assert studies[0].n_vars == 400 and all(300 <= a.n_vars < 400 for a in studies[1:])
    # depth: genes per cell near the target on average, and different between studies
    genes = [np.diff(x.indptr).mean() for x in counts]
    assert 30 < np.mean(genes) < 100 and max(genes) / min(genes) > 1.2
    # composition: cell-type proportions differ between studies
    props = np.stack([a.obs["cell_type"].value_counts(normalize=True).reindex(
        [f"celltype_{i}" for i in range(5)], fill_value=0).to_numpy() for a in studies])
    assert np.abs(props - props.mean(0)).max() > 0.1
    # deterministic by seed
    again = write_synthetic_studies(tmp_path / "again", n_cells=2400, n_genes=400, n_studies=4, genes_per_cell=60,
                                    n_cell_types=5, layouts=("X", "raw", "layer"), seed=3, progress=False)
    b = anndata.read_h5ad(again[3])
    assert (b.X != studies[3].X).nnz == 0 and b.obs.equals(studies[3].obs)


def test_study_counts_follow_the_multinomial_profile():
    from scldm_scale.data.synthetic import StudySampler

    rng = np.random.default_rng(0)
    sampler = StudySampler(rng.normal(0.0, 2.0, (3, 200)))
    rows = np.repeat(np.arange(3), 3000)
    x = sampler.sample(rows, np.full(len(rows), 150), np.random.default_rng(1))
    assert (np.asarray(x.sum(axis=1)).ravel() == 150).all()  # every UMI lands on one gene
    assert x.has_canonical_format  # one entry per (cell, gene), sorted
    for r in range(3):
        mean_g = np.asarray(x[rows == r].mean(axis=0)).ravel()
        np.testing.assert_allclose(mean_g, 150 * sampler.p_rg[r], atol=0.25)
    assert abs(x.getnnz(axis=1).mean() - sampler.expected_genes(150)) < 1.0
