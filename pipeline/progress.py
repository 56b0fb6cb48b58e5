"""Progress for long work: a tqdm bar on a terminal, and a plain line at least every INTERVAL seconds
when stderr is a pipe or a log file (where tqdm switches itself off and a run would look hung)."""

from __future__ import annotations

import sys
import time

INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal


class Lines:
    """tqdm's interface (update, set_postfix, context manager), writing one line per INTERVAL."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            self._line(now)

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def _line(self, now: float, done: bool = False) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s"
            + (f", {self.postfix}" if self.postfix else "")
            + (", done" if done else ""),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.n and time.monotonic() - self.start >= INTERVAL:  # a long task ends with its last line
            self._line(time.monotonic(), done=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress(total: int, desc: str, unit: str = "img", enabled: bool = True, leave: bool = True):
    """A tqdm bar on a terminal, `Lines` otherwise; a silent one when not `enabled` (other ranks)."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, unit=unit, desc=desc, leave=leave)
    return Lines(total, desc, unit)
