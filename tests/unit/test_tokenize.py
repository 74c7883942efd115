"""Tokenizer: raw counts CSR -> padded and packed token batches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from scldm_scale.data.tokenize import (
    COMPACT_KEYS,
    pack_token_batch,
    pad_fraction,
    pad_token_batch,
    tokenize_counts,
)
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


def test_packed_form_carries_the_tokens_the_cap_dropped():
    """pad=False: the kept tokens cell after cell, the dropped ones likewise; together they are the
    cell's expressed genes; the same seed keeps the same tokens as the padded form."""
    x, var_map = _block(density=0.6), _var_map()
    expected = _expected(x, var_map)
    cap = 8
    packed = tokenize_counts(x, var_map, np.zeros((N_CELLS, 1)), cap, np.random.default_rng(7), pad=False)
    padded = tokenize_counts(x, var_map, np.zeros((N_CELLS, 1)), cap, np.random.default_rng(7))
    assert tuple(packed) == COMPACT_KEYS and isinstance(packed["max_length"], int)
    assert packed["max_length"] == cap and len(next(iter(packed.values()))) == N_CELLS  # per-cell values first
    kept_at = np.concatenate([[0], np.cumsum(packed["length_n"].numpy())])
    dropped_at = np.concatenate([[0], np.cumsum(packed["dropped_length_n"].numpy())])
    for i, e in enumerate(expected):
        lo, hi, dlo, dhi = kept_at[i], kept_at[i + 1], dropped_at[i], dropped_at[i + 1]
        kept = dict(zip(packed["gene_ids_t"][lo:hi].tolist(), packed["counts_t"][lo:hi].tolist()))
        dropped = dict(zip(packed["dropped_gene_ids_e"][dlo:dhi].tolist(),
                           packed["dropped_counts_e"][dlo:dhi].tolist()))
        assert kept == _tokens(padded, i) and not kept.keys() & dropped.keys()
        assert {**kept, **dropped} == e and len(dropped) == max(len(e) - cap, 0)
    assert torch.equal(pad_token_batch(packed)["gene_ids_ns"], padded["gene_ids_ns"])
    repacked = pack_token_batch(padded)
    for key in ("length_n", "gene_ids_t", "counts_t", "library_size_n"):
        assert torch.equal(repacked[key], packed[key])
    assert repacked["max_length"] == packed["max_length"] and repacked["dropped_length_n"].sum() == 0


def test_pad_fraction():
    assert pad_fraction(np.array([2, 4])) == pytest.approx(0.25)  # 6 of 8 slots real
    assert pad_fraction(np.array([2, 4]), width=8) == pytest.approx(0.625)
    assert pad_fraction(np.array([], dtype=np.int64)) == 0.0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_source_hands_packed_batches(tiny_atlas, num_workers):
    """Source.batches(pad=False) hands the VAE packed batches: the same tokens, no padding."""
    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.loader import build_source

    cfg = DataConfig(path=str(tiny_atlas), batch_size=16, max_genes=32, shuffle=False)
    batch = next(build_source(cfg, validate=False).batches(num_workers=num_workers, pad=False))
    assert set(batch) == set(COMPACT_KEYS) and batch["length_n"].shape == (16,)
    assert batch["gene_ids_t"].shape[0] == int(batch["length_n"].sum()) and batch["max_length"] <= 32
    padded = next(build_source(cfg, validate=False).batches(num_workers=num_workers))
    assert torch.equal(pad_token_batch(batch)["gene_ids_ns"], padded["gene_ids_ns"])
