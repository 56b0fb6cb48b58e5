"""An exclusive lock per store, so two processes never encode into one store at once.

Uses flock: the kernel drops it when the holder dies, so a lock left by a killed process is
recovered automatically; the file keeps the holder's pid and host for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.atomic import FILE_MODE


class Busy(UserError):
    pass


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """The one writer of `what`; refused (Busy) while any other process writes or reads it."""
    with _flock(path, what, fcntl.LOCK_EX) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
        yield


@contextlib.contextmanager
def shared(path: Path, what: str):
    """A reader of `what`: any number at once, but none while a writer holds it (and vice versa),
    so a store is never relaid out under a training that streams from it."""
    with _flock(path, what, fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def _flock(path: Path, what: str, kind: int):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)  # less the umask: a group that shares the workspace takes it
    try:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a reader"
            raise Busy(
                f"{what} is in use by another leakpipe process (writer: {holder}, or readers "
                f"such as a training); wait for it to finish, or stop it. Lock file: {path}"
            ) from None
        yield fd
    finally:
        os.close(fd)  # releases the flock
