"""Writers of prepared datasets, shared by ``prepare`` (:mod:`scldm_scale.data.harmonize`) and the
synthetic atlas generator (:mod:`scldm_scale.data.synthetic`).

A prepared h5ad dataset is a folder::

    shard_0000.h5ad ...   X CSR int32 with the vocabulary's columns, one shared var, obs with the
                          label columns (full category tables) and cell_index
    heldout.h5ad          held-out cells (when there are some)
    vocab.json            the gene vocabulary (GeneVocab, with symbols when known)
    labels.json           one category table per label column (LabelTables)
    metadata.json         counts, shard list, label categories, ... (written last)

:class:`PreparedWriter` writes one into a temp folder that :func:`scldm_scale.io.atomic_dir` renames onto the
output at the end, so an interrupted run never leaves a folder that looks complete.
:class:`ShardScatter` lets ``prepare`` write cells in a global order across its inputs while it
reads one input at a time; :class:`SomaWriter` writes the same cells as a TileDB-SOMA experiment.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from scldm_scale.data.labels import LabelTables
from scldm_scale.data.reporter import Reporter
from scldm_scale.data.validate import HELDOUT_NAME
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.io import write_json_atomic

FORMAT = "scldm-scale/h5ad-shards"
FORMAT_VERSION = 1
SOMA_FORMAT = "scldm-scale/soma-experiment"
MEASUREMENT = "RNA"
X_LAYER = "data"


def write_h5ad(adata, path: str) -> None:
    """Every h5ad file of a prepared dataset is written here."""
    adata.write_h5ad(path)


def shard_sizes(n: int, shard_size: int) -> list[int]:
    """``n`` cells cut into shards of ``shard_size`` (the last one may be smaller)."""
    q, r = divmod(n, shard_size)
    return [shard_size] * q + ([r] if r else [])


def shard_files(n_shards: int) -> list[str]:
    width = max(4, len(str(n_shards - 1)))
    return [f"shard_{i:0{width}d}.h5ad" for i in range(n_shards)]


class PreparedWriter:
    """Writes the files of one prepared dataset into ``root``; :meth:`finish` writes the json files last."""

    def __init__(self, root: str, var: pd.DataFrame) -> None:
        self.root, self.var = root, var
        self.shards: list[dict[str, Any]] = []
        self.n_cells = self.nnz = 0
        self.heldout_parts: list[str] = []
        self.n_heldout = self.heldout_nnz = 0

    def _adata(self, x, obs: pd.DataFrame):
        import anndata

        x = scipy.sparse.csr_matrix(x, dtype=np.int32)
        return anndata.AnnData(X=x, obs=obs, var=self.var.copy()), x.nnz

    def write_shard(self, name: str, x, obs: pd.DataFrame) -> None:
        adata, nnz = self._adata(x, obs)
        write_h5ad(adata, os.path.join(self.root, name))
        self.shards.append({"file": name, "n_cells": int(adata.n_obs)})
        self.n_cells += adata.n_obs
        self.nnz += nnz

    def count(self, n_cells: int, nnz: int) -> None:
        """Training cells written elsewhere (the SOMA experiment)."""
        self.n_cells += int(n_cells)
        self.nnz += int(nnz)

    def add_heldout(self, x, obs: pd.DataFrame) -> None:
        """Held-out cells, in parts (concatenated on disk by :meth:`finish`)."""
        adata, nnz = self._adata(x, obs)
        parts_dir = os.path.join(self.root, "heldout-parts")
        os.makedirs(parts_dir, exist_ok=True)
        path = os.path.join(parts_dir, f"part_{len(self.heldout_parts):06d}.h5ad")
        write_h5ad(adata, path)
        self.heldout_parts.append(path)
        self.n_heldout += adata.n_obs
        self.heldout_nnz += nnz

    def _close_heldout(self) -> str | None:
        if not self.heldout_parts:
            return None
        out = os.path.join(self.root, HELDOUT_NAME)
        if len(self.heldout_parts) == 1:
            os.replace(self.heldout_parts[0], out)
        else:
            from anndata.experimental import concat_on_disk

            concat_on_disk(self.heldout_parts, out, merge="same")
        shutil.rmtree(os.path.join(self.root, "heldout-parts"), ignore_errors=True)
        return HELDOUT_NAME

    def finish(self, vocab: GeneVocab, labels: LabelTables, meta: dict[str, Any], fmt: str = FORMAT) -> dict[str, Any]:
        """Write ``heldout.h5ad``, ``vocab.json``, ``labels.json`` and then ``metadata.json`` (the common
        keys plus ``meta``); returns the metadata."""
        heldout = self._close_heldout()
        vocab.save(os.path.join(self.root, "vocab.json"))
        labels.save(os.path.join(self.root, "labels.json"))
        n_genes = len(vocab)
        n_total = self.n_cells + self.n_heldout
        out: dict[str, Any] = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "n_cells": self.n_cells,  # training cells (shards / experiment)
            "n_heldout": self.n_heldout,
            "n_cells_total": n_total,
            "n_genes": n_genes,
            "n_shards": len(self.shards),
            "shards": self.shards,
            "shard_sizes": [s["n_cells"] for s in self.shards],
            "heldout": {"file": heldout, "n_cells": self.n_heldout} if heldout else None,
            "vocab": "vocab.json",
            "labels": "labels.json",
            "nnz": int(self.nnz),
            "sparsity": 1.0 - (self.nnz + self.heldout_nnz) / float(max(1, n_total * n_genes)),
            **meta,
        }
        write_json_atomic(os.path.join(self.root, "metadata.json"), out)
        return out


# ---------------------------------------------------------------------------------------------
# scatter: cells of many inputs to their rows in the output, one input in memory at a time


class ShardScatter:
    """Cells handed in any order, read back block by block in output row order.

    ``starts`` are the first output rows of the blocks (shards) plus the end. :meth:`add` appends
    cells (their output rows, CSR counts, integer codes per cell, names) to their blocks' groups of
    one temp HDF5 file; :meth:`block` returns one block's cells sorted by row. Memory: what is
    handed to one :meth:`add` plus one block.
    """

    _CELL_CHUNK = 1 << 12
    _VALUE_CHUNK = 1 << 16

    def __init__(self, path: str, starts: np.ndarray, n_codes: int) -> None:
        import h5py

        self.path, self.starts, self.n_codes = path, np.asarray(starts, dtype=np.int64), int(n_codes)
        self.file = h5py.File(path, "w")
        text = h5py.string_dtype()
        for k in range(len(self.starts) - 1):
            g = self.file.create_group(str(k))
            for name, dtype, chunk in (("row", np.int64, self._CELL_CHUNK), ("nnz", np.int64, self._CELL_CHUNK),
                                       ("indices", np.int32, self._VALUE_CHUNK),
                                       ("data", np.int32, self._VALUE_CHUNK), ("names", text, self._CELL_CHUNK)):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
            g.create_dataset("codes", shape=(0, self.n_codes), maxshape=(None, self.n_codes), dtype=np.int32,
                             chunks=(self._CELL_CHUNK, max(1, self.n_codes)))

    @staticmethod
    def _append(ds, values) -> None:
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def add(self, rows_n: np.ndarray, x: scipy.sparse.csr_matrix, codes_nc: np.ndarray, names: np.ndarray) -> None:
        rows_n = np.asarray(rows_n, dtype=np.int64)
        block_n = np.searchsorted(self.starts, rows_n, side="right") - 1
        order = np.argsort(block_n, kind="stable")
        bounds = np.searchsorted(block_n[order], np.arange(len(self.starts)))
        for k in range(len(self.starts) - 1):
            sel = order[bounds[k] : bounds[k + 1]]
            if not len(sel):
                continue
            part = x[sel]
            g = self.file[str(k)]
            self._append(g["row"], rows_n[sel] - self.starts[k])
            self._append(g["nnz"], np.diff(part.indptr))
            self._append(g["indices"], part.indices.astype(np.int32))
            self._append(g["data"], part.data.astype(np.int32))
            self._append(g["codes"], np.asarray(codes_nc[sel], dtype=np.int32).reshape(len(sel), self.n_codes))
            self._append(g["names"], np.asarray(names, dtype=object)[sel])

    def block(self, k: int, n_cols: int) -> tuple[scipy.sparse.csr_matrix, np.ndarray, np.ndarray]:
        """``(x, codes, names)`` of block ``k``, one row per output row (all rows must have been added)."""
        g = self.file[str(k)]
        rows = g["row"][:]
        n = int(self.starts[k + 1] - self.starts[k])
        if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
            raise RuntimeError(f"shard scatter: block {k} holds {len(rows)} of its {n} rows")
        indptr = np.concatenate([[0], np.cumsum(g["nnz"][:])])
        x = scipy.sparse.csr_matrix((g["data"][:], g["indices"][:], indptr), shape=(n, n_cols))
        order = np.argsort(rows)
        names = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in g["names"][:]], dtype=object)
        return x[order], g["codes"][:][order], names[order]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if os.path.exists(self.path):
            os.remove(self.path)


# ---------------------------------------------------------------------------------------------
# SOMA


class SomaWriter:
    """One SOMA experiment written cell block by cell block; ``soma_joinid`` = ``cell_index``.

    The shapes are known up front (training cells x vocabulary), so the experiment is created
    once with its final domain and full enumerations, and each block (consecutive cells, in
    ``cell_index`` order) is a plain write of its obs rows and X coordinates, already in TileDB's
    global order (no registration pass over the growing experiment, no sort).
    """

    def __init__(
        self, uri: str, n_cells: int, label_columns: list[str], labels: LabelTables, source_names: list[str],
        vocab: GeneVocab, var: pd.DataFrame,
    ) -> None:
        import pyarrow as pa
        import tiledbsoma as soma

        self.uri = uri
        self.nnz = 0
        dict_t = pa.dictionary(pa.int32(), pa.large_string(), ordered=False)
        fields = [("obs_id", pa.large_string())]
        fields += [(c, dict_t) for c in label_columns]
        fields += [("cell_index", pa.int64()), ("source_file", dict_t)]
        enums = {c: pa.array(labels.categories[c], type=pa.large_string()) for c in label_columns}
        enums["source_file"] = pa.array(source_names, type=pa.large_string())
        g = len(vocab)
        var_cols = {
            "soma_joinid": np.arange(g, dtype=np.int64),
            "var_id": pa.array(vocab.gene_ids, pa.large_string()),
        }
        var_fields = [("var_id", pa.large_string())]
        if "gene_symbol" in var.columns:
            var_cols["gene_symbol"] = pa.array(var["gene_symbol"].tolist(), pa.large_string())
            var_fields.append(("gene_symbol", pa.large_string()))
        with soma.Experiment.create(uri) as exp:
            obs = exp.add_new_dataframe(
                "obs", schema=pa.schema(fields), index_column_names=["soma_joinid"], domain=[(0, n_cells - 1)]
            )
            obs.extend_enumeration_values(enums)
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(MEASUREMENT, soma.Measurement)
            var_df = rna.add_new_dataframe(
                "var", schema=pa.schema(var_fields), index_column_names=["soma_joinid"], domain=[(0, g - 1)]
            )
            var_df.write(pa.table(var_cols))
            # one space tile spans all genes: a cell's counts are contiguous (rows are what sources read), and
            # row-major blocks are already in TileDB's global order, so writes need no sort
            tiles = {"soma_dim_0": {"tile": min(2048, n_cells)}, "soma_dim_1": {"tile": g}}
            rna.add_new_collection("X").add_new_sparse_ndarray(
                X_LAYER, type=pa.int32(), shape=(n_cells, g), platform_config={"tiledb": {"create": {"dims": tiles}}}
            )
        self.labels = label_columns
        self.enums = enums
        self.exp = soma.Experiment.open(uri, "w")  # reopened: writes see the extended enumerations

    def add(self, x: scipy.sparse.csr_matrix, obs: pd.DataFrame) -> None:
        import pyarrow as pa
        import tiledbsoma as soma

        rows = obs["cell_index"].to_numpy(np.int64)
        table = {"soma_joinid": rows, "obs_id": pa.array(obs.index.astype(str).tolist(), pa.large_string())}
        for c in [*self.labels, "source_file"]:
            codes = pa.array(np.asarray(obs[c].cat.codes, dtype=np.int32))
            table[c] = pa.DictionaryArray.from_arrays(codes, self.enums[c])
        table["cell_index"] = rows
        self.exp.obs.write(pa.table(table))
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
            raise ValueError("SomaWriter.add: cells must come in ascending cell_index order")
        x = scipy.sparse.csr_matrix(x)
        x.sort_indices()
        coo = x.tocoo()  # row-major with ascending genes: TileDB's global order for the tiles above
        self.exp.ms[MEASUREMENT].X[X_LAYER].write(
            pa.table(
                {
                    "soma_dim_0": rows[coo.row].astype(np.int64),
                    "soma_dim_1": coo.col.astype(np.int64),
                    "soma_data": coo.data.astype(np.int32),
                }
            ),
            platform_config=soma.TileDBWriteOptions(sort_coords=False),
        )
        self.nnz += x.nnz

    def close(self) -> None:
        if self.exp is not None:
            self.exp.close()
            self.exp = None


# ---------------------------------------------------------------------------------------------
# output folders: written as <OUT>.tmp-<pid>, renamed onto OUT at the end


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: str, report: Reporter) -> None:
    """Remove ``<OUT>.tmp-<pid>`` / ``<OUT>.old-<pid>`` left by interrupted runs (dead pids only)."""
    pattern = re.compile(re.escape(os.path.basename(out)) + r"\.(tmp|old)-(\d+)$")
    for p in glob.glob(glob.escape(out) + ".*-*"):
        m = pattern.match(os.path.basename(p))
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        report.info(f"removing {p} left by an interrupted run")
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)
