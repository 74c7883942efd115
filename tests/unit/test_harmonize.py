"""Harmonizing prepare on a hand-made example: 3 tiny h5ad files with different genes and obs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.data import writers
from scldm_scale.data.harmonize import prepare_h5ad, prepare_soma
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

LABELS = ["cell_type", "tissue", "donor"]
INPUT_ORDER = ["a:c0", "a:c1", "a:c2", "b:c0", "b:c1", "c:x", "c:y"]  # obs names of the example's cells
E = [f"ENSG0000000000{i}" for i in range(1, 6)]  # E[0] = gene G1 ... E[4] = gene G5

# Harmonized cells x vocabulary (E1..E5, sorted) in input order a0 a1 a2 b0 b1 c0 c1 (the shards hold
# them in a seeded random order; `in_input_order` puts them back):
#  a.h5ad: Ensembl var_names E1 E2 E3 (symbols in var['gene_symbols'])
#  b.h5ad: symbol var_names G4 G2 G5, Ensembl ids in var['gene_ids'] (G2 with a version suffix), float counts
#  c.h5ad: symbols only G3 G1 XYZ (G3, G1 translated through a's pairs; XYZ dropped), dense int64 X
EXPECTED_X = np.array(
    [
        [1, 0, 2, 0, 0],
        [0, 3, 0, 0, 0],
        [4, 0, 5, 0, 0],
        [0, 2, 0, 1, 0],
        [0, 0, 0, 0, 7],
        [1, 0, 1, 0, 0],
        [2, 0, 0, 0, 0],
    ]
)
EXPECTED_OBS = {
    "cell_type": ["T", "B", "T", "B", "NK", "T", "unknown"],  # c1 is NaN
    "tissue": ["lung", "blood", "lung", "unknown", "unknown", "liver", "lung"],  # b has no tissue column
    "donor": ["d1", "d1", "d2", "d3", "unknown", "7", "7"],  # b1 is None, c's donors are ints
}
EXPECTED_CATEGORIES = {
    "cell_type": ["B", "NK", "T", "unknown"],
    "tissue": ["blood", "liver", "lung", "unknown"],
    "donor": ["7", "d1", "d2", "d3", "unknown"],
}


def write_example(d: Path) -> list[Path]:
    """Write the three example inputs into ``d``; returns their paths."""
    d.mkdir(parents=True, exist_ok=True)
    a = ad.AnnData(
        X=sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 5]], dtype=np.int32)),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(["T", "B", "T"]), "tissue": ["lung", "blood", "lung"],
             "donor": ["d1", "d1", "d2"]},
            index=["c0", "c1", "c2"],
        ),
        var=pd.DataFrame({"gene_symbols": ["G1", "G2", "G3"]}, index=E[:3]),
    )
    b = ad.AnnData(
        X=sp.csr_matrix(np.array([[1, 2, 0], [0, 0, 7]], dtype=np.float32)),
        obs=pd.DataFrame({"cell_type": ["B", "NK"], "donor": ["d3", None]}, index=["c0", "c1"]),
        var=pd.DataFrame({"gene_ids": [E[3], E[1] + ".7", E[4]]}, index=["G4", "G2", "G5"]),
    )
    c = ad.AnnData(
        X=np.array([[1, 1, 9], [0, 2, 0]], dtype=np.int64),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(["T", None]), "tissue": ["liver", "lung"], "donor": [7, 7]}, index=["x", "y"]
        ),
        var=pd.DataFrame(index=["G3", "G1", "XYZ"]),
    )
    paths = []
    for name, adata in (("a", a), ("b", b), ("c", c)):
        adata.write_h5ad(d / f"{name}.h5ad")
        paths.append(d / f"{name}.h5ad")
    return paths


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    return write_example(tmp_path / "in")


def read_shards(out: Path) -> ad.AnnData:
    """The shards of ``out`` concatenated (row order = cell_index)."""
    meta = json.loads((out / "metadata.json").read_text())
    return ad.concat([ad.read_h5ad(out / s["file"]) for s in meta["shards"]], merge="same")


def in_input_order(adata: ad.AnnData) -> ad.AnnData:
    """The example's cells in input order (a0 a1 a2 b0 b1 c0 c1), whatever order they were written in."""
    return adata[[n for n in INPUT_ORDER if n in adata.obs_names]].copy()


