"""Latent cache for stage 2: ``encode`` writes every cell's latent tokens once, stage 2 streams them.

Layout of a cache directory::

    latents_{run}_rank{r}_part{k}.npy     float32 (n, m, z)   raw (unstandardized) latents
    labels_{run}_rank{r}_part{k}.npy      int64   (n, a)      label codes (LabelTables order)
    cell_index_{run}_rank{r}_part{k}.npy  int64   (n,)        global cell ids
    manifest_rank{r}.json                 parts written by rank r of run ``run`` (LatentCacheWriter.close)
    manifest.json                         all parts, n_cells, shapes, label attributes, stats, run id and
                                          world size (finalize_latent_cache, once every rank closed)

``run`` is one id shared by the ranks of one ``encode`` (:func:`shared_run_id`). Finalizing merges
exactly the manifests of ranks ``0..world_size-1`` carrying that id: manifests and parts left by an
earlier run (e.g. with more ranks) are never merged, and are deleted once the new manifest is in
place. Every file is written to a temp sibling and renamed, and readers only trust
``manifest.json``, so an interrupted ``encode`` never leaves a cache that looks complete.
``stats`` holds the per-dimension latent mean/std used to standardize latents in stage 2.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from scldm_scale.data.labels import LabelTables
from scldm_scale.data.source import Block, StreamSource, batch_ranges, inference_range
from scldm_scale.data.vocab import read_json
from scldm_scale.io import atomic_path, write_json_atomic
from scldm_scale import comm
from scldm_scale.errors import ScldmError

CACHE_FORMAT = "scldm-scale/latent-cache"
CACHE_FORMAT_VERSION = 2
_PART_BYTES = 64 << 20  # target size of one latents part file
_PART_FILE_RE = re.compile(r"^(latents|labels|cell_index)_.+_rank\d+_part\d+\.npy$")
_RANK_MANIFEST_RE = re.compile(r"^manifest_rank(\d+)\.json$")


def _npy_layout(path: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    """Data offset, dtype and shape of a ``.npy`` part file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            fortran, dtype, shape = True, None, ()
        if fortran or dtype.hasobject:
            raise ScldmError(f"{path}: not a latent cache part (.npy version {version}); re-run `scldm-scale encode`")
        return f.tell(), dtype, tuple(shape)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def shared_run_id() -> str:
    """A new run id, the same on every rank (rank 0's, broadcast when a process group is initialized)."""
    return str(comm.broadcast_object(uuid.uuid4().hex[:12]))


def _check_run_id(run_id: str) -> str:
    run_id = str(run_id)
    if not re.fullmatch(r"[A-Za-z0-9-]+", run_id):
        raise ValueError(f"run_id {run_id!r}: use letters, digits and '-' only (see shared_run_id)")
    return run_id


