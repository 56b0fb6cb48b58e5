"""The stat stamps of many files: (device, inode, size, mtime_ns), the hash cache's test of a file.

A no-op encode and `leakpipe status` stat every file a manifest lists and nothing else, so how fast many
files are stat'ed is how fast they are. A stat answered from the kernel's cache is CPU work that holds
Python for part of each call: threads then contend for Python (100,000 files on an idle 2-core machine:
0.33 s in one thread, 0.82 s in four), while a forked copy of the process does not (0.18 s in two
processes; benchmarks/scale.py's stat floor measures each way). A stat that waits on a disk or a network
file system releases Python meanwhile, and there threads overlap the waits.
"""

from __future__ import annotations

import operator
import os
import sys
import time
import warnings
from collections.abc import Sized
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np

STAT_THREADS, STAT_PART = 4, 4096
# The first PROBE files' mean time per file says which kind of stat this is: slower than STAT_WAITS_S, the
# rest goes to STAT_THREADS threads in parts of STAT_PART; faster, to this process and, for a long list on a
# machine with two cores or more, a forked copy of it.
PROBE, STAT_WAITS_S = 512, 20e-6
FORK_MIN = 32768  # files left after the first part: fewer, and a fork (milliseconds) is not repaid
_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns")


class Joined(Sized):
    """The paths `prefix` + name of the names in `raw`, "\\0"-separated (a lock side file's column, as
    written), kept as those bytes until stat'ed: a list of a million paths takes a tenth of a second to
    cut, and cut before a fork, both processes would then write to the pages of every path (reference
    counts), so each half is cut by the process that stats it."""

    def __init__(self, prefix: bytes, raw: bytes, n: int):
        self.prefix, self.raw, self.n = prefix, raw, n

    def __len__(self) -> int:
        return self.n

    def paths(self) -> list[bytes]:
        head = self.prefix
        return (head + self.raw.replace(b"\0", b"\0" + head)).split(b"\0") if self.n else []

    def cut(self, k: int) -> tuple[Joined, Joined]:
        """(the first k paths, the rest)."""
        if k >= self.n:
            return self, Joined(self.prefix, b"", 0)
        end = -1
        for _ in range(k):
            end = self.raw.index(b"\0", end + 1)
        return Joined(self.prefix, self.raw[: max(end, 0)], k), Joined(self.prefix, self.raw[end + 1 :], self.n - k)

    def halves(self) -> tuple[Joined, Joined]:
        """Two parts of about as many bytes each, cut at the separator after the middle."""
        end = self.raw.find(b"\0", len(self.raw) // 2)
        if end < 0:
            return Joined(self.prefix, b"", 0), self
        k = self.raw.count(b"\0", 0, end) + 1
        return Joined(self.prefix, self.raw[:end], k), Joined(self.prefix, self.raw[end + 1 :], self.n - k)


Paths = Union[list, Joined]


def _listed(paths: Paths) -> list:
    return paths.paths() if isinstance(paths, Joined) else paths


def _cut(paths: Paths, k: int) -> tuple[Paths, Paths]:
    return paths.cut(k) if isinstance(paths, Joined) else (paths[:k], paths[k:])


def _halves(paths: Paths) -> tuple[Paths, Paths]:
    return paths.halves() if isinstance(paths, Joined) else (paths[: len(paths) // 2], paths[len(paths) // 2 :])


def stat_or_none(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def _stat_all(paths: list[str]) -> list:
    try:
        return list(map(os.stat, paths))  # the common case, without a Python frame per file
    except OSError:
        return [stat_or_none(p) for p in paths]


def _stamps(stats: list) -> tuple[np.ndarray, np.ndarray]:
    """((n, 4) int64 stamps of the stat results, (n,) bool: the file could be stat'ed)."""
    seen = np.array([s is not None for s in stats], bool) if None in stats else np.ones(len(stats), bool)
    found = stats if seen.all() else [s for s in stats if s is not None]
    stamps = np.zeros((len(stats), 4), np.int64)
    # unsigned, as stat gives them; an inode or device number above 2**63 wraps to negative, as _signed
    columns = [np.fromiter(map(operator.attrgetter(f), found), np.uint64, len(found)) for f in _FIELDS]
    stamps[seen] = np.stack(columns, axis=1).view(np.int64) if found else 0
    return stamps, seen


def stat_stamps(paths: Paths, waits_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((n, 4) int64 (device, inode, size, mtime_ns) of each file, (n,) bool: it could be stat'ed).
    The first PROBE files are stat'ed here; if a stat took `waits_s` (STAT_WAITS_S) or more, the rest go to
    threads in parts of STAT_PART, else they are halved between this process and a forked copy of it (a
    long list, two cores), or stat'ed here."""
    start = time.perf_counter()
    probe, rest = _cut(paths, PROBE)
    first = _stamps(_stat_all(_listed(probe)))
    if not len(rest):
        return first
    if (time.perf_counter() - start) / len(probe) >= (STAT_WAITS_S if waits_s is None else waits_s):
        rest = _listed(rest)
        with ThreadPoolExecutor(STAT_THREADS) as pool:
            parts = pool.map(lambda k: _stamps(_stat_all(rest[k : k + STAT_PART])), range(0, len(rest), STAT_PART))
            done = [first, *parts]
    else:
        forked = _forked(rest) if len(rest) >= FORK_MIN and _can_fork() else None
        done = [first, *(forked or [_stamps(_stat_all(_listed(rest)))])]
    return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])


def _can_fork() -> bool:
    """Linux (where it was measured) with two cores or more for this process."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


def _forked(paths: Paths) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """[stamps of the first half, stamps of the second], the second half stat'ed by a forked copy of this
    process and sent back through a pipe; None where the fork or the child failed (then stat them here)."""
    mine, theirs = _halves(paths)
    n = len(theirs)
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns of a fork beside other threads (numpy's BLAS starts one at import): the
            # child could then find a lock held that it needs. It takes none: it stats, fills two arrays
            # (malloc resets its locks at fork), writes them to the pipe and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:
        _child(theirs, read_end, write_end)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:  # closed on an interrupt here: the child's write then fails
            stamped = _stamps(_stat_all(_listed(mine)))
            data = pipe.read()
    finally:
        status = os.waitpid(pid, 0)[1]
    if os.waitstatus_to_exitcode(status) != 0 or len(data) != 33 * n:
        return None
    return [stamped, (np.frombuffer(data, np.int64, 4 * n).reshape(n, 4), np.frombuffer(data, bool, n, 32 * n))]


def _child(paths: Paths, read_end: int, write_end: int) -> None:
    """In the forked copy: the stamps and seen flags of `paths` down the pipe; never returns (exit status 0:
    all sent). os._exit skips every cleanup the parent's objects would run."""
    code = 1
    try:
        os.close(read_end)
        stamps, seen = _stamps(_stat_all(_listed(paths)))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(stamps.tobytes() + seen.tobytes())
        code = 0
    finally:
        os._exit(code)
