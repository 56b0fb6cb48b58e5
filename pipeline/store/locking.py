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


class Busy(UserError):
    pass


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            raise Busy(f"{what} is in use by another leakpipe process ({holder}); wait for it to "
                       f"finish, or stop it. Lock file: {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
