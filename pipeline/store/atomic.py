"""The one way leakpipe writes a file or a folder: to a temporary name beside it, fsync, rename.

A reader (or a rerun after a kill) therefore sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: Path | str, folder: bool = False):
    """Yield a temporary path beside `path`; when the block succeeds, fsync what was written there
    and rename it onto `path` (replacing a file, or a folder when `folder`). On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (
        Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        if folder
        else Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")[1])
    )
    try:
        yield tmp
        _fsync_tree(tmp)
        if folder and path.exists():  # a folder cannot be renamed over a non-empty one
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def sweep_orphans(folder: Path | str) -> list[Path]:
    """Remove what killed writers left under `folder`: temporary names of atomic_path, folders it was
    replacing, zarr's `*.partial` chunks. Call it only while holding the folder's exclusive lock,
    when no writer of it can be alive. Returns what it removed."""
    folder = Path(folder)
    found = [p for pattern in (".*.tmp", ".*.old", "*.partial") for p in folder.rglob(pattern)]
    found = [p for p in found if not any(q in p.parents for q in found)]  # the outermost of each
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return found


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
