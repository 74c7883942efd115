"""Token batches streamed from a TileDB-SOMA experiment (local, URI or CELLxGENE Census).

The selection (``data.value_filter`` on obs) is read once: its ``soma_joinid``s (ascending)
and the encoded label columns, a few bytes per cell. X is never materialized: the stream reads
the selected cells in shuffled chunks, a shuffle buffer at a time.

Epoch order (global: the same for any number of ranks and workers, see
:mod:`scldm_scale.data.source`; deterministic given ``seed``, epoch and ``batch_size``):

1. The selection is cut into chunks of ``chunk_size`` consecutive joinids (I/O locality); a
   permutation seeded by ``(seed, epoch)`` orders the chunks.
2. The chunk-ordered cells are cut into *super-buffers* of ``READ_LANES`` lanes of
   ``shuffle_buffer`` cells each (rounded to whole batches). Slot ``r`` (the ``r``-th run of
   ``batch_size`` cells) of a super-buffer belongs to lane ``r % READ_LANES``; the cells of a lane
   are permuted (seeded by seed, epoch, super-buffer, lane) and put back into its slots. Every
   batch thus mixes ``shuffle_buffer`` cells from ``shuffle_buffer / chunk_size`` chunks, and
   without shuffling batches are plain runs of the selection.
3. The stream's blocks (one per rank per step) are consecutive slots, so when the ranks x workers
   that read divide ``READ_LANES`` each one reads its own lane (disjoint chunks); a reader reads,
   per super-buffer, only the cells of its own blocks, in one X query, and reads the next group in
   a background thread while it tokenizes.

Memory: the selection's joinids and label codes (about 11 bytes per selected cell), plus per
process at most two super-buffers' worth of cells (``2 * READ_LANES * shuffle_buffer``), whatever
the size of the experiment.

``data.path`` is the experiment URI; with ``data.census_version`` set it is the Census
organism (default ``homo_sapiens``) and the Census is opened with ``cellxgene_census``
(``pip install 'scldm-scale[census]'``); Census counts are in ``data.x_layer=raw`` and its
gene ids in the var column ``feature_id`` (found automatically).

TileDB is not fork-safe, see ``_TILEDB_PID``: the setup runs in a short-lived forked child so
that the training process stays clean and can fork dataloader workers.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import scipy.sparse
import torch

from scldm_scale.data.config import DataConfig
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.source import (
    INFERENCE_KEY,
    Block,
    StreamSource,
    batch_ranges,
    block_rng,
    inference_range,
    log_library_stats,
)
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

log = logging.getLogger(__name__)

READ_LANES = 2  # batches alternate between this many shuffle buffers (see the module docstring)
# TileDB's memory budget per query: with the default (10 GB) a query holds every tile it touches,
# so the working set grows with the experiment; a small budget makes TileDB stream the tiles.
TILEDB_MEMORY_BUDGET = 128 << 20
CENSUS_ORGANISM = "homo_sapiens"
_VAR_ID_CANDIDATES = ("var_id", "feature_id", "gene_id", "ensembl_id")  # tiledbsoma.io, Census, common names
SYMBOL_COLUMNS = ("gene_symbol", "feature_name", "gene_symbols", "gene_name")  # prepare, Census, common names


# TileDB is not fork-safe: once a process has created a TileDB context, reads in a process
# forked from it hang. The pid of the process that opened TileDB here is remembered so that
# (a) a dataset built in a clean process does its setup in a short-lived forked child and
# leaves the process clean for forked dataloader workers, and (b) a process forked from a
# TileDB-using parent fails with a clear error instead of hanging.
_TILEDB_PID: int | None = None


def _check_fork_safe(where: str) -> None:
    if _TILEDB_PID is not None and _TILEDB_PID != os.getpid():
        raise ScldmError(
            f"{where}: this process was forked from process {_TILEDB_PID} after it had opened TileDB-SOMA, "
            "and TileDB is not fork-safe (reads would hang); build SOMA datasets before reading from them in the "
            "parent (with data.num_workers > 0 the main process never reads), or start processes with 'spawn'"
        )


def _child_main(conn, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as e:  # re-raised in the parent
        result = (False, e if isinstance(e, ScldmError) else RuntimeError(f"{type(e).__name__}: {e}"))
    try:
        conn.send(result)
    finally:
        conn.close()


def _call_in_forked_child(fn, *args):
    """``fn(*args)`` computed in a forked child process; its result (or error) is sent back."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        ok, value = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"SOMA setup process died (exit code {proc.exitcode})") from None
    finally:
        recv.close()
    proc.join()
    if not ok:
        raise value
    return value