def test_heterogeneous_inputs_harmonize_to_expected_matrix(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    res = prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, progress=True)
    err = capsys.readouterr().err
    assert not res.up_to_date
    assert "b.h5ad: obs column 'tissue' is missing" in err and "warning:" in err
    assert "c.h5ad: kept 2 of 3 genes (1 not in the vocabulary)" in err
    assert "a.h5ad: kept 3 of 3 genes (0 not in the vocabulary)" in err

    meta = res.meta
    assert [s["n_cells"] for s in meta["shards"]] == [3, 3, 1] == meta["shard_sizes"]
    assert sorted(os.listdir(out)) == ["labels.json", "metadata.json", "shard_0000.h5ad", "shard_0001.h5ad",
                                       "shard_0002.h5ad", "vocab.json"]
    assert meta["n_cells"] == 7 and meta["n_genes"] == 5 and meta["gene_id_space"] == "ensembl"
    assert [i["n_genes_dropped"] for i in meta["inputs"]] == [0, 0, 1]
    assert [i["missing_label_columns"] for i in meta["inputs"]] == [[], ["tissue"], []]
    assert meta["label_categories"] == EXPECTED_CATEGORIES
    assert all({"size", "mtime", "path"} <= set(i) for i in meta["inputs"]) and len(meta["fingerprint"]) == 64

    assert GeneVocab.load(out / "vocab.json").gene_ids == E
    assert LabelTables.load(out / "labels.json").categories == EXPECTED_CATEGORIES

    shards = [ad.read_h5ad(out / s["file"]) for s in meta["shards"]]
    for s in shards:  # identical var and category lists in every shard (what cellarium requires)
        assert list(s.var_names) == E and list(s.var["gene_symbol"]) == ["G1", "G2", "G3", "G4", "G5"]
        assert sp.issparse(s.X) and s.X.dtype == np.int32 and s.X.shape[1] == 5
        for col, cats in EXPECTED_CATEGORIES.items():
            assert list(s.obs[col].cat.categories) == cats
        assert list(s.obs["source_file"].cat.categories) == ["a.h5ad", "b.h5ad", "c.h5ad"]
    rows = read_shards(out)
    assert rows.obs["cell_index"].tolist() == list(range(7)) and rows.obs["cell_index"].dtype == np.int64
    assert sorted(rows.obs_names) == INPUT_ORDER and list(rows.obs_names) != INPUT_ORDER  # shuffled across inputs
    full = in_input_order(rows)
    np.testing.assert_array_equal(full.X.toarray(), EXPECTED_X)
    for col, values in EXPECTED_OBS.items():
        assert full.obs[col].astype(str).tolist() == values, col
    assert full.obs["source_file"].astype(str).tolist() == ["a.h5ad"] * 3 + ["b.h5ad"] * 2 + ["c.h5ad"] * 2
    assert [i["counts_from"] for i in meta["inputs"]] == ["X", "X", "X"]
    assert "a.h5ad: counts from X (integer-valued)" in err
    assert GeneVocab.load(out / "vocab.json").symbols == ["G1", "G2", "G3", "G4", "G5"]


def test_min_files_and_given_vocab(inputs, tmp_path):
    meta = prepare_h5ad(inputs, tmp_path / "m2", labels=["cell_type"], min_files=2, progress=False).meta
    assert GeneVocab.load(tmp_path / "m2" / "vocab.json").gene_ids == E[:3]  # E4, E5 only in b.h5ad
    assert [i["n_genes_dropped"] for i in meta["inputs"]] == [0, 2, 1]
    np.testing.assert_array_equal(in_input_order(read_shards(tmp_path / "m2")).X.toarray(), EXPECTED_X[:, :3])

    GeneVocab([E[4], E[0], "ENSG00000000099"], version="mine").save(tmp_path / "v.json")
    prepare_h5ad(inputs, tmp_path / "v", vocab_path=tmp_path / "v.json", progress=False)
    assert GeneVocab.load(tmp_path / "v" / "vocab.json") == GeneVocab.load(tmp_path / "v.json")
    expected = np.c_[EXPECTED_X[:, [4, 0]], np.zeros(7, int)]  # E5, E1, and a gene no input has
    np.testing.assert_array_equal(in_input_order(read_shards(tmp_path / "v")).X.toarray(), expected)
    with pytest.raises(ScldmError, match="--min-files"):
        prepare_h5ad(inputs, tmp_path / "x", vocab_path=tmp_path / "v.json", min_files=2, progress=False)


def test_rerun_is_idempotent_and_changes_need_overwrite(inputs, tmp_path):
    out = tmp_path / "out"
    prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, progress=False)
    assert res.up_to_date and res.meta["n_cells"] == 7
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    with pytest.raises(ScldmError, match="--overwrite"):  # other options -> another fingerprint
        prepare_h5ad(inputs, out, shard_size=4, labels=LABELS, progress=False)
    os.utime(inputs[0], ns=(1, 1))  # an input changed
    with pytest.raises(ScldmError, match=str(out)):
        prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, progress=False)
    res = prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, overwrite=True, progress=False)
    assert not res.up_to_date and res.meta["inputs"][0]["mtime"] == 1e-9
    assert not list(tmp_path.glob("out.*"))


