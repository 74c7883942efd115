"""Atomic writes: every file or folder the project writes appears complete or not at all.

One mechanism, :func:`atomic_path`: the caller writes into a temporary sibling (same folder, so the
final ``os.replace`` is a rename on one file system) and the sibling is renamed over the target only
when the block ends without an exception; on an exception it is removed. The helpers below cover the
common payloads (JSON, text, bytes, AnnData); a folder is published the same way
(:func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it to ``path`` when the block succeeds.

    The parent folder is created. ``fsync`` of the written file is the writer's business (the
    JSON/text/bytes helpers below do it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder ``<path>.tmp-<pid>``; when the block succeeds it replaces ``path`` (an
    existing entry is moved to ``<path>.old-<pid>`` first, then deleted), when it fails it is removed.
    A killed process leaves these names behind with its pid, for the next run to recognize."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = Path(f"{path}.tmp-{os.getpid()}"), Path(f"{path}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        elif os.path.lexists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.lexists(old):
            old.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON (numpy arrays and scalars, tensors: as lists / numbers)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=_jsonable) + "\n")


def write_h5ad_atomic(adata, path: str | os.PathLike) -> Path:
    """``adata.write_h5ad`` into a temporary sibling, renamed into place."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays / scalars, tensors
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