def _in_clean_process(fn, *args):
    """``fn(*args)``, in a forked child unless this process already holds TileDB state (or cannot fork):
    keeps this process free of TileDB so that dataloader workers can still fork from it."""
    if _TILEDB_PID == os.getpid() or "fork" not in multiprocessing.get_all_start_methods():
        return fn(*args)
    return _call_in_forked_child(fn, *args)


def _census_open(version: str):
    try:
        import cellxgene_census
    except ImportError:
        raise ScldmError(
            f"data.census_version={version!r}: the cellxgene-census package is not installed; "
            "run `pip install 'scldm-scale[census]'` or point data.path at a local SOMA experiment"
        ) from None
    try:
        kwargs = {}
        default_context = getattr(cellxgene_census, "get_default_soma_context", None)
        if default_context is not None:  # the Census's S3 settings plus our memory budget
            kwargs["context"] = default_context(tiledb_config={"sm.mem.total_budget": TILEDB_MEMORY_BUDGET})
        return cellxgene_census.open_soma(census_version=version, **kwargs)
    except Exception as e:  # network, unknown version, ...
        raise ScldmError(
            f"data.census_version={version!r}: cannot open the CELLxGENE Census ({type(e).__name__}: {e}); "
            "check the version (cellxgene_census.get_census_version_directory()) and network access"
        ) from None


