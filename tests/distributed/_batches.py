"""What the loader sharding tests record about batches, shared by the h5ad / latents and SOMA tests."""

from __future__ import annotations

import os

import numpy as np
import pytest


def fingerprint(batch) -> np.ndarray:
    """One number per cell summarizing its tokens (or latents)."""
    if "z_nmz" in batch:
        return batch["z_nmz"].double().sum(dim=(1, 2)).numpy()
    m = batch["mask_ns"]
    return ((batch["gene_ids_ns"] * 1000 + batch["counts_ns"].long()) * m).sum(1).double().numpy()


def take(it, n):
    """The next ``n`` batches of ``it``, their cell ids and fingerprints (concatenated)."""
    batches = [next(it) for _ in range(n)]
    cells = np.concatenate([b["cell_index_n"].numpy() for b in batches])
    prints = np.concatenate([fingerprint(b) for b in batches])
    return batches, cells, prints


def check_tokens(atlas, batch, max_genes: int = 24):
    """Tokens of a batch are exactly the expressed genes of its cells in the tiny atlas's shards
    (``cell_index_n`` = row of the concatenated shards, which SOMA joinids equal too)."""
    import anndata

    x = anndata.concat([anndata.read_h5ad(os.path.join(atlas, f"shard_{i:04d}.h5ad")) for i in range(3)]).X.tocsr()
    for i, cell in enumerate(batch["cell_index_n"].tolist()):
        row = x[cell]
        m = batch["mask_ns"][i]
        got = dict(zip(batch["gene_ids_ns"][i][m].tolist(), batch["counts_ns"][i][m].tolist()))
        want = dict(zip(row.indices.tolist(), row.data.astype(float).tolist()))  # vocab order == var order
        assert len(got) == min(len(want), max_genes) and all(want[g] == v for g, v in got.items())
        assert batch["library_size_n"][i].item() == pytest.approx(row.data.sum())
