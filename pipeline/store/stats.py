"""The stat stamps of many files: (device, inode, size, mtime_ns), the hash cache's test of a file.

A no-op encode and `leakpipe status` stat every file a manifest lists and nothing else, so how fast many
files are stat'ed is how fast they are. A stat answered from the kernel's cache is CPU work that holds
Python for part of each call: threads then contend for Python (100,000 files on an idle 2-core machine:
0.33 s in one thread, 0.82 s in four), while a forked copy of the process does not (0.18 s in two
processes; benchmarks/scale.py's stat floor measures each way). A stat that waits on a disk or a network
file system releases Python meanwhile, and there threads overlap the waits.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import signal
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


def _stamp_into(paths: list, stamps: np.ndarray, seen: np.ndarray) -> None:
    """Fill `stamps` and `seen` with the files' stamps, STAT_PART at a time: a stat result is about 0.7 kB
    of Python objects, and 500,000 of them held at once took 90,000 page faults and a fifth more time than
    parts that reuse the same memory (benchmarks/RESULTS.md, issue 36)."""
    for k in range(0, len(paths), STAT_PART):
        part_stamps, part_seen = _stamps(_stat_all(paths[k : k + STAT_PART]))
        stamps[k : k + len(part_seen)], seen[k : k + len(part_seen)] = part_stamps, part_seen


def stat_stamps(paths: Paths, waits_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((n, 4) int64 (device, inode, size, mtime_ns) of each file, (n,) bool: it could be stat'ed).
    The first PROBE files are stat'ed here; if a stat took `waits_s` (STAT_WAITS_S) or more, the rest go to
    threads in parts of STAT_PART, else they are halved between this process and a forked copy of it (a
    long list, two cores), or stat'ed here."""
    probe, rest = _cut(paths, PROBE)
    probe = _listed(probe)
    start = time.perf_counter()  # the stats alone: cutting a million names off the probe takes 50 ms
    probed = _stat_all(probe)
    waits = (time.perf_counter() - start) / max(len(probe), 1) >= (STAT_WAITS_S if waits_s is None else waits_s)
    fork = not waits and len(rest) >= FORK_MIN and _can_fork()
    n = len(paths)
    stamps, seen = _shared(n) if fork else (np.zeros((n, 4), np.int64), np.zeros(n, bool))
    stamps[: len(probe)], seen[: len(probe)] = _stamps(probed)
    out = stamps[len(probe) :], seen[len(probe) :]
    if waits:
        _threaded(_listed(rest), *out)
    elif not (fork and _forked(rest, *out)):
        _stamp_into(_listed(rest), *out)
    return stamps, seen


def _threaded(paths: list, stamps: np.ndarray, seen: np.ndarray) -> None:
    """_stamp_into in STAT_THREADS threads, a part of STAT_PART files each at a time: stats that wait on a
    disk or a network release Python, and the waits overlap."""
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        parts = range(0, len(paths), STAT_PART)
        list(pool.map(lambda k: _stamp_into(paths[k : k + STAT_PART], stamps[k:], seen[k:]), parts))


def _can_fork() -> bool:
    """Linux (where it was measured) with two cores or more for this process."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


def _shared(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) int64 and (n,) bool zeros in memory that a forked copy of this process writes into for it
    (anonymous, shared): the child's stamps need no pipe and no copy."""
    memory = mmap.mmap(-1, 33 * n)
    return np.frombuffer(memory, np.int64, 4 * n).reshape(n, 4), np.frombuffer(memory, bool, n, 32 * n)


def _forked(paths: Paths, stamps: np.ndarray, seen: np.ndarray) -> bool:
    """Fill the shared `stamps` and `seen` (_shared) with the files' stamps: the first half here, the second
    by a forked copy of this process (here too where the child fails). False where there could be no fork
    (then nothing is filled). An interrupt here kills and reaps the child before it goes on."""
    mine, theirs = _halves(paths)
    half = len(mine)
    # the child never takes a SIGINT (Ctrl-C reaches the whole process group): raised there, it would unwind
    # this process's stack in the copy; this process takes it once the child exists, and reaps it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns of a fork beside other threads (numpy's BLAS starts one at import): the
            # child could then find a lock held that it needs. It takes none: it stats, fills two arrays
            # (malloc resets its locks at fork) and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:
        _child(theirs, stamps[half:], seen[half:])
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if pid < 0:
        return False
    try:
        _stamp_into(_listed(mine), stamps[:half], seen[:half])
        status = os.waitpid(pid, 0)[1]
    except BaseException:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        _stamp_into(_listed(theirs), stamps[half:], seen[half:])
    return True


def _child(paths: Paths, stamps: np.ndarray, seen: np.ndarray) -> None:
    """In the forked copy: fill its part of the shared arrays; never returns (exit status 0: all filled).
    os._exit skips every cleanup the parent's objects would run."""
    code = 1
    try:
        _stamp_into(_listed(paths), stamps, seen)
        code = 0
    finally:
        os._exit(code)
