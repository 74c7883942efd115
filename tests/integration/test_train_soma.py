"""Training a tiny VAE (single process) from a SOMA experiment and from a SOMA + h5ad mixture.

The training runs in a subprocess through :class:`~scldm_scale.train.trainer.Trainer` with its
source's batches wrapped to record the ``cell_index_n`` of every batch handed to the training step.
The SOMA experiment holds the tiny atlas's 450 training cells (``soma_joinid == cell_index``);
the mixture's h5ad member is a copy of the atlas shards with ``cell_index`` shifted by
``H5AD_OFFSET``, so every recorded batch names its source.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from soma_fixtures import tiny_soma  # noqa: F401

from tests.cli_utils import REPO, TINY_VAE, read_metrics

pytestmark = pytest.mark.integration

BATCH = 16  # TINY_VAE's data.batch_size
H5AD_OFFSET = 100_000
FILTER = "tissue in ['tissue_0', 'tissue_1', 'tissue_2']"

DRIVER = """
import sys
import numpy as np
from scldm_scale.cli import split_recipes
from scldm_scale.config import load_config
from scldm_scale.train.trainer import Trainer

out, items = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(*split_recipes(items)))
batches, seen = trainer.source.batches, []


def recording(*args, **kwargs):
    for batch in batches(*args, **kwargs):
        seen.append(batch["cell_index_n"].numpy().copy())
        yield batch


trainer.source.batches = recording
try:
    trainer.train()
finally:
    trainer.close()
np.save(out, np.stack(seen))
"""


def _train(root, name: str, *overrides: str) -> np.ndarray:
    """Train in a subprocess; the ``cell_index_n`` of every consumed batch, (batches, BATCH)."""
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    out = root / f"{name}_cells.npy"
    args = [*TINY_VAE, f"run.output_dir={root}", f"run.name={name}", "train.ckpt_every=0", *overrides]
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    import os

    proc = subprocess.run([sys.executable, str(driver), str(out), *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"training {name} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return np.load(out)


def _data_state(run_dir) -> dict:
    from scldm_scale.train.checkpoint import latest_tag

    tag = latest_tag(run_dir / "checkpoints")
    client = torch.load(run_dir / "checkpoints" / str(tag) / "client_rank0.pt", map_location="cpu", weights_only=False)
    return dict(client["data"])


@pytest.fixture(scope="module")
def shifted_h5ad(tiny_atlas, tmp_path_factory):
    """The tiny atlas shards with ``cell_index + H5AD_OFFSET`` (and the same vocab / labels / metadata)."""
    import anndata

    out = tmp_path_factory.mktemp("shifted") / "atlas"
    out.mkdir()
    for src in sorted(tiny_atlas.glob("shard_*.h5ad")):
        a = anndata.read_h5ad(src)
        a.obs["cell_index"] = a.obs["cell_index"].astype(np.int64) + H5AD_OFFSET
        a.write_h5ad(out / src.name)
    for name in ("vocab.json", "labels.json", "metadata.json"):
        shutil.copy(tiny_atlas / name, out / name)
    return out


def test_soma_training_consumes_the_planned_cells_and_resumes(tiny_soma, tiny_atlas, tmp_path):  # noqa: F811
    import anndata

    common = ["data.source=soma", f"data.path={tiny_soma}", f"data.value_filter={FILTER}", "data.chunk_size=8",
              "data.shuffle_buffer=32", f"data.labels_path={tiny_atlas / 'labels.json'}"]  # vocab: from the experiment
    # 5 steps with 1 worker, checkpoint; resume to 12 steps with 2 workers
    first = _train(tmp_path, "soma", *common, "data.num_workers=1", "train.max_steps=12", "train.stop_at_step=5")
    state = _data_state(tmp_path / "soma")
    assert (state["epoch"], state["cells_consumed"], state["batch_size"], state["world_size"]) == (0, 5 * BATCH, BATCH, 1)
    rest = _train(tmp_path, "soma", *common, "data.num_workers=2", "train.max_steps=12", "run.resume=true")
    seen = np.concatenate([first, rest])
    assert seen.shape == (12, BATCH)

    losses = [r["loss"] for r in read_metrics(tmp_path / "soma")]
    assert len(losses) >= 12 and np.all(np.isfinite(losses))
    assert (tmp_path / "soma" / "export" / "vocab.json").is_file()

    obs = anndata.concat([anndata.read_h5ad(f) for f in sorted(tiny_atlas.glob("shard_*.h5ad"))]).obs
    selected = obs.loc[obs.tissue.isin(["tissue_0", "tissue_1", "tissue_2"]), "cell_index"].to_numpy()
    cells = seen.reshape(-1)
    assert len(np.unique(cells)) == len(cells) == 12 * BATCH  # no cell twice within the epoch
    assert set(cells.tolist()) <= set(selected.tolist())  # only cells the filter selects

    # exactly the documented epoch plan, across the interruption and the worker-count change
    from scldm_scale.data.config import DataConfig, SourceKind
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.loader import build_source, load_vocab_and_labels

    cfg = DataConfig(source=SourceKind.SOMA, path=tiny_soma, value_filter=FILTER, chunk_size=8, shuffle_buffer=32,
                     batch_size=BATCH, max_genes=64, labels_path=str(tiny_atlas / "labels.json"))
    vocab, labels = load_vocab_and_labels(cfg)
    assert labels == LabelTables.load(tiny_atlas / "labels.json")
    source = build_source(cfg, vocab, labels)
    assert state["cells_per_epoch"] == source.n_cells == len(selected)
    np.testing.assert_array_equal(cells, source.epoch_joinids(0)[: 12 * BATCH])


def test_mixture_training_draws_sources_in_proportion(tiny_soma, shifted_h5ad, tmp_path):  # noqa: F811
    sources = f"[{{source: soma, path: '{tiny_soma}', weight: 3}}, {{source: h5ad, path: '{shifted_h5ad}', weight: 1}}]"
    # 450 cells each: 29 draws of 16 per epoch each -> a mixture epoch of 58 draws, 44 SOMA + 14 h5ad
    seen = _train(tmp_path, "mix", "data.source=mixture", f"data.sources={sources}", "data.chunk_size=8",
                  "data.shuffle_buffer=32", "data.num_workers=2", "train.max_steps=60")
    assert seen.shape == (60, BATCH)
    losses = [r["loss"] for r in read_metrics(tmp_path / "mix")]
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    state = _data_state(tmp_path / "mix")
    assert (state["epoch"], state["cells_consumed"], state["cells_per_epoch"]) == (1, 2 * BATCH, 58 * BATCH)

    from_h5ad = seen >= H5AD_OFFSET
    assert (from_h5ad.all(1) | ~from_h5ad.any(1)).all()  # every batch comes from one source
    assert from_h5ad[:58, 0].sum() == 14  # one mixture epoch: exactly the weights (58 / 4, rounded)
    assert from_h5ad[:, 0].mean() == pytest.approx(0.25, abs=0.05)
    # each source on its own: its first epoch is every one of its cells once
    soma_cells = seen[~from_h5ad[:, 0]].reshape(-1)[:450]
    h5ad_cells = seen[from_h5ad[:, 0]].reshape(-1) - H5AD_OFFSET
    np.testing.assert_array_equal(np.sort(soma_cells), np.arange(450))
    assert len(np.unique(h5ad_cells)) == len(h5ad_cells) and h5ad_cells.max() < 450
    assert json.loads((tmp_path / "mix" / "export" / "labels.json").read_text())["attributes"] == [
        "cell_type", "tissue", "donor"
    ]
