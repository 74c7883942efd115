"""`encode` reads any source: the same cells prepared as h5ad shards, as a SOMA experiment and inside a
mixture give the same latents, cell by cell, on any number of ranks; a cache never merges files of
another encode run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from tests.cli_utils import cli

pytestmark = pytest.mark.integration


def _cache(path) -> dict[int, np.ndarray]:
    """Latents by cell id, and the label codes, of a finalized latent cache."""
    from scldm_scale.data.latent_cache import LatentCacheSource

    source = LatentCacheSource(path, batch_size=1, shuffle=False)
    out = {}
    for batch in source.inference_batches(0, 1, 64):
        for cell, z, labels in zip(batch["cell_index_n"].tolist(), batch["z_nmz"].numpy(), batch["labels_na"].numpy()):
            assert cell not in out
            out[cell] = (z, labels)
    return out


@pytest.fixture(scope="module")
def prepared(pipeline, tmp_path_factory):
    """The pipeline's held-out cells, as two input files, prepared as h5ad shards and as SOMA (same order)."""
    root = tmp_path_factory.mktemp("encode_sources")
    cells = ad.read_h5ad(pipeline / "data" / "heldout.h5ad")
    half = cells.n_obs // 2
    inputs = [root / "a.h5ad", root / "b.h5ad"]
    cells[:half].write_h5ad(inputs[0])
    cells[half:].write_h5ad(inputs[1])
    vocab = pipeline / "vae" / "export" / "vocab.json"
    common = ["--labels", "cell_type", "tissue", "donor", "--vocab", str(vocab), "--seed", "3", "--quiet"]
    cli("prepare", "h5ad", *map(str, inputs), str(root / "shards"), "--shard-size", "50", *common)
    cli("prepare", "soma", *map(str, inputs), str(root / "atlas.soma"), *common)
    return root


def test_encode_from_soma_and_mixture_equals_h5ad(pipeline, prepared):
    vae = pipeline / "vae"
    every_gene = "data.max_genes=1000"  # no subsampling: the tokens do not depend on how cells are batched
    cli("encode", "--vae-run", str(vae), "--out", str(prepared / "lat_h5ad"), "--quiet", "data.source=h5ad",
        f"data.path={prepared / 'shards'}", every_gene)
    cli("encode", "--vae-run", str(vae), "--out", str(prepared / "lat_soma"), "--quiet", "data.source=soma",
        f"data.path={prepared / 'atlas.soma'}", every_gene, nproc=2)
    from_h5ad, from_soma = _cache(prepared / "lat_h5ad"), _cache(prepared / "lat_soma")
    assert sorted(from_h5ad) == sorted(from_soma) == list(range(144))
    for cell, (z, labels) in from_h5ad.items():
        np.testing.assert_allclose(from_soma[cell][0], z, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(from_soma[cell][1], labels)

    cli("encode", "--vae-run", str(vae), "--out", str(prepared / "lat_mix"), "--quiet", "data.source=mixture",
        f"data.sources=[{{source: h5ad, path: {prepared / 'shards'}}}, {{source: soma, path: {prepared / 'atlas.soma'}}}]",
        every_gene, nproc=2)
    from scldm_scale.data.latent_cache import read_latent_stats

    assert read_latent_stats(prepared / "lat_mix")["n_cells"] == 2 * 144  # both members, each cell once
    mixed = _cache_pairs(prepared / "lat_mix")
    for cell, (z, _) in from_h5ad.items():
        assert len(mixed[cell]) == 2  # the same cell from each member
        for z_mix in mixed[cell]:
            np.testing.assert_allclose(z_mix, z, rtol=1e-5, atol=1e-6)


def _cache_pairs(path) -> dict[int, list[np.ndarray]]:
    from scldm_scale.data.latent_cache import LatentCacheSource

    out: dict[int, list] = {}
    for batch in LatentCacheSource(path, batch_size=1, shuffle=False).inference_batches(0, 1, 64):
        for cell, z in zip(batch["cell_index_n"].tolist(), batch["z_nmz"].numpy()):
            out.setdefault(cell, []).append(z)
    return out


def test_encode_rejects_other_than_data_overrides(pipeline, tmp_path):
    proc = cli("encode", "--vae-run", str(pipeline / "vae"), "--out", str(tmp_path / "lat"), "train.max_steps=3",
               check=False)
    assert proc.returncode == 2 and "only data.* overrides" in proc.stderr
    proc = cli("encode", "--vae-run", str(pipeline / "vae"), "--out", str(tmp_path / "lat"), "data.max_gnes=3",
               check=False)
    assert proc.returncode == 2 and "data.max_genes" in proc.stderr  # did you mean
    assert not (tmp_path / "lat" / "manifest.json").exists()
