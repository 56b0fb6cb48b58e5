"""The one way leakpipe writes a file or a folder: to a temporary name beside it, fsync, rename.

A reader (or a rerun after a kill) therefore sees the old version or the new one, never half of one.
Files and folders get the permissions the umask gives (0644 and 0755 under the usual 022, 0600 and
0700 under 077), as any other tool creates them, so colleagues on a shared machine can read what
leakpipe wrote, and a private workspace stays private. Whatever a third-party saver writes inside
`atomic_path` (safetensors' save_file and diffusers' save_pretrained create 0600 files, tempfile
0600 and 0700) is given those permissions before it is renamed into place; files that cannot be
written whole at once (SQLite's database, flock files) are created through `create_file`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path


FILE_MODE, FOLDER_MODE = 0o666, 0o777  # less the umask, as open(2) and mkdir(2) apply it


def umask() -> int:
    """The process's umask, read without changing it (/proc on Linux; elsewhere set and put back at
    once, which is what Python offers)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(path: Path | str) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions the umask gives a new
    file or folder, whatever mode its writer chose; executable files keep their x bits (less the umask)."""
    mask, path = umask(), Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        want = (FOLDER_MODE if p.is_dir() or mode & 0o111 else FILE_MODE) & ~mask
        if mode & 0o7777 != want:
            os.chmod(p, want)


def create_file(path: Path | str) -> bool:
    """Create `path` empty with the umask's permissions if it does not exist (for files written in
    place: a database, a lock file); True if it was created."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        return True
    except FileExistsError:
        return False


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())


def _new_temporary(path: Path, folder: bool) -> Path:
    """A new file or folder `.NAME.<random>.tmp` beside `path`, made with mode 0666 or 0777 less the
    umask (tempfile's mkstemp and mkdtemp make 0600 and 0700, whatever the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                os.mkdir(tmp, FOLDER_MODE)
            elif not create_file(tmp):
                continue
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: Path | str, folder: bool = False):
    """Yield a temporary path beside `path`; when the block succeeds, give what was written there the
    umask's permissions, fsync it and rename it onto `path` (replacing a file, or a folder when
    `folder`). On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path, folder)
    try:
        yield tmp
        honour_umask(tmp)  # a third-party saver may have replaced the file, with a mode of its own
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


def place(made: Path | str, path: Path | str) -> None:
    """Move a file that another writer made (a library's saver, into a temporary folder on the same
    file system) onto `path`, atomically, with the umask's permissions."""
    with atomic_path(path) as tmp:
        os.replace(made, tmp)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
