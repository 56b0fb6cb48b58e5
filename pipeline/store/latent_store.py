"""The Zarr v3 latent cache of one split and one encoder (SPEC section 3).

Layout of `cache/latents/<split>/<fp12>.zarr` (or `<store.url>/<split>/<fp12>.zarr`):
    mean         (N, C, h, w)  posterior mean, unscaled, float32 (or store.dtype)
    logvar       (N, C, h, w)  posterior log-variance, unscaled
    latent_hash  (N, 16) uint8 blake2b-128 of the row's stored mean bytes then logvar bytes
    source_hash  (N, 16) uint8 blake2b-128 of the image file the row was encoded from
Rows are aligned with the manifest (row i = manifest row i) and chunked along N.
A row is valid iff source_hash[i] equals the manifest row's file hash (all-zero = never written) and
its bytes match latent_hash[i]. Every reader checks the second while it reads, so a damaged chunk,
or a missing one (Zarr reads it as zeros), is never used, whatever a lock file says.
Latents of a chunk are written before their hashes, so a crash can only lose unfinished work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.hashing import HASH_BYTES

STORE_FORMAT = 2  # 2: latent_hash
LATENT_ARRAYS = ("mean", "logvar")
ARRAYS = (*LATENT_ARRAYS, "latent_hash", "source_hash")  # in the order every writer writes them


class DamagedRows(Exception):
    """Rows whose stored bytes do not match their latent_hash (or whose chunk cannot be decoded)."""

    def __init__(self, rows):
        self.rows = sorted(int(r) for r in rows)
        super().__init__(f"{len(self.rows)} damaged row(s), e.g. row {self.rows[0]}")


def content_hashes(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """(N, 16) uint8: blake2b-128 of each row's mean bytes, then its logvar bytes, as stored."""
    out = np.empty((len(mean), HASH_BYTES), np.uint8)
    for i in range(len(mean)):
        h = hashlib.blake2b(np.ascontiguousarray(mean[i]).tobytes(), digest_size=HASH_BYTES)
        h.update(np.ascontiguousarray(logvar[i]).tobytes())
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def read_rows(group: zarr.Group, idx: np.ndarray) -> dict[str, np.ndarray]:
    """mean and logvar of rows `idx` (sorted store indices), checked against latent_hash as read;
    raises DamagedRows naming every row that does not match or whose chunk cannot be decoded."""
    try:
        data = {k: group[k].get_orthogonal_selection((idx,)) for k in (*LATENT_ARRAYS, "latent_hash")}
    except Exception:  # a chunk that does not decode: find which rows, chunk by chunk
        bad = [i for i in idx if not _readable(group, i)]
        raise DamagedRows(bad or idx) from None
    bad = ~np.all(content_hashes(data["mean"], data["logvar"]) == data["latent_hash"], axis=1)
    if bad.any():
        raise DamagedRows(idx[bad])
    return {k: data[k] for k in LATENT_ARRAYS}


def _readable(group: zarr.Group, row: int) -> bool:
    try:
        for k in (*LATENT_ARRAYS, "latent_hash"):
            group[k][row]
        return True
    except Exception:
        return False


