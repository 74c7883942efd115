"""The Python API on the tiny trained pipeline: encode, generate, reconstruct, transfer, evaluate."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scldm_scale as sl
from scldm_scale.errors import ScldmError
from tests.cli_utils import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(pipeline):
    return sl.ScLDM.load(pipeline / "ldm", device="cpu")


@pytest.fixture(scope="module")
def heldout(pipeline):
    return ad.read_h5ad(pipeline / "data" / "heldout.h5ad")


def test_load_knows_its_parts(model, pipeline):
    assert model.dit is not None and model.latent_shape == (4, 4)
    assert model.attributes == ["cell_type", "tissue", "donor"]
    assert len(model.gene_ids) == 120
    vae_only = sl.ScLDM.load(pipeline / "vae", device="cpu")
    assert vae_only.dit is None
    with pytest.raises(ScldmError, match="VAE run.*LDM run"):
        vae_only.generate({"cell_type": {model.categories["cell_type"][0]: 2}})


def test_encode_writes_obsm_deterministically_and_matches_genes_by_column(model, heldout):
    a = model.encode(heldout.copy())
    z = a.obsm["X_scldm"]
    assert z.shape == (heldout.n_obs, 16) and z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_array_equal(model.encode(heldout.copy()).obsm["X_scldm"], z)
    np.testing.assert_allclose(a.obs["scldm_library_size"], np.asarray(heldout.X.sum(1)).ravel())
    assert a.uns["scldm"]["genes"]["n_matched"] == 120
    # genes by a var column, in another order, with genes the model does not know: the same latents
    order = np.random.default_rng(0).permutation(heldout.n_vars)
    x = sp.hstack([heldout.X[:, order], sp.csr_matrix(np.ones((heldout.n_obs, 3), np.float32))]).tocsr()
    ids = list(heldout.var_names[order]) + ["NEW1", "NEW2", "NEW3"]
    other = ad.AnnData(X=x, obs=heldout.obs.copy(),
                       var=pd.DataFrame({"gene_ids": ids}, index=[f"sym{i}" for i in range(len(ids))]))
    b = model.encode(other)
    assert b.uns["scldm"]["genes"] == {"matched_by": "var['gene_ids']", "n_var": 123, "n_matched": 120,
                                       "n_dropped": 3, "n_vocab": 120}
    np.testing.assert_allclose(b.obsm["X_scldm"], z, rtol=1e-5, atol=1e-6)


def test_encode_reads_counts_from_raw_and_rejects_normalized_x(model, heldout):
    norm = heldout.copy()
    norm.raw = heldout.copy()
    norm.X = sp.csr_matrix(np.log1p(heldout.X.toarray() / 7.0))
    with pytest.raises(ScldmError, match="non-integer"):
        model.encode(norm)
    np.testing.assert_allclose(model.encode(norm, layer="raw").obsm["X_scldm"],
                               model.encode(heldout.copy()).obsm["X_scldm"], rtol=1e-6)


def test_generate_counts_obs_and_seed(model):
    ct = model.categories["cell_type"]
    gen = model.generate({"cell_type": {ct[0]: 5, ct[1]: 3}}, guidance={"cell_type": 2.0}, steps=4, seed=0)
    assert gen.n_obs == 8 and gen.n_vars == 120 and list(gen.var_names) == model.gene_ids
    assert sp.issparse(gen.X) and np.issubdtype(gen.X.dtype, np.integer) and gen.X.sum() > 0
    assert list(gen.obs["cell_type"]) == [ct[0]] * 5 + [ct[1]] * 3
    assert gen.uns["provenance"]["guidance"]["cell_type"] == 2.0 and gen.uns["provenance"]["num_steps"] == 4
    again = model.generate({"cell_type": {ct[0]: 5, ct[1]: 3}}, guidance={"cell_type": 2.0}, steps=4, seed=0)
    assert (again.X != gen.X).nnz == 0
    other = model.generate({"cell_type": {ct[0]: 5, ct[1]: 3}}, guidance={"cell_type": 2.0}, steps=4, seed=1)
    assert not np.allclose(other.obsm["X_scldm"], gen.obsm["X_scldm"])
    # blocks: a cell's values depend on the seed and the block size only (not on what follows it)
    first = model.generate({"cell_type": {ct[0]: 5}}, guidance={"cell_type": 2.0}, steps=4, seed=0, batch_size=4)
    longer = model.generate({"cell_type": {ct[0]: 9}}, guidance={"cell_type": 2.0}, steps=4, seed=0, batch_size=4)
    np.testing.assert_array_equal(longer.obsm["X_scldm"][:5], first.obsm["X_scldm"])


def test_generate_matches_another_datasets_obs(model, heldout):
    gen = model.generate(obs=heldout.obs, steps=4, seed=0)
    assert gen.n_obs == heldout.n_obs
    for col in ("cell_type", "tissue", "donor"):
        assert gen.obs[col].astype(str).value_counts().to_dict() == heldout.obs[col].astype(str).value_counts().to_dict()
    with pytest.raises(ScldmError, match="unknown attribute"):
        model.generate({"species": {"mouse": 3}})
    with pytest.raises(ScldmError, match="no cells requested"):
        model.generate()


def test_reconstruct_shapes_and_means(model, heldout):
    rec = model.reconstruct(heldout, seed=0)
    assert rec.shape == (heldout.n_obs, 120) and (rec.obs.index == heldout.obs.index).all()
    mean = rec.layers["scldm_mean"]
    assert mean.shape == rec.shape and (mean >= 0).all()
    # decoded from the cells' own latents; the NB means of a cell sum to the decoder's library size
    z = model.encode(heldout.copy()).obsm["X_scldm"]
    np.testing.assert_array_equal(rec.obsm["X_scldm"], z)
    import torch

    with torch.no_grad():
        dec = model.vae.decode(torch.from_numpy(z).reshape(-1, 4, 4), torch.arange(120).expand(len(z), -1))
    np.testing.assert_allclose(mean.sum(1), dec["log_library_n"].exp().numpy(), rtol=1e-4)
    assert (model.reconstruct(heldout, seed=0).X != rec.X).nnz == 0


def test_transfer_strength_zero_is_reconstruction_and_one_ignores_the_input(model, heldout):
    ct = model.categories["cell_type"]
    cells = heldout[:12].copy()
    rec = model.reconstruct(cells, seed=3, batch_size=5)
    same = model.transfer(cells, to={"cell_type": ct[1]}, strength=0.0, seed=3, batch_size=5, steps=4)
    assert (same.X != rec.X).nnz == 0
    np.testing.assert_array_equal(same.obsm["X_scldm"], rec.obsm["X_scldm"])
    assert (same.obs["cell_type"] == ct[1]).all()
    assert (same.obs["source_cell_type"].astype(str) == cells.obs["cell_type"].astype(str)).all()
    # strength 1: the cells' counts do not matter (only their other labels, set here), and it is generation
    to = {"cell_type": ct[1], "tissue": model.categories["tissue"][0], "donor": model.categories["donor"][0]}
    shuffled = cells.copy()
    shuffled.X = cells.X[::-1].copy()
    a = model.transfer(cells, to=to, strength=1.0, seed=3, batch_size=5, steps=4)
    b = model.transfer(shuffled, to=to, strength=1.0, seed=3, batch_size=5, steps=4)
    np.testing.assert_array_equal(a.obsm["X_scldm"], b.obsm["X_scldm"])
    gen = model.generate([(to, 12)], seed=3, batch_size=5, steps=4)
    np.testing.assert_array_equal(a.obsm["X_scldm"], gen.obsm["X_scldm"])
    # in between: moved, but not all the way
    mid = model.transfer(cells, to={"cell_type": ct[1]}, strength=0.5, seed=3, batch_size=5, steps=4)
    assert np.abs(mid.obsm["X_scldm"] - rec.obsm["X_scldm"]).max() > 1e-4
    with pytest.raises(ScldmError, match="strength"):
        model.transfer(cells, to={"cell_type": ct[1]}, strength=1.5)
    with pytest.raises(ScldmError, match="unknown value"):
        model.transfer(cells, to={"cell_type": "dragon"})


def test_top_level_evaluate(model, heldout):
    gen = model.generate(obs=heldout.obs, steps=4, seed=0)
    metrics = sl.evaluate(heldout, gen, label_keys=["cell_type"], per_condition=False)
    assert np.isfinite(metrics["w2"]) and np.isfinite(metrics["mmd"]) and "knn_acc/cell_type" in metrics


def test_generate_on_two_ranks_equals_one(pipeline):
    args = ["generate", "--ldm-run", str(pipeline / "ldm"), "--match", str(pipeline / "data" / "heldout.h5ad"),
            "--steps", "3", "--batch-size", "16", "--seed", "5", "--quiet"]
    cli(*args, "--out", str(pipeline / "gen_1rank.h5ad"))
    proc = cli(*args, "--out", str(pipeline / "gen_2ranks.h5ad"), nproc=2)
    assert proc.stdout.count("wrote") == 1  # rank 0 writes the one file
    one, two = ad.read_h5ad(pipeline / "gen_1rank.h5ad"), ad.read_h5ad(pipeline / "gen_2ranks.h5ad")
    assert one.n_obs == two.n_obs > 16 * 2
    assert (one.X != two.X).nnz == 0
    np.testing.assert_array_equal(one.obsm["X_scldm"], two.obsm["X_scldm"])
    pd.testing.assert_frame_equal(one.obs, two.obs)


def test_cuda_device_without_a_gpu_is_one_line_error(pipeline):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = pipeline / "gen_cuda.h5ad"
    proc = cli("generate", "--ldm-run", str(pipeline / "ldm"), "--out", str(out), "--condition",
               "cell_type=celltype_0:2", "--device", "cuda", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "no CUDA GPU" in errors[0], proc.stderr
    assert not out.exists()
