"""Bad input through the CLI: one-line error naming the file/key, exit status 2, nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cli_utils import TINY_VAE, cli

pytestmark = pytest.mark.integration


def _error_line(proc):
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_unknown_recipe_key(tmp_path):
    line = _error_line(cli("train", "recipes/quickstart.yaml", "train.max_stepz=3", check=False))
    assert "train.max_stepz" in line and "train.max_steps" in line


def test_missing_shard_directory(tmp_path):
    line = _error_line(cli("train", *TINY_VAE, f"data.path={tmp_path / 'nowhere'}", f"run.output_dir={tmp_path}",
                           check=False))
    assert "nowhere" in line
    assert not (tmp_path / "quickstart-vae" / "checkpoints").exists()


def test_missing_label_column_and_bad_counts(tiny_atlas, tmp_path):
    line = _error_line(cli("train", *TINY_VAE, f"data.path={tiny_atlas}", f"run.output_dir={tmp_path}",
                           "data.label_columns=[cell_type,batch_id]", check=False))
    assert "batch_id" in line

    import anndata as ad
    import scipy.sparse as sp

    from scldm_scale.data.validate import resolve_shards

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for i, shard in enumerate(resolve_shards(str(tiny_atlas))):
        adata = ad.read_h5ad(shard)
        if i == 0:
            x = adata.X.toarray().astype(np.float32)
            x[0, 0] = 1.5
            adata.X = sp.csr_matrix(x)
        adata.write_h5ad(bad_dir / f"shard_{i:04d}.h5ad")
    for name in ("vocab.json", "labels.json"):
        (bad_dir / name).write_bytes((tiny_atlas / name).read_bytes())
    line = _error_line(cli("train", *TINY_VAE, f"data.path={bad_dir}", f"run.output_dir={tmp_path}", check=False))
    assert "shard_0000.h5ad" in line and "integer" in line
