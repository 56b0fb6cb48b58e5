"""Content hashes of files, cached in SQLite so that unchanged files are never re-read.

`cache/file-hashes.sqlite` holds one row per file, keyed by its absolute path:
    path   TEXT PRIMARY KEY
    stamp  BLOB  five little-endian int64: st_dev, st_ino, st_size, st_mtime_ns, and when it was hashed
    hash   BLOB  blake2b-128 of the file's bytes
A file's cached hash is used while its (device, inode, size, mtime_ns) are those recorded. The stamp
is one packed blob, not four columns, because `hash_many` reads every entry under a folder in one
query as two blobs (1 M entries: 0.3 s here, where fetching 1 M rows as Python tuples took 3.3 s
and formatting them in SQL 2.6 s); matching them to the files' stat results is then numpy work.

WAL mode lets readers work while one process writes; new rows go in short transactions of a few
thousand, so two encodes of different splits share the cache, each waiting for the other's commit
at most BUSY_SECONDS, and a killed process loses only its last uncommitted rows. A database that
SQLite finds damaged is set aside and rebuilt, with a note: it is only a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from leakpipe.pipeline.store.atomic import create_file
from leakpipe.pipeline.store.stats import stat_or_none, stat_stamps

HASH_BYTES = 16  # blake2b-128: the `source_hash` width in the latent store
SCHEMA = 1  # PRAGMA user_version of the database
BUSY_SECONDS = 60.0
FLUSH_ROWS, FLUSH_SECONDS = 4096, 1.0  # commit new rows this often
# A file modified within this long before it was hashed may be modified again with the same mtime
# (timestamps advance in clock ticks: milliseconds on Linux, 2 s on FAT), so its entry is not trusted
# and the file is hashed again next time ("racy" entries, as git calls them).
RACY_NS = 2_000_000_000
_STAMP = struct.Struct("<5q")
_DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


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


HASH_THREADS = 4  # files read at once: a read waits on the disk, and releases Python meanwhile
READ_ROWS = 64 * HASH_THREADS  # files read between two chances to commit (FLUSH_ROWS, FLUSH_SECONDS)


def _digest(path: str, size: int) -> str | None:
    """hash_file of a file stat'ed at `size` bytes, in as few reads as it takes (a read shorter than
    asked ends a regular file); None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        h, block = hashlib.blake2b(digest_size=HASH_BYTES), min(size + 1, 1 << 20)
        while True:
            chunk = os.read(fd, block)
            h.update(chunk)
            if len(chunk) < block:
                return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _digests(pool: ThreadPoolExecutor, paths: list[str], sizes: list[int]) -> list[str | None]:
    """`_digest` of every file, in order, read by the pool's threads."""
    k = HASH_THREADS
    out: list = [None] * len(paths)
    for j, part in enumerate(pool.map(lambda j: list(map(_digest, paths[j::k], sizes[j::k])), range(k))):
        out[j::k] = part
    return out