def row_states(group: zarr.Group, want: np.ndarray, trusted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(valid, damaged) boolean (N,): valid rows match the wanted source hash and their bytes their
    latent_hash; damaged rows match the source hash but not their bytes (or do not decode).
    `trusted` (one bool per chunk): chunks known to hold the bytes a lock vouched for (see
    chunk_checks), whose rows are not read again."""
    claimed = valid_rows(group, want)
    ok = claimed.copy()
    for k, (start, stop) in enumerate(chunk_bounds(len(want), group["mean"].chunks[0])):
        if trusted is not None and k < len(trusted) and trusted[k]:
            continue
        rows = np.nonzero(claimed[start:stop])[0] + start
        if len(rows):
            try:
                read_rows(group, rows)
            except DamagedRows as exc:
                ok[exc.rows] = False
    return ok, claimed & ~ok


def hash_rows(hex_hashes: list[str]) -> np.ndarray:
    """Hex digests -> (N, 16) uint8, the on-disk form of `source_hash`."""
    if not hex_hashes:
        return np.zeros((0, HASH_BYTES), np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), np.uint8).reshape(-1, HASH_BYTES).copy()


def chunk_bounds(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)]


def chunk_key(arr, k: int) -> str:
    """The file name of chunk `k` (along N) of `arr`, relative to the array's folder."""
    return arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def open_store(location: str | Path, mode: str = "r") -> zarr.Group:
    """The store at a local path or an fsspec URL (see `pipeline.storage`)."""
    return zarr.open_group(storage.normalize(location), mode=mode)


def create(location: str, n_rows: int, latent_shape: tuple, chunk_rows: int, dtype: str, attrs: dict) -> zarr.Group:
    group = open_store(location, "w")
    for name in LATENT_ARRAYS:
        group.create_array(
            name, shape=(n_rows, *latent_shape), chunks=(chunk_rows, *latent_shape), dtype=dtype, fill_value=0
        )
    for name in ("latent_hash", "source_hash"):
        group.create_array(
            name, shape=(n_rows, HASH_BYTES), chunks=(chunk_rows, HASH_BYTES), dtype="uint8", fill_value=0
        )
    group.attrs.update({"leakpipe_store": STORE_FORMAT, **attrs})
    return group


def _add_latent_hash(group: zarr.Group) -> None:
    """A store written before latent_hash existed (format 1) gets it from its current bytes, once."""
    n, chunk = group["source_hash"].shape[0], group["mean"].chunks[0]
    arr = group.create_array(
        "latent_hash", shape=(n, HASH_BYTES), chunks=(chunk, HASH_BYTES), dtype="uint8", fill_value=0
    )
    for start, stop in chunk_bounds(n, chunk):
        arr[start:stop] = content_hashes(group["mean"][start:stop], group["logvar"][start:stop])
    group.attrs["leakpipe_store"] = STORE_FORMAT


def valid_rows(group: zarr.Group, want: np.ndarray) -> np.ndarray:
    """Boolean (N,): stored hash equals the wanted hash (and is not the all-zero 'never written')."""
    try:
        have = group["source_hash"][:]
    except Exception:  # an undecodable hash chunk: no row of the store can be trusted
        return np.zeros(len(want), bool)
    if have.shape != want.shape:
        return np.zeros(len(want), bool)
    return np.all(have == want, axis=1) & np.any(want != 0, axis=1)


def source_rows(old_hashes: np.ndarray, new_hashes: np.ndarray) -> np.ndarray:
    """src[i] = an old row whose (non-zero) hash is new_hashes[i] (the last such row), or -1. Hashes
    are compared as 16-byte strings: one sort and one binary search, not a dict of a million rows."""
    src = np.full(len(new_hashes), -1, np.int64)
    have = np.flatnonzero(np.any(old_hashes != 0, axis=1))[::-1]  # last first: it wins among equals
    if len(have) == 0 or len(new_hashes) == 0:
        return src
    keys = np.ascontiguousarray(old_hashes[have]).view(f"S{HASH_BYTES}").ravel()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    query = np.ascontiguousarray(new_hashes).view(f"S{HASH_BYTES}").ravel()
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    hit = keys[pos] == query
    src[hit] = have[order[pos[hit]]]
    return src


def plan_layout(old_hashes: np.ndarray, new_hashes: np.ndarray, old_chunk: int, chunk_rows: int):
    """How to align an existing store with a new manifest.

    Returns ("in_place", None) when every reusable row already sits at its new index (rows only
    appended, dropped from the end, or changed in place): a resize suffices. Otherwise
    ("relayout", src) with src[i] = old row to copy into new row i, or -1.
    """
    src = source_rows(old_hashes, new_hashes)
    n = min(len(old_hashes), len(new_hashes))
    same = np.zeros(len(new_hashes), bool)
    same[:n] = np.all(old_hashes[:n] == new_hashes[:n], axis=1)
    stays = (src == -1) | (src == np.arange(len(new_hashes))) | same
    in_place = old_chunk == chunk_rows and bool(stays.all())
    return ("in_place", None) if in_place else ("relayout", src)


def _resize(group: zarr.Group, n_rows: int) -> None:
    old_n = group["source_hash"].shape[0]
    for name in ARRAYS:
        arr = group[name]
        arr.resize((n_rows, *arr.shape[1:]))
    if n_rows > old_n:  # edge chunks may hold stale bytes past the old end: mark the new rows unwritten
        group["source_hash"][old_n:n_rows] = 0


def _relayout_paths(location: str) -> tuple[str, str]:
    """(the new layout being built, the marker that says it is complete)."""
    return location + ".relayout", location + ".relayout.done"


def _relayout(location: str, old: zarr.Group, src: np.ndarray, chunk_rows: int) -> int:
    """Copy reusable rows into a fresh store in the new order, then swap it in; chunks whose rows all
    stay are linked, not copied, so their files (and the lock's record of them) are unchanged.
    Returns rows copied."""
    tmp, done = _relayout_paths(location)
    storage.remove(tmp)
    latent_shape = old["mean"].shape[1:]
    new = create(tmp, len(src), latent_shape, chunk_rows, str(old["mean"].dtype), dict(old.attrs))
    old_data = {name: old[name] for name in ARRAYS}
    copied = 0
    kept = _unmoved_chunks(src, old["source_hash"].shape[0], old["mean"].chunks[0], chunk_rows)
    for k, (start, stop) in enumerate(chunk_bounds(len(src), chunk_rows)):
        take = src[start:stop]
        keep = np.nonzero(take >= 0)[0]
        if kept[k]:  # no row of it moves: the same files, linked rather than copied
            _link_chunk(old, location, tmp, k)
            continue
        if len(keep) == 0:
            continue
        copied += len(keep)
        for name in ARRAYS:  # hashes last, as in every write
            block = np.zeros((stop - start, *old_data[name].shape[1:]), old_data[name].dtype)
            block[keep] = _take(old_data[name], take[keep])
            new[name][start:stop] = block
    with storage.open_file(done, "wb") as fh:  # from here on the new layout wins, even after a crash
        fh.write(b"relayout complete")
    _swap_in(location)
    return copied


def _unmoved_chunks(src: np.ndarray, old_rows: int, old_chunk: int, chunk_rows: int) -> np.ndarray:
    """Boolean per new chunk: it covers the same rows as an old chunk and every row it reuses sits
    where it sat (rows to re-encode may be among them: their old hashes do not match)."""
    bounds = chunk_bounds(len(src), chunk_rows)
    if old_chunk != chunk_rows:
        return np.zeros(len(bounds), bool)
    at = src == np.arange(len(src))
    return np.array(
        [
            stop <= old_rows and at[start:stop].any() and bool(((src[start:stop] == -1) | at[start:stop]).all())
            for start, stop in bounds
        ],
        bool,
    )


def _link_chunk(old: zarr.Group, location: str, tmp: str, k: int) -> None:
    for name in ARRAYS:
        rel = chunk_key(old[name], k)
        if storage.exists(storage.join(location, name, rel)):  # an absent chunk reads as zeros: so it stays
            storage.link(storage.join(location, name, rel), storage.join(tmp, name, rel))


def _take(arr, rows: np.ndarray) -> np.ndarray:
    """arr[rows]; rows of a chunk that does not decode come back as zeros (and so fail their checksum
    and are re-encoded, never copied as good)."""
    try:
        return arr.get_orthogonal_selection((rows,))
    except Exception:
        return np.stack([_block(arr, int(r), int(r) + 1)[0] for r in rows])


def _swap_in(location: str) -> None:
    """Replace the store by its complete `.relayout` copy. Every step can be redone after a crash:
    the `.relayout.done` marker goes only once the store is whole, the copy only after that."""
    tmp, done = _relayout_paths(location)
    storage.remove(location)
    if not storage.is_url(location):  # a local rename is atomic
        storage.move(tmp, location)
    else:  # object stores have no rename: copy, hashes last, so no row looks valid before its latents
        storage.copy_tree(tmp, location, last="source_hash")
    storage.remove(done)
    storage.remove(tmp)


def recover(location: str) -> None:
    """Finish or undo a relayout that a crash interrupted; drop a killed writer's partial chunks.

    Called only under the store's writer lock, so every `*.partial` file is an orphan.
    """
    for orphan in storage.glob(location, "**/*.partial"):
        storage.remove(orphan)
    tmp, done = _relayout_paths(location)
    if storage.exists(done) and storage.exists(tmp):
        _swap_in(location)
    storage.remove(done)
    storage.remove(tmp)


def _complete(location: str) -> bool:
    """Has every array a writer needs (a format-1 store lacks only latent_hash, which is added)."""
    try:
        names = set(open_store(location).array_keys())
    except Exception:
        return False
    return {*LATENT_ARRAYS, "source_hash"} <= names


def prepare(
    location: str, hashes: np.ndarray, latent_shape: tuple, chunk_rows: int, dtype: str, attrs: dict
) -> tuple[zarr.Group, int]:
    """Open (or create) the store aligned with the manifest's rows; returns (group, rows copied)."""
    location = storage.normalize(location)
    recover(location)
    if storage.exists(storage.join(location, "zarr.json")) and not _complete(location):
        storage.remove(location)  # a create killed before its hash arrays: no row in it can be valid
    if not storage.exists(storage.join(location, "zarr.json")):
        return create(location, len(hashes), latent_shape, chunk_rows, dtype, attrs), 0
    group = open_store(location, "r+")
    if "latent_hash" not in group:
        _add_latent_hash(group)
    try:
        old_hashes = group["source_hash"][:]
    except Exception:  # undecodable: reuse nothing (rows are re-encoded in place)
        old_hashes = np.zeros((group["mean"].shape[0], HASH_BYTES), np.uint8)
    mode, src = plan_layout(old_hashes, hashes, group["mean"].chunks[0], chunk_rows)
    copied = 0
    if mode == "in_place":
        if len(old_hashes) != len(hashes):
            _resize(group, len(hashes))
    else:
        copied = _relayout(location, group, src, chunk_rows)
        group = open_store(location, "r+")
    group.attrs.update(attrs)
    return group, copied


def row_arrays(group: zarr.Group) -> dict:
    """The store's per-row arrays, opened once: each `group[name]` reads the array's metadata, which
    cost a chunk writer most of its time at 1 M rows (benchmarks/scale.py)."""
    return {name: group[name] for name in (*LATENT_ARRAYS, "latent_hash", "source_hash")}


def write_chunk(
    arrays: dict, start: int, stop: int, rows: np.ndarray, latents: dict[str, np.ndarray], row_hashes: np.ndarray
) -> None:
    """Write `rows` (absolute indices inside [start, stop)) of one chunk into `arrays` (row_arrays):
    latents first, then hashes.

    The whole chunk is rewritten (read-modify-write) so each chunk file is replaced atomically and
    rows of the chunk that are already valid keep their bytes.
    """
    local = rows - start
    full = len(local) == stop - start

    def current(arr) -> np.ndarray:  # a chunk written whole needs none of its old rows
        return np.empty((stop - start, *arr.shape[1:]), arr.dtype) if full else _block(arr, start, stop)

    blocks = {}
    for name in LATENT_ARRAYS:
        block = current(arrays[name])
        block[local] = latents[name]
        arrays[name][start:stop] = blocks[name] = block
    for name, new in (
        ("latent_hash", content_hashes(blocks["mean"][local], blocks["logvar"][local])),
        ("source_hash", row_hashes),
    ):
        hashes = current(arrays[name])
        hashes[local] = new
        arrays[name][start:stop] = hashes


def _block(arr, start: int, stop: int) -> np.ndarray:
    """The chunk's current rows, or zeros if it does not decode (its rows are being rewritten)."""
    try:
        return arr[start:stop]
    except Exception:
        return np.zeros((stop - start, *arr.shape[1:]), arr.dtype)