class LatentCacheWriter:
    """Per-rank writer of latent parts. Buffers at most one part (~64 MiB) in memory.

    ``run_id`` (:func:`shared_run_id`) and ``world_size`` identify the ``encode`` run; they go into
    the part names and the rank's manifest, and :func:`finalize_latent_cache` checks them.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        n_tokens: int,
        d_latent: int,
        label_attributes: Sequence[str],
        *,
        run_id: str,
        world_size: int,
        part_cells: int | None = None,
    ) -> None:
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.rank, self.n_tokens, self.d_latent = int(rank), int(n_tokens), int(d_latent)
        self.run_id, self.world_size = _check_run_id(run_id), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.label_attributes = list(label_attributes)
        self.part_cells = int(part_cells or max(1, _PART_BYTES // (4 * self.n_tokens * self.d_latent)))
        # one part's rows, filled in place (pages are touched as rows arrive: a small encode stays small)
        self._z = np.empty((self.part_cells, self.n_tokens, self.d_latent), dtype=np.float32)
        self._labels = np.empty((self.part_cells, len(self.label_attributes)), dtype=np.int64)
        self._cells = np.empty(self.part_cells, dtype=np.int64)
        self._buffered = 0
        self.parts: list[dict[str, Any]] = []
        self.closed = False

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def write(self, z_nmz: np.ndarray, labels_na: np.ndarray, cell_index_n: np.ndarray) -> None:
        if self.closed:
            raise RuntimeError("LatentCacheWriter.write after close")
        z_nmz = np.asarray(z_nmz, dtype=np.float32)
        labels_na = np.asarray(labels_na, dtype=np.int64)
        cell_index_n = np.asarray(cell_index_n, dtype=np.int64).reshape(-1)
        n = z_nmz.shape[0]
        if z_nmz.shape[1:] != (self.n_tokens, self.d_latent):
            raise ValueError(f"z_nmz has shape {z_nmz.shape}, expected (n, {self.n_tokens}, {self.d_latent})")
        if labels_na.shape != (n, len(self.label_attributes)) or cell_index_n.shape != (n,):
            raise ValueError(
                f"labels_na {labels_na.shape} / cell_index_n {cell_index_n.shape} do not match {n} cells "
                f"and {len(self.label_attributes)} label attributes"
            )
        at = 0
        while at < n:
            take = min(n - at, self.part_cells - self._buffered)
            rows = slice(self._buffered, self._buffered + take)
            self._z[rows] = z_nmz[at: at + take]
            self._labels[rows] = labels_na[at: at + take]
            self._cells[rows] = cell_index_n[at: at + take]
            self._buffered += take
            at += take
            if self._buffered == self.part_cells:
                self._flush()

    def _flush(self) -> None:
        n, k = self._buffered, len(self.parts)
        names = {key: f"{key}_{self.run_id}_rank{self.rank}_part{k}.npy" for key in ("latents", "labels", "cell_index")}
        for key, rows in (("latents", self._z), ("labels", self._labels), ("cell_index", self._cells)):
            with atomic_path(os.path.join(self.out_dir, names[key])) as tmp, open(tmp, "wb") as f:
                np.save(f, rows[:n])
        self.parts.append({**names, "n_cells": int(n), "rank": self.rank})
        self._buffered = 0

    def close(self) -> None:
        if self.closed:
            return
        if self._buffered:
            self._flush()
        self._z, self._labels, self._cells = self._z[:0].copy(), self._labels[:0].copy(), self._cells[:0].copy()
        write_json_atomic(
            os.path.join(self.out_dir, f"manifest_rank{self.rank}.json"),
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "run_id": self.run_id,
                "n_tokens": self.n_tokens,
                "d_latent": self.d_latent,
                "label_attributes": self.label_attributes,
                "n_cells": sum(p["n_cells"] for p in self.parts),
                "parts": self.parts,
            },
        )
        self.closed = True


def finalize_latent_cache(out_dir: str | os.PathLike, stats: dict, *, world_size: int, run_id: str) -> dict:
    """Merge the manifests of ranks ``0..world_size-1`` of run ``run_id`` into ``manifest.json`` (call once,
    on one rank, after every rank closed its writer); then delete what other runs left behind."""
    out_dir = os.fspath(out_dir)
    run_id, world_size = _check_run_id(run_id), int(world_size)
    fix = "re-run `scldm-scale encode` (every rank must finish writing)"
    ranks = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"manifest_rank{r}.json")
        if not os.path.isfile(path):
            raise ScldmError(f"{path}: latent manifest of rank {r} of {world_size} is missing; {fix}")
        manifest = read_json(path, "per-rank latent manifest", fix)
        if manifest.get("run_id") != run_id or int(manifest.get("world_size", -1)) != world_size:
            raise ScldmError(
                f"{path}: written by another encode run (run {manifest.get('run_id')!r} on "
                f"{manifest.get('world_size')} ranks, expected run {run_id!r} on {world_size}); {fix}"
            )
        ranks.append(manifest)
    first = ranks[0]
    for r in ranks[1:]:
        for key in ("n_tokens", "d_latent", "label_attributes"):
            if r[key] != first[key]:
                raise ScldmError(f"{out_dir}: rank {r['rank']} wrote {key}={r[key]} but rank 0 {first[key]}")
    parts = [p for r in ranks for p in r["parts"]]
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "run_id": run_id,
        "world_size": world_size,
        "n_cells": int(sum(p["n_cells"] for p in parts)),
        "n_tokens": first["n_tokens"],
        "d_latent": first["d_latent"],
        "label_attributes": first["label_attributes"],
        "parts": parts,
        "stats": _jsonable(stats),
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    _remove_stale(out_dir, manifest)
    return manifest


def _remove_stale(out_dir: str, manifest: dict) -> None:
    """Delete per-rank manifests of ranks beyond the world size and part files the manifest does not list."""
    keep = {p[key] for p in manifest["parts"] for key in ("latents", "labels", "cell_index")}
    for name in os.listdir(out_dir):
        rank = _RANK_MANIFEST_RE.match(name)
        stale_manifest = rank is not None and int(rank.group(1)) >= manifest["world_size"]
        if stale_manifest or (_PART_FILE_RE.match(name) and name not in keep):
            try:
                os.remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass


def _manifest_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if path.endswith(".json") else os.path.join(path, "manifest.json")


def read_latent_manifest(path: str | os.PathLike) -> dict:
    mpath = _manifest_path(path)
    manifest = read_json(mpath, "latent cache manifest", "run `scldm-scale encode` to write the latent cache")
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ScldmError(f"{mpath}: not a latent cache manifest; run `scldm-scale encode` to write the cache")
    return manifest


def read_latent_stats(path: str | os.PathLike) -> dict:
    """The ``stats`` of a cache (numeric lists become float32 arrays), plus the cache's
    ``n_cells``, ``n_tokens`` and ``d_latent``."""

    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            try:
                return np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                return v
        return v

    manifest = read_latent_manifest(path)
    stats = conv(manifest.get("stats") or {})
    stats.update({k: int(manifest[k]) for k in ("n_cells", "n_tokens", "d_latent")})
    return stats


class LatentCacheSource(StreamSource):
    """Batches ``{"z_nmz", "labels_na", "cell_index_n"}`` of a finalized latent cache.

    Each epoch's order is a permutation of all cached cells seeded by ``(seed, epoch)`` (the stream,
    ranks, workers and resume follow :mod:`scldm_scale.data.source`); the inference pass visits
    the cache rows in order. Rows are read from the part files with positioned reads (one per run
    of consecutive rows), not through memory maps: mapped file pages count in the resident set of
    the process, and random batches over a memory-mapped cache grow it towards the cache size
    (the kernel maps whole folios around every row touched). Memory is bounded by the batch (plus
    4-8 bytes per cell for the epoch's order).
    """

    token_batches = False

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        labels: LabelTables | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if batch_size < 1:
            raise ScldmError(f"data.batch_size={batch_size}: must be >= 1")
        self.manifest = read_latent_manifest(self.path)
        self.root = os.path.dirname(_manifest_path(self.path))
        self.parts = self.manifest["parts"]
        for p in self.parts:
            for key in ("latents", "labels", "cell_index"):
                f = os.path.join(self.root, p[key])
                if not os.path.isfile(f):
                    raise ScldmError(f"{f}: latent cache part is missing; re-run `scldm-scale encode`")
        if labels is not None and self.label_attributes != labels.attributes:
            raise ScldmError(
                f"{self.path}: latent cache label attributes {self.label_attributes} differ from the label tables "
                f"{labels.attributes}; re-run `scldm-scale encode` with the same labels.json"
            )
        self.vocab, self.labels = None, labels
        self.offsets = np.concatenate([[0], np.cumsum([p["n_cells"] for p in self.parts])]).astype(np.int64)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self._layouts: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}  # part file -> offset, dtype, shape
        self._orders: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg, labels: LabelTables | None = None) -> LatentCacheSource:
        """``data.path`` is the cache; labels: given, else ``data.labels_path``, else ``labels.json`` in the cache."""
        if labels is None:
            path = cfg.labels_path or os.path.join(os.fspath(cfg.path), "labels.json")
            labels = LabelTables.load(path) if os.path.isfile(path) else None
        return cls(cfg.path, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, labels=labels)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def d_latent(self) -> int:
        return int(self.manifest["d_latent"])

    @property
    def label_attributes(self) -> list[str]:
        return list(self.manifest["label_attributes"])

    @property
    def stats(self) -> dict:
        return read_latent_stats(self.path)

    def describe(self) -> str:
        return self.path

    def library_size_stats(self, max_cells: int = 4096) -> tuple[float, float]:
        raise ScldmError(
            f"{self.path}: a latent cache holds no counts, so it has no library sizes; "
            "read them from the count data the VAE was trained on"
        )

    def epoch_positions(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        if epoch not in self._orders:
            n = self.n_cells
            order = np.arange(n, dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)
            np.random.default_rng([self.seed % (1 << 63), epoch, 0x1A7]).shuffle(order)
            for old in sorted(self._orders)[:-1]:  # a block straddles at most two epochs
                del self._orders[old]
            self._orders[epoch] = order
        return self._orders[epoch][lo:hi]

    def _read_rows(self, path: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of a part file, one read per run of consecutive rows."""
        if path not in self._layouts:
            self._layouts[path] = _npy_layout(path)
        offset, dtype, shape = self._layouts[path]
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        row_bytes = out[:1].nbytes
        flat = memoryview(out.reshape(-1).view(np.uint8))
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, ends = np.r_[0, cut].tolist(), np.r_[cut, len(rows)].tolist()
        first_rows = rows[starts].tolist()
        fd = os.open(path, os.O_RDONLY)
        try:
            for a, b, row in zip(starts, ends, first_rows):
                data = os.pread(fd, (b - a) * row_bytes, offset + row * row_bytes)
                if len(data) != (b - a) * row_bytes:
                    raise ScldmError(f"{path}: latent cache part is truncated; re-run `scldm-scale encode`")
                flat[a * row_bytes: b * row_bytes] = data
        finally:
            os.close(fd)
        return out

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``ids`` (global cache order, repeats allowed), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        z = np.empty((n, self.n_tokens, self.d_latent), dtype=np.float32)
        labels = np.empty((n, len(self.label_attributes)), dtype=np.int64)
        cells = np.empty(n, dtype=np.int64)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for k in np.unique(part_of):
            sel = np.flatnonzero(part_of == k)
            rows, where = np.unique(ids[sel] - self.offsets[k], return_inverse=True)
            part = self.parts[int(k)]
            for key, dst in (("latents", z), ("labels", labels), ("cell_index", cells)):
                dst[sel] = self._read_rows(os.path.join(self.root, part[key]), rows)[where]
        return {"z_nmz": z, "labels_na": labels, "cell_index_n": cells}

    def _batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.gather(ids).items()}

    def read_blocks(self, blocks: Iterable[Block], compact: bool) -> Iterator[dict]:
        for block in blocks:
            yield self._batch(block.positions)

    def inference_batches(self, rank: int, world: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        lo, hi = inference_range(self.n_cells, rank, world)
        for a, b in batch_ranges(lo, hi, batch_size):
            yield self._batch(np.arange(a, b, dtype=np.int64))
