"""`scldm-scale prepare h5ad|soma` end to end: harmonized output, idempotent re-run, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli_utils import cli
from tests.unit.test_harmonize import EXPECTED_X, _bad, in_input_order, read_shards, write_example

pytestmark = pytest.mark.integration


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_prepare_h5ad_and_soma(tmp_path):
    a, b, c = (str(p) for p in write_example(tmp_path / "in"))
    out = tmp_path / "shards"
    args = ["prepare", "h5ad", a, b, c, str(out), "--shard-size", "3", "--labels", "cell_type", "tissue", "donor"]
    proc = cli(*args)
    assert "wrote 7 cells x 5 genes from 3 files in 3 shards" in proc.stdout
    assert "warning:" in proc.stderr and "'tissue' is missing" in proc.stderr
    assert "c.h5ad: kept 2 of 3 genes (1 not in the vocabulary)" in proc.stderr
    np.testing.assert_array_equal(in_input_order(read_shards(out)).X.toarray(), EXPECTED_X)
    stamp = (out / "shard_0000.h5ad").stat().st_mtime_ns

    proc = cli(*args)
    assert "up to date" in proc.stdout and (out / "shard_0000.h5ad").stat().st_mtime_ns == stamp

    line = _error_line(cli(*args[:-2], "--shard-size", "2", check=False))  # other options, same OUT
    assert str(out) in line and "--overwrite" in line

    import tiledbsoma

    soma_out = tmp_path / "exp"
    proc = cli("prepare", "soma", a, b, c, str(soma_out), "--labels", "cell_type", "tissue", "--quiet")
    assert "SOMA experiment" in proc.stdout
    meta = json.loads((soma_out / "metadata.json").read_text())
    with tiledbsoma.Experiment.open(str(soma_out)) as exp:
        assert exp.ms["RNA"].X["data"].nnz == meta["nnz"] == read_shards(out).X.nnz
        assert exp.obs.count == 7


@pytest.mark.parametrize("kind", ["truncated", "negative", "missing_label"])  # all kinds: tests/unit/test_harmonize.py
def test_prepare_bad_input_exits_2_with_one_error_line(kind, tmp_path):
    good = write_example(tmp_path / "in")[0]
    bad = _bad(kind, tmp_path / "bad")
    out = tmp_path / "out"
    line = _error_line(cli("prepare", "h5ad", str(good), str(bad), str(out), "--require-labels", "--quiet",
                           check=False))
    assert bad.name in line
    assert not out.exists() and not list(tmp_path.glob("out.*"))


def test_prepare_usage_errors(tmp_path):
    line = _error_line(cli("prepare", "h5ad", str(tmp_path / "out"), check=False))
    assert "input .h5ad files" in line
    line = _error_line(cli("prepare", "h5ad", str(tmp_path / "nope.h5ad"), str(tmp_path / "out"), check=False))
    assert "nope.h5ad" in line and "not found" in line
