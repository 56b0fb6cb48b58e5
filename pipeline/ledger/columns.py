"""A string column of a lock's side file (ledger/locks.py, `Rows`), decoded on first use.

A no-op encode at a million rows reads the side file to compare each file's stat with the one recorded;
decoding its million names and hashes into Python strings, and joining each name to its folder, took
longer than a quarter of the stats themselves (benchmarks/RESULTS.md, issue 36). The column keeps the
bytes as written, hands the stats their paths as those bytes (`prefixed`), and decodes only when asked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence

from leakpipe.pipeline.store.stats import Joined

ENCODING = ("utf-8", "surrogatepass")  # how the side file stores strings, whatever they hold
# A name that was not UTF-8 reads as str with surrogate escapes, which surrogatepass stores as ED A0-BF ..;
# its stored bytes are then not the file system's, so its paths are made from the strings
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


class Column(Sequence[str]):
    """`n` strings, stored "\\0"-joined in UTF-8 (surrogatepass): those bytes, or what reads them (a
    no-op reads a side file's names and never its hashes)."""

    def __init__(self, raw: bytes | Callable[[], bytes], n: int):
        self._raw, self._n = raw, n
        self._strings: list[str] | None = None

    @property
    def raw(self) -> bytes:
        if callable(self._raw):
            self._raw = self._raw()
        return self._raw

    def strings(self) -> list[str]:
        if self._strings is None:
            self._strings = self.raw.decode(*ENCODING).split("\0") if self._n else []
        return self._strings

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self.strings()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.strings())

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, Column)) and self.strings() == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one

    def prefixed(self, prefix: str) -> Joined | list[str]:
        """prefix + each string, as the paths os.stat takes: the column's own bytes (store/stats.py cuts
        them into paths where they are stat'ed) where they are the file system's, else the strings."""
        # memchr first: the regular expression takes 7x as long over a million names that have no ED byte
        if os.name != "posix" or (b"\xed" in self.raw and _SURROGATE.search(self.raw)):
            return [prefix + s for s in self.strings()]
        return Joined(os.fsencode(prefix), self.raw, self._n)
