"""A tiny TileDB-SOMA experiment holding the ``tiny_atlas`` training shards.

The experiment is written in a child process: TileDB is not fork-safe, and the pytest process
must stay free of TileDB state so that processes forked from it (ranks, dataloader workers)
can still read SOMA. Cells keep the shard order, so ``soma_joinid`` equals the h5ad
``cell_index`` (0..449).

Use in a test module with ``from soma_fixtures import tiny_soma  # noqa: F401``.
"""

from __future__ import annotations

import glob
import multiprocessing
import os

import pytest

MEASUREMENT = "RNA"
LAYER = "data"  # tiledbsoma.io's default X layer name


def write_soma_experiment(atlas_dir: str, uri: str) -> None:
    """Append every ``shard_*.h5ad`` of ``atlas_dir`` to a new experiment (registration + append)."""
    import anndata
    import tiledbsoma.io

    files = sorted(glob.glob(os.path.join(atlas_dir, "shard_*.h5ad")))
    adatas = [anndata.read_h5ad(f) for f in files]
    rm = tiledbsoma.io.register_anndatas(
        None, adatas, measurement_name=MEASUREMENT, obs_field_name="obs_id", var_field_name="var_id"
    )
    kw = dict(X_layer_name=LAYER, registration_mapping=rm, uns_keys=[])
    tiledbsoma.io.from_anndata(uri, adatas[0], MEASUREMENT, ingest_mode="schema_only", **kw)
    rm.prepare_experiment(uri)
    for a in adatas:
        tiledbsoma.io.from_anndata(uri, a, MEASUREMENT, **kw)


_WRITTEN: dict[str, str] = {}  # atlas dir -> experiment URI (test modules share one experiment)


def _run_in_child(fn, *args, timeout: float = 180.0) -> None:
    """Run ``fn`` in a spawned child: a fork of the test process, which may hold other threads'
    locks after many tests, can hang."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=fn, args=args)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise RuntimeError(f"{fn.__name__} did not finish in {timeout} s")
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {proc.exitcode})")


@pytest.fixture(scope="session")
def tiny_soma(tiny_atlas, tmp_path_factory) -> str:
    """URI of a SOMA experiment with the 450 training cells of ``tiny_atlas``."""
    key = str(tiny_atlas)
    if key not in _WRITTEN:
        uri = str(tmp_path_factory.mktemp("soma") / "tiny_exp")
        _run_in_child(write_soma_experiment, key, uri)
        _WRITTEN[key] = uri
    return _WRITTEN[key]