def test_interrupted_prepare_leaves_no_complete_looking_output(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = writers.write_h5ad
    calls = []

    def flaky(adata, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted midway through the shards
        real(adata, path)

    monkeypatch.setattr(writers, "write_h5ad", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_h5ad(inputs, out, shard_size=3, progress=False)
    assert not out.exists() and not list(tmp_path.glob("out*"))

    monkeypatch.setattr(writers, "write_h5ad", real)
    prepare_h5ad(inputs, out, shard_size=3, progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(writers, "write_h5ad", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_h5ad(inputs, out, shard_size=2, overwrite=True, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out"]

    # a killed run leaves <OUT>.tmp-<pid> with a dead pid: the next run removes it
    monkeypatch.setattr(writers, "write_h5ad", real)
    stale = tmp_path / "new.tmp-4194999"
    stale.mkdir()
    (stale / "shard_0000.h5ad").write_bytes(b"partial")
    prepare_h5ad(inputs, tmp_path / "new", progress=False)
    assert not stale.exists() and (tmp_path / "new" / "metadata.json").is_file()


def test_heldout_fraction_is_seeded(inputs, tmp_path):
    meta = prepare_h5ad(inputs, tmp_path / "h", labels=LABELS, heldout_fraction=0.5, seed=3, progress=False).meta
    again = prepare_h5ad(inputs, tmp_path / "h2", labels=LABELS, heldout_fraction=0.5, seed=3, progress=False).meta
    n_train, n_held = meta["n_cells"], meta["n_heldout"]
    assert n_train + n_held == 7 and n_held > 0 and n_train > 0 and meta["heldout"]["file"] == "heldout.h5ad"
    train, held = read_shards(tmp_path / "h"), ad.read_h5ad(tmp_path / "h" / "heldout.h5ad")
    assert held.n_obs == n_held and train.obs["cell_index"].tolist() == list(range(n_train))
    assert held.obs["cell_index"].tolist() == list(range(n_train, 7))
    assert list(held.obs["cell_type"].cat.categories) == EXPECTED_CATEGORIES["cell_type"]
    both = ad.concat([train, held])
    order = [INPUT_ORDER.index(n) for n in both.obs_names]
    np.testing.assert_array_equal(both.X.toarray(), EXPECTED_X[order])
    assert [INPUT_ORDER.index(n) for n in held.obs_names] == sorted(INPUT_ORDER.index(n) for n in held.obs_names)
    assert again["n_heldout"] == n_held and ad.read_h5ad(tmp_path / "h2" / "heldout.h5ad").obs_names.equals(
        held.obs_names)


def _bad(kind: str, d: Path) -> Path:
    """Write one bad input of ``kind`` into ``d`` and return its path."""
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"bad_{kind}.h5ad"
    good = ad.AnnData(X=sp.csr_matrix(np.array([[1, 0], [2, 3]], dtype=np.float32)),
                      obs=pd.DataFrame({"cell_type": ["T", "B"]}, index=["u", "v"]),
                      var=pd.DataFrame(index=[E[0], E[1]]))
    if kind == "corrupt":
        p.write_bytes(b"this is not an HDF5 file at all\n" * 10)
    elif kind == "zero_bytes":
        p.write_bytes(b"")
    elif kind == "truncated":
        good.write_h5ad(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "empty_anndata":
        good[:0].copy().write_h5ad(p)
    elif kind == "zero_vocab_genes":
        ad.AnnData(X=good.X, obs=good.obs, var=pd.DataFrame(index=["FOO", "BAR"])).write_h5ad(p)
    elif kind in ("float", "negative", "nan"):
        x = good.X.toarray()
        x[1, 1] = {"float": 1.5, "negative": -2.0, "nan": np.nan}[kind]
        ad.AnnData(X=sp.csr_matrix(x), obs=good.obs, var=good.var).write_h5ad(p)
    elif kind == "duplicated_ids":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # anndata: "Variable names are not unique"
            ad.AnnData(X=good.X, obs=good.obs, var=pd.DataFrame(index=[E[0], E[0]])).write_h5ad(p)
    elif kind == "missing_label":
        ad.AnnData(X=good.X, obs=pd.DataFrame(index=["u", "v"]), var=good.var).write_h5ad(p)
    else:
        raise ValueError(kind)
    return p


BAD_CASES = {
    "corrupt": "not a readable h5ad",
    "zero_bytes": "empty (0 bytes)",
    "truncated": "corrupt or truncated",
    "empty_anndata": "empty (0 cells",
    "zero_vocab_genes": "none of its 2 genes are in the gene vocabulary",
    "float": "non-integer",
    "negative": "negative",
    "nan": "NaN",
    "duplicated_ids": "duplicated gene ids",
    "missing_label": "obs column 'cell_type' is missing",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_names_the_file_and_the_problem(kind, inputs, tmp_path):
    bad = _bad(kind, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(ScldmError) as exc:
        prepare_h5ad([inputs[0], bad], out, require_labels=True, progress=False)
    msg = str(exc.value)
    assert bad.name in msg and BAD_CASES[kind] in msg, msg
    assert "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob("out.*"))


def test_missing_label_column_is_unknown_without_require_labels(inputs, tmp_path):
    bad = _bad("missing_label", tmp_path / "bad")
    prepare_h5ad([inputs[0], bad], tmp_path / "out", progress=False)
    full = read_shards(tmp_path / "out")
    by_name = dict(zip(full.obs_names, full.obs["cell_type"].astype(str)))
    assert [by_name[n] for n in ["a:c0", "a:c1", "a:c2", "bad_missing_label:u", "bad_missing_label:v"]] == [
        "T", "B", "T", "unknown", "unknown"]


def test_shards_load_in_h5ad_dataset_and_train_checks_label_columns(inputs, tmp_path):
    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.h5ad_source import H5ADSource
    from scldm_scale.data.loader import load_vocab_and_labels

    out = tmp_path / "out"
    prepare_h5ad(inputs, out, shard_size=3, labels=LABELS, progress=False)
    cfg = DataConfig(path=str(out), label_columns=LABELS, batch_size=2, shuffle=False, max_genes=8)
    vocab, labels = load_vocab_and_labels(cfg)
    assert vocab.symbols == ["G1", "G2", "G3", "G4", "G5"]
    ds = H5ADSource(cfg, vocab, labels)
    batch = next(ds.batches())
    assert batch["cell_index_n"].tolist() == [0, 1]
    first = [INPUT_ORDER.index(n) for n in read_shards(out).obs_names[:2]]  # input cells in rows 0, 1
    assert batch["library_size_n"].tolist() == [float(EXPECTED_X[i].sum()) for i in first]
    assert batch["labels_na"].tolist() == [[labels.code_of(a, EXPECTED_OBS[a][i]) for a in LABELS] for i in first]

    # prepared without 'tissue': training with data.label_columns including it fails cleanly
    prepare_h5ad(inputs, tmp_path / "ct", labels=["cell_type"], progress=False)
    cfg = DataConfig(path=str(tmp_path / "ct"), label_columns=["cell_type", "tissue"], batch_size=2)
    with pytest.raises(ScldmError, match="tissue"):
        H5ADSource(cfg, vocab, LabelTables({"cell_type": ["B"], "tissue": ["lung"]}))


def test_prepare_soma_matches_h5ad(inputs, tmp_path):
    import tiledbsoma

    prepare_h5ad(inputs, tmp_path / "h5", labels=LABELS, progress=False)
    rows = read_shards(tmp_path / "h5")
    h5_nnz = rows.X.nnz
    out = tmp_path / "soma"
    res = prepare_soma(inputs, out, labels=LABELS, progress=False)
    assert res.meta["format"] == "scldm-scale/soma-experiment" and res.meta["nnz"] == h5_nnz
    assert {"vocab.json", "labels.json", "metadata.json", "obs", "ms"} <= set(os.listdir(out))
    assert GeneVocab.load(out / "vocab.json").gene_ids == E
    with tiledbsoma.Experiment.open(str(out)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        x = exp.ms["RNA"].X["data"]
        assert x.nnz == h5_nnz and tuple(x.shape) == (7, 5)
        adata = exp.axis_query("RNA").to_anndata("data")
    assert obs["soma_joinid"].tolist() == obs["cell_index"].tolist() == list(range(7))
    assert obs["obs_id"].tolist() == list(rows.obs_names)  # the same global order as the shards
    order = [INPUT_ORDER.index(n) for n in obs["obs_id"]]
    for col, values in EXPECTED_OBS.items():
        assert obs[col].astype(str).tolist() == [values[i] for i in order]
        assert list(obs[col].cat.categories) == EXPECTED_CATEGORIES[col]
    assert var["var_id"].tolist() == E and var["gene_symbol"].tolist() == ["G1", "G2", "G3", "G4", "G5"]
    np.testing.assert_array_equal(adata.X.toarray(), EXPECTED_X[order])
    assert prepare_soma(inputs, out, labels=LABELS, progress=False).up_to_date
