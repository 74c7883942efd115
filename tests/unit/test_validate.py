"""Validation of h5ad shards and shard path resolution."""

from __future__ import annotations

import os
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from scldm_scale.data.validate import check_counts, check_h5ad_shards, resolve_shards
from scldm_scale.errors import ScldmError

LABELS = ["cell_type", "tissue"]


def _write(path, x=None, n=20, g=8, obs_extra=None, var_names=None, categories=("a", "b")):
    rng = np.random.default_rng(0)
    if x is None:
        x = scipy.sparse.csr_matrix(rng.poisson(1.0, (n, g)).astype(np.float32))
    n, g = x.shape
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(list(categories), n), categories=list(categories)),
            "tissue": pd.Categorical(["lung"] * n),
        },
        index=[f"{os.path.basename(str(path))}_{i}" for i in range(n)],
    )
    for k, v in (obs_extra or {}).items():
        obs[k] = v
    var = pd.DataFrame(index=var_names if var_names is not None else [f"G{i}" for i in range(g)])
    anndata.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return str(path)


@pytest.fixture
def good(tmp_path):
    return [_write(tmp_path / "shard_0000.h5ad"), _write(tmp_path / "shard_0001.h5ad")]


def _raises_naming(paths, name, match=None, columns=LABELS):
    with pytest.raises(ScldmError, match=match) as err:
        check_h5ad_shards(paths, columns)
    msg = str(err.value)
    assert name in msg and "\n" not in msg, msg
    return msg


def test_good_shards_pass(good, tiny_atlas):
    check_h5ad_shards(good, LABELS)
    check_h5ad_shards(resolve_shards(str(tiny_atlas)), ["cell_type", "tissue", "donor"])


def test_missing_shard(good, tmp_path):
    _raises_naming([*good, str(tmp_path / "shard_0009.h5ad")], "shard_0009.h5ad", "does not exist")


def test_corrupt_file(good, tmp_path):
    bad = tmp_path / "garbage.h5ad"
    bad.write_bytes(os.urandom(4096))
    _raises_naming([*good, str(bad)], "garbage.h5ad", "not a readable h5ad")


def test_truncated_file(good, tmp_path):
    bad = tmp_path / "truncated.h5ad"
    shutil.copy(good[0], bad)
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    _raises_naming([*good, str(bad)], "truncated.h5ad")


def test_missing_label_column(good):
    msg = _raises_naming(good, "shard_0000.h5ad", "'donor' is missing", columns=[*LABELS, "donor"])
    assert "data.label_columns" in msg


def test_negative_counts(good, tmp_path):
    x = scipy.sparse.csr_matrix(np.array([[1, 0, 2], [0, -1, 3]], dtype=np.float32))
    bad = _write(tmp_path / "negative.h5ad", x=x, var_names=["G0", "G1", "G2"])
    _raises_naming([bad], "negative.h5ad", "negative")


def test_non_integer_counts(good, tmp_path):
    x = scipy.sparse.csr_matrix(np.array([[1, 0, 2], [0, 0.5, 3]], dtype=np.float32))
    bad = _write(tmp_path / "lognorm.h5ad", x=x, var_names=["G0", "G1", "G2"])
    _raises_naming([bad], "lognorm.h5ad", "non-integer")


def test_nan_counts_in_dense_x(tmp_path):
    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = np.nan
    bad = _write(tmp_path / "nan.h5ad", x=x, var_names=["G0", "G1", "G2"])
    _raises_naming([bad], "nan.h5ad", "NaN")


def test_shards_must_share_var_and_categories(good, tmp_path):
    other_var = _write(tmp_path / "other_var.h5ad", var_names=[f"H{i}" for i in range(8)])
    _raises_naming([*good, other_var], "other_var.h5ad", "var_names differ")
    other_cats = _write(tmp_path / "other_cats.h5ad", categories=("a", "b", "c"))
    _raises_naming([*good, other_cats], "other_cats.h5ad", "'cell_type' categories differ")


def test_empty_x(tmp_path):
    bad = _write(tmp_path / "empty.h5ad", x=scipy.sparse.csr_matrix((0, 8), dtype=np.float32))
    _raises_naming([bad], "empty.h5ad", "empty")


def test_check_counts_accepts_integers_in_float_storage():
    check_counts(scipy.sparse.csr_matrix(np.array([[0, 3.0], [1.0, 0]])), "x")
    check_counts(np.array([[0, 3], [1, 0]], dtype=np.uint16), "x")
    with pytest.raises(ScldmError, match="block-7"):
        check_counts(np.array([[0.1]]), "block-7")


def test_resolve_shards(tiny_atlas, tmp_path):
    path = str(tiny_atlas)
    files = [os.path.join(path, f"shard_{i:04d}.h5ad") for i in range(3)]
    assert resolve_shards(path) == files  # heldout.h5ad is not a training shard
    assert resolve_shards(os.path.join(path, "shard_*.h5ad")) == files
    assert resolve_shards(os.path.join(path, "shard_{0000..0001}.h5ad")) == files[:2]
    assert resolve_shards(files[2]) == files[2:]
    (tmp_path / "empty").mkdir()
    for missing in (str(tmp_path / "empty"), str(tmp_path / "*.h5ad"), str(tmp_path / "nope.h5ad"), ""):
        with pytest.raises(ScldmError):
            resolve_shards(missing)
    other = tmp_path / "plain"
    other.mkdir()
    _write(other / "b.h5ad")
    _write(other / "a.h5ad")
    _write(other / "heldout.h5ad")
    assert [os.path.basename(f) for f in resolve_shards(str(other))] == ["a.h5ad", "b.h5ad"]