def _signed(v: int) -> int:
    """st_ino and st_dev are unsigned 64-bit; SQLite and numpy int64 want them signed."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return _signed(st.st_dev), _signed(st.st_ino), st.st_size, st.st_mtime_ns


def _folder_range(paths: list[str]) -> tuple[str, str]:
    """[low, high) of the keys under the deepest folder holding every path (min and max suffice)."""
    common = os.path.commonprefix([min(paths), max(paths)])
    low = common[: common.rfind("/") + 1] or "/"
    return low, low[:-1] + chr(ord("/") + 1)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix(stamps: np.ndarray) -> np.ndarray:
    """One uint64 per (dev, ino, size, mtime_ns) row (splitmix64 chained): a sort key."""
    u = stamps[:, :4].astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix(u[:, 0])
        for k in (1, 2, 3):
            h = _splitmix(h ^ u[:, k])
    return h


def _matches(cached: np.ndarray, want: np.ndarray) -> np.ndarray:
    """For each row of `want` (n, 4), the index into `cached` (m, 5) of an entry with that exact
    (dev, ino, size, mtime_ns) hashed long enough after the mtime; -1 if none. One sort and one
    binary search on a 64-bit mix of the four, then the four compared: two stamps that share a mix
    only cost a file read."""
    out = np.full(len(want), -1, np.int64)
    fresh = np.flatnonzero(cached[:, 3] <= cached[:, 4] - RACY_NS)
    if len(fresh) == 0 or len(want) == 0:
        return out
    keys = _mix(cached[fresh])
    order = np.argsort(keys)
    pos = np.minimum(np.searchsorted(keys[order], _mix(want)), len(keys) - 1)
    candidate = fresh[order[pos]]
    hit = np.all(cached[candidate, :4] == want, axis=1)
    out[hit] = candidate[hit]
    return out


class HashCache:
    """`hash(path)`, `hash_many(paths)`: blake2b-128 hex digests, read from the file only when its
    stamp is not cached. `reads` counts the files actually hashed, so callers (and tests) can tell
    that an unchanged rerun touched no file contents. `notes` says what was rebuilt or migrated;
    each note also goes to `log` (stderr by default)."""

    def __init__(self, path: Path | str, log=None):
        path = Path(path)
        self.path = path.with_suffix(".sqlite") if path.suffix == ".json" else path
        self.legacy = self.path.with_suffix(".json")  # the cache before it was SQLite
        self.reads = 0
        self.notes: list[str] = []
        self._log = log or (lambda msg: print(f"note: {msg}", file=sys.stderr))
        self._pending: list[tuple] = []
        self._flushed = time.monotonic()
        self.read_only = False  # the cache cannot be written by this user: read from, never added to
        self._db = self._open()
        if self.legacy.exists() and not self.read_only:
            self._migrate()

    # ------------------------------------------------------------ the database
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_file(self.path)  # SQLite would make it 0644 whatever the umask; its -wal and -shm take its mode
        _own_sidecars(self.path)
        db = sqlite3.connect(self.path, timeout=BUSY_SECONDS)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut loses the last rows
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA):
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA}")
        if version == 0:  # a new database (a write, so only then)
            with db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stamp BLOB NOT NULL, "
                    "hash BLOB NOT NULL) WITHOUT ROWID"
                )
                db.execute(f"PRAGMA user_version={SCHEMA}")
        return db

    def _open(self) -> sqlite3.Connection | None:
        try:
            return self._connect()
        except PermissionError as exc:  # the cache folder cannot be made
            return self._open_read_only(exc)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                return self._rebuild(exc)
            if isinstance(exc, sqlite3.OperationalError) and _not_writable(self.path, exc):
                return self._open_read_only(exc)
            raise

    def _open_read_only(self, exc: Exception) -> sqlite3.Connection | None:
        """The cache of a user who cannot write it (a shared or read-only workspace): opened read-only,
        or, where SQLite cannot open a WAL database so (its -shm file cannot be made), as an immutable
        file; failing that, no cache. Hashes are then computed and not kept, and a note says so once."""
        self.read_only = True
        db = None
        for mode in ("ro", "ro&immutable=1"):
            try:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True, timeout=BUSY_SECONDS)
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                    raise sqlite3.DatabaseError(f"schema version, expected {SCHEMA}")
                db.execute("SELECT 1 FROM files LIMIT 1").fetchall()
                break
            except sqlite3.Error:
                if db is not None:
                    db.close()
                db = None
        self._note(
            f"the file-hash cache {self.path} is not writable by this user ({_unwritable(self.path) or exc}); "
            + (
                "hashes are read from it and not added, so files it lacks are hashed each time"
                if db is not None
                else "it cannot be read either, so every file is hashed each time"
            )
        )
        return db

    def _rebuild(self, exc: Exception) -> sqlite3.Connection | None:
        """Set the damaged database aside (as *.damaged, replacing an earlier one) and start afresh."""
        if self.read_only:  # not ours to replace: no cache this time
            self._note(
                f"the file-hash cache {self.path} is damaged ({exc}) and not writable by this user; "
                "every file is hashed this time"
            )
            if self._db is not None:
                self._db.close()
            self._db = None
            return None
        if getattr(self, "_db", None) is not None:
            self._db.close()
        for suffix in ("", "-wal", "-shm"):
            old = Path(f"{self.path}{suffix}")
            if old.exists():
                os.replace(old, f"{old}.damaged")
        self._note(
            f"the file-hash cache {self.path} was damaged ({exc}); it was set aside as "
            f"{self.path.name}.damaged and rebuilt, so files are hashed again this once"
        )
        self._db = self._connect()
        return self._db

    def _run(self, fn, empty=None):
        """fn(db), rebuilding a database that turns out damaged and retrying once; `empty` without a cache."""
        if self._db is None:
            return empty
        try:
            return fn(self._db)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            db = self._rebuild(exc)
            return fn(db) if db is not None else empty

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        self._log(msg)

    # ------------------------------------------------------------ lookups
    def hash(self, path: Path | str) -> str:
        """Hash of the file's bytes; raises OSError (FileNotFoundError...) if it cannot be read."""
        key = os.path.abspath(path)
        stamp = _stamp(os.stat(key))
        self._flush()
        row = self._run(lambda db: db.execute("SELECT stamp, hash FROM files WHERE path = ?", (key,)).fetchone())
        if row is not None:
            cached = _STAMP.unpack(row[0])
            if cached[:4] == stamp and cached[3] <= cached[4] - RACY_NS:
                return row[1].hex()
        return self._hash_now(key, stamp)

    def hash_many(self, paths, stamps: bool = False):
        """Hashes of many files (absolute paths are taken as they are), in order; None for a file that
        cannot be read. One stat per file and one query for the whole folder; only files whose stamp
        is not cached are read. With `stamps`: (hashes, (n, 5) int64 stamps: each file's device,
        inode, size and mtime_ns as stat'ed here and when its hash was computed; zeros where none)."""
        keys = [p if p[:1] == "/" else os.path.abspath(p) for p in map(os.fspath, paths)]
        if not keys:
            return ([], np.zeros((0, 5), np.int64)) if stamps else []
        want, seen = stat_stamps(keys)
        cached, digests = self._entries(*_folder_range(keys))
        found = np.where(seen, _matches(cached, want), -1)
        hexes = digests[np.maximum(found, 0)].tobytes().hex() if len(digests) else ""
        out = [hexes[k : k + 32] for k in range(0, len(hexes), 32)] or [None] * len(keys)
        when = np.where(found >= 0, cached[np.maximum(found, 0), 4] if len(cached) else 0, 0)
        for i in np.flatnonzero(found < 0).tolist():
            out[i] = None
        todo = np.flatnonzero((found < 0) & seen).tolist()
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            for start in range(0, len(todo), READ_ROWS):
                part = todo[start : start + READ_ROWS]
                started = time.time_ns()  # before reading: a write after this moment gets a later mtime
                read = _digests(pool, [keys[i] for i in part], want[part, 2].tolist())
                for i, digest in zip(part, read):  # None: vanished or unreadable since its stat
                    out[i], when[i] = digest, started if digest else 0
                    if digest:
                        self.reads += 1
                        self._queue(keys[i], want[i].tolist(), digest, started)
        if not stamps:
            return out
        return out, np.c_[np.where(seen[:, None], want, 0), when]

    def _entries(self, low: str, high: str) -> tuple[np.ndarray, np.ndarray]:
        """(stamps (m, 5) int64, hashes (m, 16) uint8) of every entry with low <= path < high."""
        self._flush()
        # both aggregates walk the same rows in the same order, so their blobs stay aligned
        sql = (
            "SELECT CAST(group_concat(stamp, '') AS BLOB), CAST(group_concat(hash, '') AS BLOB) "
            "FROM files WHERE path >= ? AND path < ?"
        )
        stamps, hashes = self._run(lambda db: db.execute(sql, (low, high)).fetchone(), (None, None))
        stamps, hashes = stamps or b"", hashes or b""
        if len(stamps) != 8 * 5 * (len(hashes) // HASH_BYTES) or len(hashes) % HASH_BYTES:
            return self._rowwise(low, high)  # a stamp or hash of the wrong length: read row by row
        return (np.frombuffer(stamps, "<i8").reshape(-1, 5), np.frombuffer(hashes, np.uint8).reshape(-1, HASH_BYTES))

    def _rowwise(self, low: str, high: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self._run(
            lambda db: db.execute("SELECT stamp, hash FROM files WHERE path >= ? AND path < ?", (low, high)).fetchall(),
            [],
        )
        good = [(_STAMP.unpack(s), h) for s, h in rows if len(s) == _STAMP.size and len(h) == HASH_BYTES]
        return (
            np.array([s for s, _ in good], np.int64).reshape(-1, 5),
            np.frombuffer(b"".join(h for _, h in good), np.uint8).reshape(-1, HASH_BYTES),
        )

    # ------------------------------------------------------------ writes
    def _hash_now(self, key: str, stamp: tuple) -> str:
        started = time.time_ns()  # before reading: a write after this moment gets a later mtime
        digest = hash_file(key)
        self.reads += 1
        self._queue(key, stamp, digest, started)
        return digest

    def remember(self, paths, digests, hashed_ns: int) -> None:
        """Record hashes computed elsewhere (a lock's checksums), stamped with the files' current stat:
        `hashed_ns` is when they were hashed, so a file modified since then counts as racy."""
        for path, digest in zip(paths, digests):
            st = stat_or_none(os.fspath(path))
            if st is not None:
                self._queue(os.path.abspath(path), _stamp(st), digest, hashed_ns)

    def _queue(self, key: str, stamp: tuple, digest: str, hashed_ns: int) -> None:
        self._pending.append((key, _STAMP.pack(*stamp[:4], hashed_ns), bytes.fromhex(digest)))
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        rows, self._pending, self._flushed = self._pending, [], time.monotonic()
        if not rows or self.read_only:  # said once, when it was opened
            return

        def write(db):
            with db:
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", rows)

        try:
            self._run(write)
        except sqlite3.OperationalError as exc:  # busy past BUSY_SECONDS, read-only, full disk: a cache
            if _not_writable(self.path, exc):  # opened (its -wal and -shm were there), but not ours to write
                self.read_only = True
                self._note(
                    f"the file-hash cache {self.path} is not writable by this user ({exc}); hashes are "
                    "read from it and not added, so files it lacks are hashed each time"
                )
                return
            self._note(
                f"{len(rows)} file hashes were not cached in {self.path} ({exc}); they are computed again next time"
            )

    def save(self) -> None:
        """Commit what is not committed yet (rows are also committed as they come)."""
        self._flush()

    def close(self) -> None:
        self._flush()
        if self._db is not None:
            self._db.close()

    # ------------------------------------------------------------ file-hashes.json, once
    def _migrate(self) -> None:
        """Import the JSON cache of earlier versions ({path: [size, mtime_ns, inode, hash]}), then
        remove it. Its entries carry no device: each file is stat'ed once to take it from the file
        whose size, mtime and inode still match (the others are stale anyway)."""
        try:
            entries = json.loads(self.legacy.read_text())
            written = self.legacy.stat().st_mtime_ns  # hashed before this: the racy test's reference
        except (OSError, ValueError, UnicodeDecodeError):
            entries, written = None, 0
        kept = 0
        if isinstance(entries, dict):
            for key, entry in entries.items():
                st = stat_or_none(key) if isinstance(entry, list) and len(entry) == 4 else None
                if st is not None and [st.st_size, st.st_mtime_ns, st.st_ino] == entry[:3] and _is_hex(entry[3]):
                    self._queue(key, _stamp(st), entry[3], written)
                    kept += 1
        self._flush()
        self.legacy.unlink(missing_ok=True)
        what = (
            f"{kept} of {len(entries)} entries still current"
            if isinstance(entries, dict)
            else "it could not be read, so nothing was imported"
        )
        self._note(f"moved the file-hash cache {self.legacy.name} to {self.path.name} ({what})")


def _own_sidecars(path: Path) -> None:
    """SQLite gives a database's -wal and -shm files the database's mode when it makes them: a read-only
    run on a database made read-only leaves them 0444, and once the owner makes the database writable
    again they alone would keep the cache read-only. This user's own sidecars of a database this user
    may write take its mode back (nothing is removed: another process may have them open)."""
    if not os.access(path, os.W_OK):
        return
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        try:
            if side.stat().st_uid == os.geteuid() and not os.access(side, os.W_OK):
                os.chmod(side, path.stat().st_mode & 0o7777)
        except OSError:
            pass


def _unwritable(path: Path) -> str:
    """Which of the cache's folder, database, -wal and -shm files this user cannot write, in words."""
    for p in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and not os.access(p, os.W_OK):
            return f"{p} is mode {p.stat().st_mode & 0o777:o}, not writable by this user"
    return ""


def _is_hex(text) -> bool:
    return isinstance(text, str) and len(text) == 2 * HASH_BYTES and all(c in "0123456789abcdef" for c in text)


def _not_writable(path: Path, exc: sqlite3.OperationalError) -> bool:
    """The database (or its folder, where SQLite makes its -wal and -shm files) cannot be written by
    this user, as opposed to a busy database."""
    said = str(exc).lower()
    return (
        "readonly" in said
        or "unable to open" in said
        or not os.access(path.parent, os.W_OK)
        or (path.exists() and not os.access(path, os.W_OK))
    )


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Corruption (rebuild the cache), as opposed to a busy or read-only database (do not)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _DAMAGED
    return not isinstance(exc, sqlite3.OperationalError)
