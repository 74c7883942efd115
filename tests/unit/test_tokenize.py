"""Tokenizer: raw counts CSR -> padded token batch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from scldm_scale.data.tokenize import collate_token_batches, tokenize_counts
from scldm_scale.errors import ScldmError

N_CELLS, N_VAR = 12, 50


def _block(seed: int = 0, density: float = 0.3) -> scipy.sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 20, (N_CELLS, N_VAR)) * (rng.random((N_CELLS, N_VAR)) < density)
    dense[3] = 0  # an empty cell
    x = scipy.sparse.csr_matrix(dense.astype(np.float32))
    x.data[::7] = 0.0  # explicit stored zeros are not tokens
    return x


def _var_map() -> np.ndarray:
    m = np.arange(100, 100 + N_VAR, dtype=np.int64)
    m[::5] = -1  # every 5th source gene is outside the vocabulary
    return m


def _expected(x, var_map):
    """Per cell: {vocab id: count} of expressed in-vocabulary genes, and its total."""
    out = []
    for i in range(x.shape[0]):
        row = x[i]
        d = {int(var_map[j]): float(v) for j, v in zip(row.indices, row.data) if v > 0 and var_map[j] >= 0}
        out.append(d)
    return out


def _tokens(batch, i):
    m = batch["mask_ns"][i].numpy()
    return dict(zip(batch["gene_ids_ns"][i].numpy()[m].tolist(), batch["counts_ns"][i].numpy()[m].tolist()))


def test_tokens_match_rows_and_pad_to_batch_max():
    x, var_map = _block(), _var_map()
    labels = np.arange(N_CELLS * 2).reshape(N_CELLS, 2)
    batch = tokenize_counts(x, var_map, labels, max_genes=1000, rng=np.random.default_rng(0))
    expected = _expected(x, var_map)
    lengths = [len(e) for e in expected]
    assert batch["gene_ids_ns"].shape == (N_CELLS, max(lengths))  # batch max, not the cap or the vocabulary
    assert max(lengths) < N_VAR
    assert batch["gene_ids_ns"].dtype == torch.int64 and batch["counts_ns"].dtype == torch.float32
    assert batch["mask_ns"].dtype == torch.bool
    assert batch["mask_ns"].sum(1).tolist() == lengths
    assert lengths[3] == 0
    for i, e in enumerate(expected):
        assert _tokens(batch, i) == e
        # padding is zero and sits after the real tokens
        pad = ~batch["mask_ns"][i]
        assert (batch["gene_ids_ns"][i][pad] == 0).all() and (batch["counts_ns"][i][pad] == 0).all()
        assert batch["mask_ns"][i][: lengths[i]].all()
    np.testing.assert_allclose(batch["library_size_n"].numpy(), [sum(e.values()) for e in expected])
    np.testing.assert_array_equal(batch["labels_na"].numpy(), labels)
    np.testing.assert_array_equal(batch["cell_index_n"].numpy(), -np.ones(N_CELLS))


def test_max_genes_subsampling_is_seeded_and_keeps_library_size():
    x, var_map = _block(density=0.6), _var_map()
    expected = _expected(x, var_map)
    cap = 8
    assert sum(len(e) > cap for e in expected) >= 5
    labels = np.zeros((N_CELLS, 1))
    cells = np.arange(500, 500 + N_CELLS)
    a = tokenize_counts(x, var_map, labels, cap, np.random.default_rng(42), cell_index_n=cells)
    b = tokenize_counts(x, var_map, labels, cap, np.random.default_rng(42), cell_index_n=cells)
    c = tokenize_counts(x, var_map, labels, cap, np.random.default_rng(43), cell_index_n=cells)
    assert a["gene_ids_ns"].shape[1] == cap
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["gene_ids_ns"], c["gene_ids_ns"])
    for i, e in enumerate(expected):
        got = _tokens(a, i)
        assert len(got) == min(len(e), cap)
        assert all(e[g] == v for g, v in got.items())  # a subset of the cell's own (gene, count) pairs
        if len(e) <= cap:
            assert got == e
    np.testing.assert_allclose(a["library_size_n"].numpy(), [sum(e.values()) for e in expected])
    np.testing.assert_array_equal(a["cell_index_n"].numpy(), cells)


def test_subsample_is_uniform():
    """Each of 10 genes of a cell is kept about max_genes/10 of the time."""
    x = scipy.sparse.csr_matrix(np.ones((2000, 10), dtype=np.int32))
    batch = tokenize_counts(x, np.arange(10), np.zeros((2000, 1)), 3, np.random.default_rng(0))
    freq = np.bincount(batch["gene_ids_ns"][batch["mask_ns"]].numpy(), minlength=10) / 2000
    np.testing.assert_allclose(freq, 0.3, atol=0.04)


@pytest.mark.parametrize(
    "value, match", [(-1.0, "negative"), (2.5, "non-integer"), (np.nan, "NaN"), (np.inf, "NaN or infinite")]
)
def test_bad_counts_raise(value, match):
    x = _block().astype(np.float32)
    x.data[5] = value
    with pytest.raises(ScldmError, match=match) as err:
        tokenize_counts(x, _var_map(), np.zeros((N_CELLS, 1)), 16, np.random.default_rng(0), where="shard_7.h5ad")
    assert "shard_7.h5ad" in str(err.value)


def test_negative_integer_counts_raise():
    x = _block().astype(np.int32)
    x.data[0] = -3
    with pytest.raises(ScldmError, match="negative"):
        tokenize_counts(x, _var_map(), np.zeros((N_CELLS, 1)), 16, np.random.default_rng(0))


def test_all_empty_batch_has_one_masked_column():
    x = scipy.sparse.csr_matrix((4, N_VAR), dtype=np.float32)
    batch = tokenize_counts(x, _var_map(), np.zeros((4, 1)), 16, np.random.default_rng(0))
    assert batch["mask_ns"].shape == (4, 1) and not batch["mask_ns"].any()
    assert (batch["library_size_n"] == 0).all()


def test_collate_pads_to_longest():
    var_map = _var_map()
    x = _block(density=0.6)
    short = tokenize_counts(x[:4], var_map, np.zeros((4, 1)), 3, np.random.default_rng(0))
    long = tokenize_counts(x[4:], var_map, np.ones((N_CELLS - 4, 1)), 100, np.random.default_rng(0))
    out = collate_token_batches([short, long])
    s = long["mask_ns"].shape[1]
    assert out["gene_ids_ns"].shape == (N_CELLS, s) and out["mask_ns"].shape == (N_CELLS, s)
    assert torch.equal(out["mask_ns"][:4, :3], short["mask_ns"]) and not out["mask_ns"][:4, 3:].any()
    assert torch.equal(out["counts_ns"][4:], long["counts_ns"])
    assert out["labels_na"][:, 0].tolist() == [0] * 4 + [1] * (N_CELLS - 4)
