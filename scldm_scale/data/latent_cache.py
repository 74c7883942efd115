"""Latent cache for stage 2: ``encode`` writes every cell's latent tokens once, stage 2 streams them.

Layout of a cache directory::

    latents_rank{r}_part{k}.npy     float32 (n, m, z)   raw (unstandardized) latents
    labels_rank{r}_part{k}.npy      int64   (n, a)      label codes (LabelTables order)
    cell_index_rank{r}_part{k}.npy  int64   (n,)        global cell ids
    manifest_rank{r}.json           parts written by rank r (written by LatentCacheWriter.close)
    manifest.json                   all parts, n_cells, shapes, label attributes, stats
                                    (written by finalize_latent_cache, once every rank closed)

Every file is written to a temp sibling and renamed, and readers only trust ``manifest.json``,
so an interrupted ``encode`` never leaves a cache that looks complete. ``stats`` holds the
per-dimension latent mean/std used to standardize latents in stage 2.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from scldm_scale.data.loader import ShardedSource
from scldm_scale.data.vocab import read_json, write_json_atomic
from scldm_scale.errors import ScldmError

CACHE_FORMAT = "scldm-scale/latent-cache"
CACHE_FORMAT_VERSION = 1
_PART_BYTES = 64 << 20  # target size of one latents part file


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


class LatentCacheWriter:
    """Per-rank writer of latent parts. Buffers at most one part (~64 MiB) in memory."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        n_tokens: int,
        d_latent: int,
        label_attributes: Sequence[str],
        part_cells: int | None = None,
    ) -> None:
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.rank, self.n_tokens, self.d_latent = int(rank), int(n_tokens), int(d_latent)
        self.label_attributes = list(label_attributes)
        self.part_cells = int(part_cells or max(1, _PART_BYTES // (4 * self.n_tokens * self.d_latent)))
        self._z: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._cells: list[np.ndarray] = []
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
        self._z.append(z_nmz.copy())
        self._labels.append(labels_na.copy())
        self._cells.append(cell_index_n.copy())
        self._buffered += n
        while self._buffered >= self.part_cells:
            self._flush(self.part_cells)

    def _flush(self, n: int) -> None:
        z, lab, cells = (np.concatenate(b, axis=0) for b in (self._z, self._labels, self._cells))
        k = len(self.parts)
        names = {
            "latents": f"latents_rank{self.rank}_part{k}.npy",
            "labels": f"labels_rank{self.rank}_part{k}.npy",
            "cell_index": f"cell_index_rank{self.rank}_part{k}.npy",
        }
        _save_npy_atomic(os.path.join(self.out_dir, names["latents"]), z[:n])
        _save_npy_atomic(os.path.join(self.out_dir, names["labels"]), lab[:n])
        _save_npy_atomic(os.path.join(self.out_dir, names["cell_index"]), cells[:n])
        self.parts.append({**names, "n_cells": int(n), "rank": self.rank})
        self._z, self._labels, self._cells = [z[n:]], [lab[n:]], [cells[n:]]
        self._buffered -= n

    def close(self) -> None:
        if self.closed:
            return
        if self._buffered:
            self._flush(self._buffered)
        write_json_atomic(
            os.path.join(self.out_dir, f"manifest_rank{self.rank}.json"),
            {
                "rank": self.rank,
                "n_tokens": self.n_tokens,
                "d_latent": self.d_latent,
                "label_attributes": self.label_attributes,
                "n_cells": sum(p["n_cells"] for p in self.parts),
                "parts": self.parts,
            },
        )
        self.closed = True


def finalize_latent_cache(out_dir: str | os.PathLike, stats: dict, world_size: int | None = None) -> dict:
    """Merge the per-rank manifests into ``manifest.json`` (call once, after every rank closed)."""
    out_dir = os.fspath(out_dir)
    rank_files = sorted(
        glob.glob(os.path.join(glob.escape(out_dir), "manifest_rank*.json")),
        key=lambda p: int(os.path.basename(p)[len("manifest_rank") : -len(".json")]),
    )
    if not rank_files:
        raise ScldmError(f"{out_dir}: no per-rank latent manifests; `encode` did not finish writing")
    ranks = [read_json(p, "per-rank latent manifest", "re-run `scldm-scale encode`") for p in rank_files]
    if world_size is not None and sorted(r["rank"] for r in ranks) != list(range(world_size)):
        raise ScldmError(
            f"{out_dir}: latent manifests of ranks {[r['rank'] for r in ranks]} found, expected 0..{world_size - 1}; "
            "re-run `scldm-scale encode`"
        )
    first = ranks[0]
    for r in ranks[1:]:
        for key in ("n_tokens", "d_latent", "label_attributes"):
            if r[key] != first[key]:
                raise ScldmError(f"{out_dir}: rank {r['rank']} wrote {key}={r[key]} but rank 0 {first[key]}")
    parts = [p for r in ranks for p in r["parts"]]
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "n_cells": int(sum(p["n_cells"] for p in parts)),
        "n_tokens": first["n_tokens"],
        "d_latent": first["d_latent"],
        "label_attributes": first["label_attributes"],
        "parts": parts,
        "stats": _jsonable(stats),
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


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


class LatentCacheDataset(ShardedSource, IterableDataset):
    """Streams batches ``{"z_nmz", "labels_na", "cell_index_n"}`` from a finalized latent cache.

    Each epoch is a permutation of all cached cells seeded by ``(seed, epoch)``, cut to equal
    counts per rank and strided over ranks; workers and resume follow
    :mod:`scldm_scale.data.loader`. Parts are memory-mapped: memory is bounded by the batch.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
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
        self.offsets = np.concatenate([[0], np.cumsum([p["n_cells"] for p in self.parts])]).astype(np.int64)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self._mmaps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._refresh_rank_world()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mmaps"] = {}  # each worker opens its own maps
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

    @property
    def batches_per_epoch(self) -> int:
        _, world = self._refresh_rank_world()
        return (self.n_cells // world) // self.batch_size

    def describe(self) -> str:
        return self.path

    def rank_indices(self, epoch: int, rank: int, world: int) -> np.ndarray:
        n = self.n_cells
        if self.shuffle:
            order = np.random.default_rng([self.seed % (1 << 63), epoch, 0x1A7]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        per_rank = n // world
        return order[: per_rank * world][rank::world]

    def _part(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._mmaps:
            p = self.parts[k]
            self._mmaps[k] = tuple(
                np.load(os.path.join(self.root, p[key]), mmap_mode="r") for key in ("latents", "labels", "cell_index")
            )
        return self._mmaps[k]

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``ids`` (global cache order) read from the memory maps, in the order given."""
        n = len(ids)
        z = np.empty((n, self.n_tokens, self.d_latent), dtype=np.float32)
        labels = np.empty((n, len(self.label_attributes)), dtype=np.int64)
        cells = np.empty(n, dtype=np.int64)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for k in np.unique(part_of):
            sel = np.flatnonzero(part_of == k)
            local = ids[sel] - self.offsets[k]
            order = np.argsort(local, kind="stable")
            z_m, lab_m, cell_m = self._part(int(k))
            z[sel[order]] = z_m[local[order]]
            labels[sel[order]] = lab_m[local[order]]
            cells[sel[order]] = cell_m[local[order]]
        return {"z_nmz": z, "labels_na": labels, "cell_index_n": cells}

    def __iter__(self) -> Iterator[dict]:
        import torch

        rank, world = self._refresh_rank_world()
        b = self.batch_size
        idx_n = self.rank_indices(self.epoch, rank, world)
        for out in self.counted(self.gather(idx_n[j * b : (j + 1) * b]) for j in self.my_batch_ids(len(idx_n) // b)):
            yield {k: torch.from_numpy(v) for k, v in out.items()}
