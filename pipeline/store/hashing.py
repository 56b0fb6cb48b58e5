"""Content hashes of files, cached by (path, size, mtime_ns, inode) so unchanged files are never re-read."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from leakpipe.pipeline.store.atomic import atomic_write_json

HASH_BYTES = 16  # blake2b-128: the `source_hash` width in the latent store


def hash_stream(fh, block: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    while chunk := fh.read(block):
        h.update(chunk)
    return h.hexdigest()


def hash_bytes(data: bytes) -> str:
    """blake2b-128 of bytes in memory, as hex: the checksum every lock records."""
    return hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest()


def hash_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hash_stream(fh)


class HashCache:
    """A JSON file mapping absolute path -> [size, mtime_ns, inode, hash].

    `reads` counts the files actually hashed, so callers (and tests) can tell that an unchanged
    rerun touched no file contents.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reads = 0
        self._dirty = False
        try:
            entries = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # a damaged cache is only a cache: rebuilt by hashing
            entries = {}
        self._entries = {k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 4} \
            if isinstance(entries, dict) else {}

    def hash(self, path: Path | str) -> str:
        """Hash of the file's bytes; raises OSError (FileNotFoundError...) if it cannot be read."""
        key = os.path.abspath(path)
        st = os.stat(key)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return entry[3]
        digest = hash_file(key)
        self.reads += 1
        self._entries[key] = stamp + [digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self._dirty:
            atomic_write_json(self.path, self._entries, indent=None)
            self._dirty = False
