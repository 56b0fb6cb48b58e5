"""Which chunks of a local latent store are, byte for byte, what the store's lock recorded.

The encode lock records the size and blake2b of every file of the store, after encode checked every
row it vouches for. A chunk whose four files (mean, logvar, latent_hash, source_hash) still hash to
those values holds rows that were checked then, so encode does not decode and re-check it row by
row. The files' hashes come from the file-hash cache: a file whose (device, inode, size, mtime_ns)
are unchanged since it was hashed is not read again (the test git and DVC use for a work tree; zarr
replaces a chunk by writing a new file, which changes all of them). Damage that keeps a file's
stat (bit rot under an unchanged mtime) is still caught where it matters: every reader (train,
embed, score) checks latent_hash as it reads, and a reader's damage report makes the next encode
check every chunk. Stores at URLs have no such stat and are checked row by row, as before.
"""

from __future__ import annotations

import numpy as np

from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.latent_store import ARRAYS, chunk_key


def _chunk_paths(location: str, group, n_chunks: int) -> list[str]:
    """Relative paths of every chunk file: ARRAYS in order, chunks 0..n-1 within each."""
    return [f"{name}/{chunk_key(group[name], k)}" for name in ARRAYS for k in range(n_chunks)]


def unchanged_chunks(location: str, group, recorded: dict, hashes) -> np.ndarray:
    """Boolean (n_chunks,): every file of the chunk hashes to what `recorded` (a lock's `outputs`:
    {relative path: {"size", "blake2b"}}) says. All False for a store at a URL."""
    n_rows, chunk = group["mean"].shape[0], group["mean"].chunks[0]
    n_chunks = -(-n_rows // chunk)
    if storage.is_url(location) or not recorded or n_chunks == 0:
        return np.zeros(n_chunks, bool)
    rels = _chunk_paths(location, group, n_chunks)
    got = hashes.hash_many([storage.join(location, rel) for rel in rels])
    same = [g is not None and g == recorded.get(rel, {}).get("blake2b") for g, rel in zip(got, rels)]
    return np.array(same, bool).reshape(len(ARRAYS), n_chunks).all(axis=0)


def remember(location: str, recorded: dict, hashes, hashed_ns: int) -> None:
    """Put a just-written lock's checksums into the file-hash cache, so the next encode need not
    read the chunks to know they are unchanged. `hashed_ns`: a moment before the lock hashed them;
    a file modified after it has a later mtime and so counts as racy, never as recorded."""
    if storage.is_url(location) or not recorded:
        return
    rels = sorted(recorded)
    hashes.remember([storage.join(location, rel) for rel in rels], [recorded[r]["blake2b"] for r in rels], hashed_ns)


def rows_of(rels: list[str], n_rows: int, chunk_rows: int) -> list[int]:
    """The rows held by the store files `rels` (relative paths: `mean/c/3/0/0/0` holds rows 3 x chunk_rows
    onwards); a file that is no chunk of ARRAYS (a zarr.json) stands for every row."""
    rows: set[int] = set()
    for rel in rels:
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] in ARRAYS and parts[1] == "c" and parts[2].isdigit():
            start = int(parts[2]) * chunk_rows
            rows.update(range(start, min(start + chunk_rows, n_rows)))
        else:
            return list(range(n_rows))
    return sorted(rows)
