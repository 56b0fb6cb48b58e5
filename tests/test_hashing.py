"""The file-hash cache (SQLite): what it reads, racy files, damage, the JSON it replaces, kills and
two writers at once."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from leakpipe.pipeline.store import hashing
from leakpipe.pipeline.store.hashing import HashCache, hash_file
from tests.conftest import cli, write_images

HOUR_AGO = time.time_ns() - 3600 * 10**9


def settled(*paths):
    """Give files an mtime an hour back: a file written just before it is hashed is 'racy' (it could
    change again within the same timestamp tick) and is hashed again next time."""
    for p in paths:
        os.utime(p, ns=(HOUR_AGO, HOUR_AGO))
    return list(paths)


def files(folder, n, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{i:03d}.bin"
        p.write_bytes(os.urandom(size))
        out.append(p)
    return settled(*out)


def test_cache_reads_each_file_once_and_notices_changes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    settled(f)
    cache = HashCache(tmp_path / "h.sqlite")
    h1 = cache.hash(f)
    assert h1 == hash_file(f) and cache.reads == 1
    cache.save()
    again = HashCache(tmp_path / "h.sqlite")
    assert again.hash(f) == h1 and again.reads == 0
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert again.hash(f) != h1 and again.reads == 1


def test_hash_many_reads_only_new_files(tmp_path):
    paths = files(tmp_path / "a", 20)
    cache = HashCache(tmp_path / "h.sqlite")
    got = cache.hash_many([*paths, tmp_path / "a" / "missing.bin"])
    assert got == [hash_file(p) for p in paths] + [None] and cache.reads == 20
    cache.save()
    extra = files(tmp_path / "a" / "sub", 1)
    again = HashCache(tmp_path / "h.sqlite")
    assert again.hash_many([*paths, *extra])[-1] == hash_file(extra[0]) and again.reads == 1
    again.save()
    third = HashCache(tmp_path / "h.sqlite")
    assert third.hash_many([*reversed(paths), *extra]) == [*reversed(got[:-1]), hash_file(extra[0])]
    assert third.reads == 0


def test_a_file_changed_within_its_timestamp_tick_is_not_missed(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    st = f.stat()
    cache = HashCache(tmp_path / "h.sqlite")
    first = cache.hash_many([f])[0]
    cache.save()
    f.write_bytes(b"two")  # same size; put back the mtime, as a write in the same clock tick leaves it
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_size == st.st_size
    again = HashCache(tmp_path / "h.sqlite")
    assert again.hash_many([f])[0] == hash_file(f) != first and again.reads == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_is_set_aside_and_rebuilt_with_a_note(tmp_path, damage):
    paths = files(tmp_path / "a", 300, size=200)
    db = tmp_path / "h.sqlite"
    cache = HashCache(db)
    want = cache.hash_many(paths)
    cache.close()
    data = db.read_bytes()
    db.write_bytes(b"this is not a database" * 200 if damage == "garbage" else data[: len(data) // 2])
    notes = []
    again = HashCache(db, log=notes.append)
    assert again.hash_many(paths) == want and again.reads == 300
    assert len(notes) == 1 and "damaged" in notes[0] and "rebuilt" in notes[0] and str(db) in notes[0]
    assert (tmp_path / "h.sqlite.damaged").exists()
    again.close()
    assert HashCache(db, log=notes.append).hash_many(paths) == want and len(notes) == 1


def test_file_hashes_json_is_migrated_once(tmp_path):
    paths = files(tmp_path / "a", 3)
    legacy = tmp_path / "file-hashes.json"
    entries = {str(p): [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino, hash_file(p)] for p in paths}
    entries[str(tmp_path / "gone.bin")] = [1, 2, 3, "0" * 32]
    legacy.write_text(json.dumps(entries))
    notes = []
    cache = HashCache(tmp_path / "file-hashes.sqlite", log=notes.append)
    assert not legacy.exists() and "3 of 4 entries still current" in notes[0]
    assert cache.hash_many(paths) == [hash_file(p) for p in paths] and cache.reads == 0
    assert HashCache(legacy, log=notes.append).hash_many(paths) and len(notes) == 1  # the old name works too


def test_a_kill_mid_write_leaves_a_usable_cache(tmp_path):
    paths = files(tmp_path / "a", 400)
    db = tmp_path / "h.sqlite"
    body = (
        "import time\nfrom leakpipe.pipeline.store import hashing\nhashing.FLUSH_SECONDS = 0\n"
        "real = hashing._digest\nhashing._digest = lambda p, n: (time.sleep(0.002), real(p, n))[1]\n"
        f"hashing.HashCache({str(db)!r}).hash_many({[str(p) for p in paths]!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", body])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and rows(db) < 50:
        time.sleep(0.005)
    assert proc.poll() is None, "the subprocess finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # while it commits a row a file: most likely inside a transaction
    proc.wait()
    cache = HashCache(db)
    assert cache.hash_many(paths) == [hash_file(p) for p in paths]
    assert 0 < cache.reads <= 350 and not cache.notes  # what was committed is kept; nothing damaged


def rows(db) -> int:
    try:
        with sqlite3.connect(db, timeout=0.1) as con:
            return con.execute("SELECT count(*) FROM files").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_two_encodes_of_different_splits_share_the_cache(ws):
    write_images(ws / "data2", labels=("c", "d"), n=15, seed=3)
    settled(*(ws / "data2").rglob("*.png"), *(ws / "data").rglob("*.png"))
    assert cli(ws, "manifest", "build", str(ws / "data2"), "--split", "other").exit_code == 0
    body = (
        "import sys, time\nfrom leakpipe.pipeline.store import hashing\nhashing.FLUSH_SECONDS = 0\n"
        "real = hashing.hash_file\nhashing.hash_file = lambda p: (time.sleep(0.05), real(p))[1]  # overlap\n"
        "from leakpipe.pipeline.cli import main\nmain(['encode', '--split', sys.argv[-1], '-C', sys.argv[-2]])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", body, str(ws), split], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for split in ("closed", "other")
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "12 encoded" in outputs[0] and "30 encoded" in outputs[1] and "note:" not in "".join(outputs)
    cache = HashCache(ws / "cache" / "file-hashes.sqlite")
    images = sorted((ws / "data").rglob("*.png")) + sorted((ws / "data2").rglob("*.png"))
    assert cache.hash_many(images) == [hash_file(p) for p in images] and cache.reads == 0
    with sqlite3.connect(ws / "cache" / "file-hashes.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_stamps_with_inodes_above_2_63_are_kept(tmp_path):
    assert hashing._signed(2**64 - 5) == -5 and hashing._signed(7) == 7


def test_bulk_matching_equals_a_search_entry_by_entry():
    import numpy as np

    r = np.random.default_rng(1)
    values = np.array([0, 1, 255, 256, -1, 2**40, -(2**62)], np.int64)  # zero bytes, sign bits, repeats
    cached = values[r.integers(0, 7, (3000, 5))]
    cached[:, 4] = cached[:, 3] + r.choice([-1, hashing.RACY_NS], 3000)  # some entries racy
    want = values[r.integers(0, 7, (2000, 4))]
    found = hashing._matches(cached, want)
    fresh = cached[:, 3] <= cached[:, 4] - hashing.RACY_NS
    for i, row in enumerate(want):
        ok = np.flatnonzero(np.all(cached[:, :4] == row, axis=1) & fresh)
        assert found[i] in ok if len(ok) else found[i] == -1


READ_ONLY = """
import json, sys
from leakpipe.pipeline.store.hashing import HashCache
notes = []
h = HashCache(sys.argv[1], log=notes.append)
out = h.hash_many(sys.argv[2:])
h.close()
print(json.dumps({"hashes": out, "reads": h.reads, "read_only": h.read_only, "notes": notes}))
"""


@pytest.mark.parametrize(
    "state", ["closed cleanly (no -wal, -shm)", "held open by its owner (-wal, -shm there)", "never made"]
)
def test_a_read_only_cache_is_read_not_written(state):
    """As a user who cannot write the cache or its folder: the hashes it holds are used, new ones are
    computed and not kept, one note says so, and nothing in the folder changes."""
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as an unprivileged user (uid 65534)")
    tmp_path = Path(tempfile.mkdtemp(prefix="leakpipe-ro-"))  # pytest's own folder is not open to other users
    top = tmp_path / "top"
    data = files(top / "data", 4)
    cache = top / "cache" / "file-hashes.sqlite"
    cache.parent.mkdir()
    owner = None
    if state != "never made":
        h = HashCache(cache)
        want = h.hash_many(data[:3])  # the fourth is not in the cache
        if state.startswith("held"):
            owner = h
            owner.save()
        else:
            h.close()
    subprocess.run(["chmod", "-R", "a+rX,a-w", str(top)], check=True)
    os.chmod(tmp_path, 0o755)
    before = sorted(os.listdir(cache.parent))
    try:
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                READ_ONLY,
                str(cache),
                *map(str, data),
            ],
            capture_output=True,
            text=True,
            cwd=top,
        )
        after = sorted(os.listdir(cache.parent))
    finally:
        if owner is not None:
            owner.close()
        subprocess.run(["chmod", "-R", "u+w", str(top)], check=True)
        truth = [hash_file(p) for p in data]
        shutil.rmtree(tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["hashes"] == truth and got["read_only"]
    assert got["reads"] == (4 if state == "never made" else 1)  # cached hashes are used
    assert len(got["notes"]) == 1 and "not writable by this user" in got["notes"][0]
    assert after == before  # nothing written, nothing made
    if state != "never made":
        assert want == got["hashes"][:3]
