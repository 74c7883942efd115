"""prepare on multi-study inputs: the global cell order, counts where files keep them, label-column
checks, and the study mixing of the batches it leads to."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.data.harmonize import prepare_h5ad, prepare_soma
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

E = [f"ENSG0000000000{i}" for i in range(1, 6)]
SYMBOLS = ["A1", "B2", "C3", "D4", "E5"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[str]:
    """8 differently composed studies (cell-type mix, depth, gene panel), counts in X / .raw.X / a layer."""
    from scldm_scale.data.synthetic import write_synthetic_studies

    out = tmp_path_factory.mktemp("studies") / "in"
    return write_synthetic_studies(out, n_cells=2400, n_genes=300, n_studies=8, genes_per_cell=40, n_cell_types=6,
                                   layouts=("X", "raw", "layer"), seed=1, progress=False)


def _rows(out: Path) -> ad.AnnData:
    meta = json.loads((out / "metadata.json").read_text())
    return ad.concat([ad.read_h5ad(out / s["file"]) for s in meta["shards"]], merge="same")


def _input_counts(path: str) -> tuple[sp.csr_matrix, pd.Index, pd.Index]:
    a = ad.read_h5ad(path)
    if a.raw is not None:
        return sp.csr_matrix(a.raw.X), a.obs_names, a.raw.var_names
    x = a.layers["counts"] if "counts" in a.layers else a.X
    return sp.csr_matrix(x), a.obs_names, a.var_names


def test_global_order_is_a_seeded_permutation_and_idempotent(studies, tmp_path):
    labels = ["cell_type", "study"]
    res = prepare_h5ad(studies, tmp_path / "a", shard_size=300, labels=labels, seed=5, progress=False)
    meta = res.meta
    assert meta["order"] == {"kind": "global-random", "seed": 5} and meta["n_cells"] == 2400
    assert [i["counts_from"] for i in meta["inputs"]] == ["X", "raw", "layer:counts"] * 2 + ["X", "raw"]
    rows = _rows(tmp_path / "a")
    np.testing.assert_array_equal(rows.obs["cell_index"].to_numpy(), np.arange(2400))
    # a permutation of the inputs' cells: each exactly once, with its own counts
    names = [f"study_{s:02d}:{n}" for s, p in enumerate(studies) for n in ad.read_h5ad(p, backed="r").obs_names]
    assert sorted(rows.obs_names) == sorted(names)
    vocab = GeneVocab.load(tmp_path / "a" / "vocab.json")
    col = pd.Index(vocab.gene_ids)
    for s, path in enumerate(studies):
        x, obs_names, var_names = _input_counts(path)
        got = rows[[f"study_{s:02d}:{n}" for n in obs_names]].X.toarray()
        np.testing.assert_array_equal(got[:, col.get_indexer(var_names)], x.toarray())
        assert got.sum() == x.sum()  # nothing outside the file's panel
    # mixed across inputs: consecutive cells rarely come from the same study, every shard holds all 8
    study = rows.obs["source_file"].astype(str).to_numpy()
    assert (study[1:] == study[:-1]).mean() < 0.3
    for shard in meta["shards"]:
        assert ad.read_h5ad(tmp_path / "a" / shard["file"]).obs["source_file"].nunique() == 8
    # seeded: the same seed gives the same bytes elsewhere, another seed another order
    prepare_h5ad(studies, tmp_path / "b", shard_size=300, labels=labels, seed=5, progress=False)
    for name in [s["file"] for s in meta["shards"]] + ["vocab.json", "labels.json"]:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    prepare_h5ad(studies, tmp_path / "c", shard_size=300, labels=labels, seed=6, progress=False)
    other = _rows(tmp_path / "c")
    assert sorted(other.obs_names) == sorted(rows.obs_names) and list(other.obs_names) != list(rows.obs_names)
    # idempotent: a re-run is up to date and writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert prepare_h5ad(studies, tmp_path / "a", shard_size=300, labels=labels, seed=5, progress=False).up_to_date
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == stamps


def test_soma_experiment_has_the_same_global_order(studies, tmp_path):
    import tiledbsoma

    prepare_h5ad(studies[:3], tmp_path / "h5", shard_size=400, labels=["cell_type"], seed=2, progress=False)
    prepare_soma(studies[:3], tmp_path / "soma", labels=["cell_type"], seed=2, progress=False)
    rows = _rows(tmp_path / "h5")
    with tiledbsoma.Experiment.open(str(tmp_path / "soma")) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas()
        x = exp.axis_query("RNA").to_anndata("data").X
    assert obs["obs_id"].tolist() == list(rows.obs_names) and obs["soma_joinid"].tolist() == list(range(rows.n_obs))
    assert (sp.csr_matrix(x) != rows.X).nnz == 0


def study_mixing_of_prepared(studies, out, batch_size=64, n_batches=30):
    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.loader import build_source
    from scldm_scale.data.mixing import source_study_mixing, study_of_cells

    prepare_h5ad(studies, out, shard_size=300, labels=["cell_type"], seed=0, progress=False)
    source = build_source(DataConfig(path=str(out), batch_size=batch_size, label_columns=["cell_type"], seed=3))
    return source_study_mixing(source.batches(), study_of_cells(out), n_batches=n_batches), study_of_cells(out)


def test_batches_of_a_prepared_atlas_mix_studies(studies, tmp_path):
    from scldm_scale.data.mixing import study_mixing

    figure, study_n = study_mixing_of_prepared(studies, tmp_path / "atlas")
    assert figure >= 0.95
    # batches cut in input order (what the shards held before the global order): one study each
    in_input_order = np.sort(study_n)
    assert study_mixing([in_input_order[i * 64 : (i + 1) * 64] for i in range(30)], study_n) < 0.05


# ---------------------------------------------------------------------------------------------
# counts where files keep them


COUNTS = np.array([[3, 0, 1, 0, 2], [0, 5, 0, 1, 0], [1, 1, 0, 0, 7], [0, 0, 4, 2, 0]], dtype=np.int64)


def _normalized(counts) -> np.ndarray:
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)


def write_counts_inputs(d: Path) -> dict[str, Path]:
    """Hand-made files: CELLxGENE-like (normalized X over 3 genes + raw counts over 5, symbols in var only),
    a counts layer under normalized X, plain counts in X, and normalized X with nowhere else to look."""
    d.mkdir(parents=True, exist_ok=True)
    obs = pd.DataFrame({"cell_type": ["T", "B", "T", "NK"]}, index=[f"c{i}" for i in range(4)])
    full_var = pd.DataFrame({"feature_name": SYMBOLS}, index=E)
    norm = ad.AnnData(X=sp.csr_matrix(_normalized(COUNTS)[:, :3]), obs=obs,
                      var=pd.DataFrame({"feature_name": SYMBOLS[:3]}, index=E[:3]))
    norm.raw = ad.AnnData(X=sp.csr_matrix(COUNTS.astype(np.float32)), obs=obs, var=pd.DataFrame(index=E))
    layer = ad.AnnData(X=sp.csr_matrix(_normalized(COUNTS + 1)), obs=obs, var=full_var,
                       layers={"counts": sp.csr_matrix(COUNTS + 1)})
    plain = ad.AnnData(X=sp.csr_matrix(COUNTS + 2), obs=obs, var=full_var)
    only_norm = ad.AnnData(X=sp.csr_matrix(_normalized(COUNTS)), obs=obs, var=full_var)
    paths = {}
    for name, adata in (("norm", norm), ("layer", layer), ("plain", plain), ("only_norm", only_norm)):
        paths[name] = d / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    return paths


@pytest.fixture
def counts_inputs(tmp_path) -> dict[str, Path]:
    return write_counts_inputs(tmp_path / "in")


def _by_file(out: Path, stem: str) -> np.ndarray:
    rows = _rows(out)
    return rows[[f"{stem}:c{i}" for i in range(4)]].X.toarray()


def test_counts_auto_reads_x_raw_or_the_counts_layer(counts_inputs, tmp_path, capsys):
    files = [counts_inputs[k] for k in ("norm", "layer", "plain")]
    res = prepare_h5ad(files, tmp_path / "out", shard_size=5, progress=True)
    err = capsys.readouterr().err
    assert [i["counts_from"] for i in res.meta["inputs"]] == ["raw", "layer:counts", "X"]
    assert "norm.h5ad: counts from .raw.X (integer-valued; X holds non-integer values" in err
    assert "layer.h5ad: counts from layers['counts'] (integer-valued; X holds non-integer values" in err
    assert "plain.h5ad: counts from X (integer-valued)" in err
    np.testing.assert_array_equal(_by_file(tmp_path / "out", "norm"), COUNTS)  # all 5 genes of .raw
    np.testing.assert_array_equal(_by_file(tmp_path / "out", "layer"), COUNTS + 1)
    np.testing.assert_array_equal(_by_file(tmp_path / "out", "plain"), COUNTS + 2)
    vocab = GeneVocab.load(tmp_path / "out" / "vocab.json")
    assert vocab.gene_ids == E and vocab.symbols == SYMBOLS  # symbols kept next to the ids
    assert list(ad.read_h5ad(tmp_path / "out" / "shard_0000.h5ad").var["gene_symbol"]) == SYMBOLS


def test_counts_named_explicitly(counts_inputs, tmp_path):
    res = prepare_h5ad([counts_inputs["norm"]], tmp_path / "raw", counts="raw", progress=False)
    assert res.meta["inputs"][0]["counts_from"] == "raw" and res.meta["options"]["counts"] == "raw"
    np.testing.assert_array_equal(_by_file(tmp_path / "raw", "norm"), COUNTS)
    prepare_h5ad([counts_inputs["layer"]], tmp_path / "layer", counts="layer:counts", progress=False)
    np.testing.assert_array_equal(_by_file(tmp_path / "layer", "layer"), COUNTS + 1)
    prepare_h5ad([counts_inputs["plain"]], tmp_path / "x", counts="X", progress=False)
    np.testing.assert_array_equal(_by_file(tmp_path / "x", "plain"), COUNTS + 2)


@pytest.mark.parametrize(
    "files, counts, match",
    [
        (["norm", "layer"], "raw", r"layer.h5ad: --counts raw but the file has no \.raw\.X \(present: X, layers "
                                   r"\['counts'\]\); name a field the file has, or use --counts auto"),
        (["norm"], "X", r"norm.h5ad: X has non-integer values \(e.g. .*\); store raw integer counts in X or point "
                        r"--counts at them"),
        (["plain"], "layer:umis", r"plain.h5ad: --counts layer:umis but the file has no layers\['umis'\]"),
        (["only_norm"], "auto", r"only_norm.h5ad: no raw integer counts found \(X holds non-integer values .*no "
                                r"\.raw\.X; no layers\['counts'\]; layers: \[\]\)"),
        (["plain"], "counts", r"--counts 'counts': choose one of auto\|X\|raw\|layer:NAME"),
    ],
)
def test_counts_errors_name_the_file_the_field_and_the_fix(counts_inputs, tmp_path, files, counts, match):
    with pytest.raises(ScldmError, match=match) as err:
        prepare_h5ad([counts_inputs[f] for f in files], tmp_path / "out", counts=counts, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_label_column_no_input_has_is_an_error(counts_inputs, tmp_path):
    files = [counts_inputs["plain"], counts_inputs["layer"]]
    with pytest.raises(ScldmError, match=r"--labels celltype: no input has obs column 'celltype' \(obs columns of the "
                                          r"inputs: \['cell_type'\]\); did you mean 'cell_type'\? fix --labels"):
        prepare_h5ad(files, tmp_path / "out", labels=["cell_type", "celltype"], progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))
    assert os.listdir(tmp_path) == ["in"]