def _small_int_dtype(max_value: int) -> np.dtype:
    for dt in (np.int8, np.int16, np.int32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


class _SomaExperiment:
    """Where a SOMA experiment is (``data.path`` / ``data.census_version``) and how to open its parts."""

    def _init_location(self, cfg: DataConfig) -> None:
        self.census_version = str(cfg.census_version or "")
        if self.census_version:
            self.uri = str(cfg.path or CENSUS_ORGANISM)
            self.where = f"census {self.census_version}/{self.uri}"
        else:
            self.uri = os.path.expanduser(str(cfg.path))
            if not self.uri:
                raise ScldmError(
                    "data.path is empty; set it to a TileDB-SOMA experiment (directory or URI), "
                    "or set data.census_version to read the CELLxGENE Census"
                )
            self.where = self.uri
        self.measurement = str(cfg.measurement)
        self.x_layer = str(cfg.x_layer)
        self.value_filter = str(cfg.value_filter or "")
        self.label_columns = list(cfg.label_columns)

    def _open(self):
        """``(root, experiment)``: root is what to close (the Census collection or the experiment)."""
        import tiledbsoma

        global _TILEDB_PID
        _TILEDB_PID = os.getpid()

        if self.census_version:
            census = _census_open(self.census_version)
            try:
                return census, census["census_data"][self.uri]
            except KeyError:
                organisms = list(census["census_data"].keys())
                census.close()
                raise ScldmError(
                    f"{self.where}: organism {self.uri!r} is not in the Census (organisms: {organisms}); "
                    "set data.path to one of them"
                ) from None
        context = tiledbsoma.SOMATileDBContext(tiledb_config={"sm.mem.total_budget": TILEDB_MEMORY_BUDGET})
        try:
            exp = tiledbsoma.Experiment.open(self.uri, context=context)
        except tiledbsoma.DoesNotExistError:
            raise ScldmError(
                f"{self.uri}: no TileDB-SOMA experiment at this URI (it does not exist); set data.path to an "
                "experiment written by tiledbsoma.io.from_h5ad / from_anndata, or check the path and credentials"
            ) from None
        except (tiledbsoma.SOMAError, TypeError, ValueError, OSError) as e:
            raise ScldmError(
                f"{self.uri}: cannot open as a TileDB-SOMA experiment ({type(e).__name__}: {e}); "
                "set data.path to a SOMA Experiment (not a collection, array or h5ad file)"
            ) from None
        return exp, exp

    def _measurement(self, exp):
        names = list(exp.ms.keys()) if "ms" in exp else []
        if self.measurement not in names:
            raise ScldmError(
                f"{self.where}: measurement {self.measurement!r} not found (measurements: {names}); "
                "set data.measurement"
            )
        return exp.ms[self.measurement]

    def _x_array(self, ms):
        layers = list(ms.X.keys()) if "X" in ms else []
        if self.x_layer not in layers:
            raise ScldmError(
                f"{self.where}: X layer {self.x_layer!r} not found in measurement {self.measurement!r} "
                f"(layers: {layers}); set data.x_layer to the raw counts layer"
            )
        return ms.X[self.x_layer]

    def _var_ids(self, ms, column: str) -> tuple[np.ndarray, np.ndarray, str]:
        """``(soma_joinid, gene id, column)`` of every var row; ``column`` is found when empty."""
        var = ms.var
        names = [f.name for f in var.schema]
        if not column:
            original = json.loads(var.metadata.get("soma_dataframe_original_index_name", "null") or "null")
            candidates = ([original] if isinstance(original, str) else []) + list(_VAR_ID_CANDIDATES)
            column = next((c for c in candidates if c in names), "")
            if not column:
                raise ScldmError(
                    f"{self.where}: cannot tell which var column holds the gene ids (columns: {names}); "
                    "set data.var_id_column"
                )
        elif column not in names:
            raise ScldmError(
                f"{self.where}: data.var_id_column={column!r} is not a var column of measurement "
                f"{self.measurement!r} (columns: {names}); set it to the column holding the gene ids"
            )
        tbl = var.read(column_names=["soma_joinid", column]).concat()
        return tbl["soma_joinid"].to_numpy(), tbl[column].to_numpy(zero_copy_only=False), column

    def _obs_tables(self, exp, columns: list[str]) -> Iterator:
        """Arrow tables of obs ``soma_joinid`` + ``columns`` over the cells ``data.value_filter`` selects."""
        import tiledbsoma

        obs_names = [f.name for f in exp.obs.schema]
        missing = [c for c in columns if c not in obs_names]
        if missing:
            raise ScldmError(
                f"{self.where}: obs has no column(s) {missing} (columns: {obs_names[:30]}); "
                "fix data.label_columns"
            )
        try:
            reader = exp.obs.read(column_names=["soma_joinid", *columns], value_filter=self.value_filter or None)
            for tbl in reader:
                if tbl.num_rows:
                    yield tbl
        except (tiledbsoma.SOMAError, ValueError, TypeError) as e:
            if not self.value_filter:
                raise ScldmError(f"{self.where}: cannot read obs ({type(e).__name__}: {e})") from None
            raise ScldmError(
                f"{self.where}: data.value_filter={self.value_filter!r} is not a valid obs filter "
                f"({type(e).__name__}: {e}); write it like \"cell_type == 'B cell' and tissue in ['blood', 'lung']\" "
                f"over obs columns {obs_names[:30]}"
            ) from None

class SomaSource(_SomaExperiment, StreamSource):
    """Token batches over a TileDB-SOMA experiment (see the module docstring for the epoch order).

    Yields the same batch dict as :class:`~scldm_scale.data.h5ad_source.H5ADSource`
    (``cell_index_n`` holds ``soma_joinid``s). TileDB handles are opened lazily in the process
    that reads (each dataloader worker opens its own) and are never pickled.
    """

    order_uses_batch_size = True  # lanes are made of batch-sized slots

    def __init__(self, cfg: DataConfig, vocab: GeneVocab, labels: LabelTables) -> None:
        for key in ("batch_size", "chunk_size", "shuffle_buffer"):
            if int(getattr(cfg, key)) < 1:
                raise ScldmError(f"data.{key}={getattr(cfg, key)}: must be >= 1")
        labels.check_columns(cfg.label_columns)
        self._init_location(cfg)
        self.cfg = cfg
        self.vocab, self.labels = vocab, labels
        self.batch_size = int(cfg.batch_size)
        self.chunk_size = int(cfg.chunk_size)
        self.lane_batches = max(1, int(cfg.shuffle_buffer) // self.batch_size)  # batches per lane (shuffle buffer)
        self.shuffle, self.seed = bool(cfg.shuffle), int(cfg.seed)
        self._handle: tuple[Any, Any, int] | None = None  # (root to close, X array, pid)
        self._plans: dict = {}

        _check_fork_safe(self.where)
        setup = _in_clean_process(self._setup, vocab, str(cfg.var_id_column or ""))
        var_to_vocab_g, self.n_var, joinids_n, label_codes_na = setup
        # views with canonical dtypes: unpickled arrays carry dtype copies that pybind11 (IntIndexer) rejects
        self.var_to_vocab_g = var_to_vocab_g.view(np.int64)
        self.joinids_n = joinids_n.view(np.int64)
        self.label_codes_na = label_codes_na.view(np.dtype(label_codes_na.dtype.str))

    @classmethod
    def read_tables(cls, cfg: DataConfig) -> tuple[GeneVocab, LabelTables]:
        """``data.vocab_path`` / ``data.labels_path``, else the ``vocab.json`` / ``labels.json`` that
        ``prepare soma`` writes into the experiment, else read from the experiment itself
        (:func:`experiment_vocab_and_labels`: the Census, experiments ingested by other tools)."""
        paths = {"vocab_path": cfg.vocab_path, "labels_path": cfg.labels_path}
        local = os.path.expanduser(str(cfg.path))
        if not cfg.census_version and os.path.isdir(local):
            for key, name in (("vocab_path", "vocab.json"), ("labels_path", "labels.json")):
                if not paths[key] and os.path.isfile(os.path.join(local, name)):
                    paths[key] = os.path.join(local, name)
        vocab = GeneVocab.load(paths["vocab_path"]) if paths["vocab_path"] else None
        labels = LabelTables.load(paths["labels_path"]) if paths["labels_path"] else None
        if vocab is None or labels is None:
            read_vocab, read_labels = experiment_vocab_and_labels(cfg, want_vocab=vocab is None,
                                                                  want_labels=labels is None)
            vocab = vocab if vocab is not None else read_vocab
            labels = labels if labels is not None else read_labels
        return vocab, labels

    # -----------------------------------------------------------------------------------------
    # opening and setup

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None  # each process opens its own TileDB handles
        state["_plans"] = {}
        return state

    def _setup(self, vocab: GeneVocab, var_id_column: str):
        """Open, check measurement / layer, map var to the vocabulary and read the selection."""
        root, exp = self._open()
        try:
            ms = self._measurement(exp)
            self._x_array(ms)  # fails early on a missing layer
            var_to_vocab_g, n_var = self._map_var(ms, vocab, var_id_column)
            joinids_n, label_codes_na = self._select(exp)
        finally:
            root.close()
        return var_to_vocab_g, n_var, joinids_n, label_codes_na

    def _map_var(self, ms, vocab: GeneVocab, column: str) -> tuple[np.ndarray, int]:
        """Vocabulary index per var ``soma_joinid`` (-1 = not in the vocabulary)."""
        joinids, gene_ids, column = self._var_ids(ms, column)
        idx = vocab.index_map(gene_ids)
        n_var = int(joinids.max()) + 1 if len(joinids) else 0
        var_to_vocab_g = np.full(n_var, -1, dtype=np.int64)
        var_to_vocab_g[joinids] = idx
        n_in = int((idx >= 0).sum())
        if n_in == 0:
            raise ScldmError(
                f"{self.where}: none of the {len(gene_ids)} var ids in column {column!r} are in the gene vocabulary "
                f"(e.g. {list(gene_ids[:3])} vs {vocab.gene_ids[:3]}); set data.var_id_column or use the vocabulary "
                "of this data (data.vocab_path)"
            )
        if n_in < len(gene_ids):
            n_out = len(gene_ids) - n_in
            log.info("%d of %d genes of %s are outside the vocabulary and dropped", n_out, len(gene_ids), self.where)
        return var_to_vocab_g, n_var

    def _select(self, exp) -> tuple[np.ndarray, np.ndarray]:
        """Selected ``soma_joinid``s (ascending) and their label codes (n, attributes)."""
        attrs = self.labels.attributes
        code_dtype = _small_int_dtype(max(self.labels.cardinalities, default=1))
        ids_parts, code_parts = [], []
        for tbl in self._obs_tables(exp, self.label_columns):
            codes = np.empty((tbl.num_rows, len(attrs)), dtype=code_dtype)
            for a, attr in enumerate(attrs):
                if attr in self.label_columns:
                    codes[:, a] = self.labels.encode(attr, tbl[attr].to_pandas())
                else:
                    codes[:, a] = self.labels.unknown_code(attr)
            ids_parts.append(tbl["soma_joinid"].to_numpy())
            code_parts.append(codes)
        if not ids_parts:
            what = f"data.value_filter={self.value_filter!r} selects" if self.value_filter else "obs has"
            raise ScldmError(f"{self.where}: {what} no cells; relax the filter or check data.path")
        ids = np.concatenate(ids_parts).astype(np.int64, copy=False)
        del ids_parts
        codes = np.concatenate(code_parts)
        del code_parts
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            ids, codes = ids[order], codes[order]
        by = f" by {self.value_filter!r}" if self.value_filter else ""
        log.info("%s: %d cells selected%s", self.where, len(ids), by)
        return ids, codes

    def _x(self):
        """The X array, opened once per process (fork- and spawn-safe)."""
        pid = os.getpid()
        if self._handle is None or self._handle[2] != pid:
            _check_fork_safe(self.where)
            root, exp = self._open()  # a handle inherited through fork is left alone, never closed here
            self._handle = (root, self._x_array(self._measurement(exp)), pid)
        return self._handle[1]

    def close(self) -> None:
        if self._handle is not None and self._handle[2] == os.getpid():
            self._handle[0].close()
        self._handle = None

    # -----------------------------------------------------------------------------------------
    # epoch order

    @property
    def n_cells(self) -> int:
        """Cells selected by the filter."""
        return int(len(self.joinids_n))

    @property
    def superbuffer_cells(self) -> int:
        return READ_LANES * self.lane_batches * self.batch_size

    def describe(self) -> str:
        return self.where

    def _cached(self, key: tuple, make, keep: int = 2):
        if key not in self._plans:
            same = [k for k in self._plans if k[0] == key[0]]
            for old in same[: max(0, len(same) - keep + 1)]:
                del self._plans[old]
            self._plans[key] = make()
        return self._plans[key]

    def _chunk_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunks of epoch ``epoch`` in order and the offset where each starts in the chunk order."""

        def make():
            n, c = self.n_cells, self.chunk_size
            n_chunks = -(-n // c)
            order = np.random.default_rng([self.seed % (1 << 63), epoch, 0x50AA]).permutation(n_chunks)
            lengths = np.minimum(c, n - order * c)
            return order.astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        return self._cached(("chunks", epoch), make)

    def _superbuffer(self, epoch: int, u: int) -> np.ndarray:
        """Selection positions of super-buffer ``u`` of epoch ``epoch``, in epoch order."""

        def make():
            n, b, lanes = self.n_cells, self.batch_size, READ_LANES
            q_lo = u * self.superbuffer_cells
            q = np.arange(q_lo, min(n, q_lo + self.superbuffer_cells), dtype=np.int64)
            chunks, starts = self._chunk_plan(epoch)
            k = np.searchsorted(starts, q, side="right") - 1
            seq = chunks[k] * self.chunk_size + (q - starts[k])  # chunk order
            lane_n = (np.arange(len(q)) // b) % lanes
            out = np.empty_like(seq)
            for lane in range(lanes):
                idx = np.flatnonzero(lane_n == lane)
                rng = np.random.default_rng([self.seed % (1 << 63), epoch, u, lane, 0x1A2E])
                out[idx] = seq[idx[rng.permutation(len(idx))]]
            return out

        return self._cached(("superbuffer", epoch, u), make)

    def epoch_positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        size, parts = self.superbuffer_cells, []
        while lo < hi:
            u = lo // size
            take = min(hi, (u + 1) * size)
            parts.append(self._superbuffer(epoch, u)[lo - u * size : take - u * size])
            lo = take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def epoch_joinids(self, epoch: int) -> np.ndarray:
        """All ``soma_joinid``s of one epoch, in order (for tests and inspection)."""
        return self.joinids_n[self.epoch_positions(epoch, 0, self.n_cells)]

    # -----------------------------------------------------------------------------------------
    # reading

    def _read_rows(self, pos_n: np.ndarray) -> scipy.sparse.csr_matrix:
        """CSR block (cells x var joinids) whose row ``i`` is the cell at selection position ``pos_n[i]``.

        One X query over the sorted joinids; the COO result is compressed straight into the
        requested row order (no per-batch row gathers afterwards) unless a cell is asked for twice.
        """
        import tiledbsoma

        ids_n = self.joinids_n[pos_n]
        unique_ids, inverse = np.unique(ids_n, return_inverse=True)
        x = self._x()
        try:
            tbl = x.read(coords=(unique_ids,)).tables().concat()
        except tiledbsoma.SOMAError as e:
            raise ScldmError(
                f"{self.where}: reading X layer {self.x_layer!r} failed ({type(e).__name__}: {e})"
            ) from None
        d0 = tbl["soma_dim_0"].to_numpy()
        d1 = tbl["soma_dim_1"].to_numpy()
        data = tbl["soma_data"].to_numpy()
        del tbl
        if len(d1) and int(d1.max()) >= self.n_var:
            raise ScldmError(
                f"{self.where}: X layer {self.x_layer!r} has var joinid {int(d1.max())} beyond var "
                f"({self.n_var} rows); the experiment is inconsistent"
            )
        if len(unique_ids) == len(ids_n):
            rows = tiledbsoma.IntIndexer(ids_n.astype(np.int64)).get_indexer(d0)
            # coo -> csr is a linear counting sort that keeps each row's columns in read (sorted) order
            return scipy.sparse.coo_matrix((data, (rows, d1)), shape=(len(ids_n), self.n_var)).tocsr()
        rows = np.searchsorted(unique_ids, d0)
        block = scipy.sparse.coo_matrix((data, (rows, d1)), shape=(len(unique_ids), self.n_var)).tocsr()
        return block[inverse]

    def _read_group_key(self, block: Block) -> tuple[int, int, int]:
        kind, start = block.key
        return kind, start // self.n_cells, (start % self.n_cells) // self.superbuffer_cells

    def read_blocks(self, blocks: Iterable[Block], compact: bool) -> Iterator[dict]:
        """Token batches of ``blocks``, in order. Consecutive blocks that start in the same
        super-buffer are read with one X query; the next group is read in a background thread
        while the current one is tokenized."""
        from concurrent.futures import ThreadPoolExecutor

        def read(group: list[Block]):
            return group, self._read_rows(np.concatenate([blk.positions for blk in group]))

        groups = (list(g) for _, g in itertools.groupby(blocks, key=self._read_group_key))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="soma-read") as pool:
            pending = None
            for group in itertools.chain(groups, [None]):
                nxt = pool.submit(read, group) if group is not None else None
                if pending is not None:
                    done, x = pending.result()
                    lo = 0
                    for blk in done:
                        hi = lo + len(blk.positions)
                        yield tokenize_counts(
                            x[lo:hi],
                            self.var_to_vocab_g,
                            self.label_codes_na[blk.positions],
                            self.cfg.max_genes,
                            block_rng(self.seed, blk.key),
                            cell_index_n=self.joinids_n[blk.positions],
                            where=f"{self.where} (X layer {self.x_layer!r})",
                            pad=not compact,
                        )
                        lo = hi
                    del x
                pending = nxt

    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        lo, hi = inference_range(self.n_cells, rank, world)
        blocks = (Block((INFERENCE_KEY, a), np.arange(a, b, dtype=np.int64)) for a, b in batch_ranges(lo, hi, batch_size))
        return self.read_blocks(blocks, compact=False)

    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]:
        """Over the first ``max_cells`` selected cells (by ``soma_joinid``)."""
        return log_library_stats(experiment_library_sizes(self.cfg, max_cells))


# ---------------------------------------------------------------------------------------------
# vocabulary and label tables of an experiment without `prepare` files


def experiment_vocab_and_labels(
    cfg: DataConfig, want_vocab: bool = True, want_labels: bool = True
) -> tuple[GeneVocab | None, LabelTables | None]:
    """The gene vocabulary and label tables of a SOMA experiment (e.g. the Census), read from it.

    Vocabulary: the gene ids of ``data.measurement``'s var (column ``data.var_id_column``, found
    when empty) in ``soma_joinid`` order, with the symbols of the first of :data:`SYMBOL_COLUMNS`
    var has (the Census: ``feature_name``). Label tables: per ``data.label_columns`` entry, the sorted
    distinct values over the cells ``data.value_filter`` selects (plus ``unknown``). Only obs label
    columns are read, streamed; the read runs in a short-lived forked child like the dataset setup.
    """
    ref = _SomaExperiment()
    ref._init_location(cfg)
    _check_fork_safe(ref.where)
    return _in_clean_process(_read_tables, ref, str(cfg.var_id_column or ""), want_vocab, want_labels)


def _read_tables(ref: _SomaExperiment, var_id_column: str, want_vocab: bool, want_labels: bool):
    root, exp = ref._open()
    try:
        ms = ref._measurement(exp)
        vocab = labels = None
        if want_vocab:
            joinids, gene_ids, column = ref._var_ids(ms, var_id_column)
            order = np.argsort(joinids, kind="stable")
            var_names = [f.name for f in ms.var.schema]
            symbol_column = next((c for c in SYMBOL_COLUMNS if c in var_names and c != column), "")
            symbols = None
            if symbol_column:
                tbl = ms.var.read(column_names=["soma_joinid", symbol_column]).concat()
                by_joinid = dict(zip(tbl["soma_joinid"].to_numpy().tolist(), tbl[symbol_column].to_pylist()))
                symbols = [by_joinid.get(int(j)) for j in joinids[order]]
            try:
                vocab = GeneVocab.from_var(gene_ids[order], symbols=symbols)
            except ScldmError as e:
                raise ScldmError(f"{ref.where}: var column {column!r}: {e}; or set data.vocab_path") from None
        if want_labels:
            seen: dict[str, set[str]] = {c: set() for c in ref.label_columns}
            for tbl in ref._obs_tables(exp, ref.label_columns):
                for c in ref.label_columns:
                    seen[c].update(str(v) for v in tbl[c].to_pandas().dropna().unique())
            labels = LabelTables({c: sorted(values) for c, values in seen.items()})
    finally:
        root.close()
    return vocab, labels


def experiment_library_sizes(cfg: DataConfig, max_cells: int) -> np.ndarray:
    """Total counts of up to ``max_cells`` selected cells (the first by ``soma_joinid``), read in a
    short-lived forked child like the dataset setup."""
    ref = _SomaExperiment()
    ref._init_location(cfg)
    _check_fork_safe(ref.where)
    return _in_clean_process(_read_library_sizes, ref, int(max_cells))


def _read_library_sizes(ref: _SomaExperiment, max_cells: int) -> np.ndarray:
    root, exp = ref._open()
    try:
        x = ref._x_array(ref._measurement(exp))
        ids = []
        for tbl in ref._obs_tables(exp, []):
            ids.append(tbl["soma_joinid"].to_numpy())
            if sum(len(i) for i in ids) >= max_cells:
                break
        ids_n = np.sort(np.concatenate(ids))[:max_cells] if ids else np.zeros(0, np.int64)
        if not len(ids_n):
            return np.zeros(0)
        tbl = x.read(coords=(ids_n,)).tables().concat()
        rows = np.searchsorted(ids_n, tbl["soma_dim_0"].to_numpy())
        return np.bincount(rows, weights=tbl["soma_data"].to_numpy().astype(np.float64), minlength=len(ids_n))
    finally:
        root.close()
