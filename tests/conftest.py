"""Shared test fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Keep the shared CPU quiet: every test process (and forked rank) uses one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# 500 cells: 450 training cells in 3 shards of 150 + 50 held out; 200 genes; 8 cell types,
# 4 tissues, 6 donors (the generator's defaults).
TINY_ATLAS = dict(n_cells=500, n_genes=200, n_shards=3, heldout_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory) -> Path:
    """Directory of a small synthetic atlas (shards, heldout.h5ad, metadata/vocab/labels json), written once."""
    from scldm_scale.data.synthetic import write_synthetic_atlas

    out = tmp_path_factory.mktemp("atlas") / "tiny_atlas"
    write_synthetic_atlas(out, progress=False, **TINY_ATLAS)
    return out


@pytest.fixture(scope="session")
def tiny_atlas_meta(tiny_atlas) -> dict:
    """The tiny atlas's ``metadata.json``."""
    return json.loads((tiny_atlas / "metadata.json").read_text())


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """A tiny atlas, a VAE and an LDM trained on it through the CLI (2 gloo ranks, 40 steps each),
    shared by the integration tests: ``<root>/data``, ``<root>/vae`` (with ``latents/``), ``<root>/ldm``."""
    from tests.cli_utils import TINY_LDM, TINY_VAE, cli

    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    cli("prepare", "synthetic", str(data), "--cells", "720", "--genes", "120", "--shards", "2",
        "--cell-types", "3", "--heldout-fraction", "0.2", "--quiet")
    common = [f"data.path={data}", f"run.output_dir={root}"]
    cli("train", *TINY_VAE, "run.name=vae", "train.max_steps=40", "optim.lr=3e-3", *common, nproc=2)
    cli("encode", "--vae-run", str(root / "vae"), "--quiet", nproc=2)
    cli("train", *TINY_VAE, *TINY_LDM, "run.name=ldm", f"ldm.vae_run={root / 'vae'}", "train.max_steps=40",
        *common, nproc=2)
    return root
