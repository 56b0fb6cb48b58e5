"""The store's lock records the manifest's rows by their digest, the rows themselves (with each file's
stat when it was hashed) in a side file: a no-op reads neither the manifest nor the hash cache when
every file's stat is the one it was hashed with, and a lock of the earlier format, every row in its
JSON, reads as up to date and is rewritten, never re-encoded."""

import json
import os
import time
from pathlib import Path

from leakpipe.pipeline.ledger import locks
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store.hashing import RACY_NS, HashCache
from leakpipe.stages import encode as stage
from tests.conftest import cli, write_images
from tests.helpers import encode_closed as run


def backdate(ws: Path) -> float:
    """Files last written a minute ago: hashed now, their stat alone can vouch for them later (a file
    written within RACY_NS of its hashing cannot, and is hashed again)."""
    when = time.time() - 60
    for p in (ws / "data").rglob("*.png"):
        os.utime(p, (when, when))
    return when


def lock_path(res) -> Path:
    return Path(res.store).with_name(Path(res.store).stem + ".lock.json")


def planned(monkeypatch) -> dict:
    """How often encode's plan parsed the manifest and asked the hash cache."""
    calls = {"manifest": 0, "hash_many": 0}
    real_read, real_many = stage.read_manifest, HashCache.hash_many

    def read(*a, **k):
        calls["manifest"] += 1
        return real_read(*a, **k)

    def many(self, *a, **k):
        calls["hash_many"] += 1
        return real_many(self, *a, **k)

    monkeypatch.setattr(stage, "read_manifest", read)
    monkeypatch.setattr(HashCache, "hash_many", many)
    return calls


def test_the_lock_keeps_a_digest_and_the_rows_beside_it(ws):
    backdate(ws)
    res = run(ws)
    lock = locks.read_lock(lock_path(res))
    record = lock["inputs"]["files"]["manifest closed"]
    assert lock["format"] == 3 and set(record) == {"rows", "digest"} and record["rows"] == 12
    rows = locks.read_rows(lock_path(res), lock)["manifest closed"]
    m = read_manifest(ws / "manifests" / "closed.csv")
    assert rows.names == m.column("path") and rows.values == HashCache(ws / "cache" / "h.sqlite").hash_many(
        m.abspaths()
    )
    assert rows.stamps.shape == (12, 5) and rows.fresh(RACY_NS)
    assert locks.rows_digest(rows.names, rows.values) == record["digest"]
    assert os.path.getsize(lock_path(res)) < 4096  # however many rows


def test_a_noop_reads_neither_the_manifest_nor_the_hash_cache(ws, monkeypatch):
    when = backdate(ws)
    run(ws)
    calls = planned(monkeypatch)
    assert run(ws).up_to_date and "encode closed  up to date" in cli(ws, "status").output
    assert calls == {"manifest": 0, "hash_many": 0}
    touched = next((ws / "data").rglob("*.png"))
    os.utime(touched, (when + 1, when + 1))  # the same bytes, another stat: planned from the manifest again
    assert run(ws).up_to_date and calls == {"manifest": 1, "hash_many": 1}
    assert run(ws).up_to_date and calls == {"manifest": 1, "hash_many": 1}  # the lock took the new stat


def test_a_lock_of_the_earlier_format_is_upgraded_without_encoding(ws, counting, monkeypatch):
    backdate(ws)
    res = run(ws)
    assert counting["images"] == 12
    path, lock = lock_path(res), locks.read_lock(lock_path(res))
    rows = locks.read_rows(path, lock)["manifest closed"]
    earlier = {k: v for k, v in lock.items() if k not in ("identity", "rows")}  # as format 2 wrote it
    earlier["format"] = 2
    earlier["inputs"]["files"]["manifest closed"] = rows.pairs()
    path.write_text(json.dumps(earlier, indent=1, sort_keys=True) + "\n")
    locks.rows_file(path).unlink()
    assert "encode closed  up to date" in cli(ws, "status").output
    assert run(ws).up_to_date and counting["images"] == 12
    now = locks.read_lock(path)
    assert now["format"] == 3 and now["fingerprint"] == lock["fingerprint"] and now["written"] == lock["written"]
    assert now["outputs"] == lock["outputs"] and locks.rows_file(path).exists()
    calls = planned(monkeypatch)
    assert run(ws).up_to_date and calls == {"manifest": 0, "hash_many": 0}


def test_a_change_is_explained_from_the_side_file_or_said_not_itemised(ws):
    backdate(ws)
    res = run(ws)
    write_images(ws / "more", labels=("a",), n=1, seed=7)
    (ws / "more" / "a" / "000.png").rename(ws / "data" / "a" / "zz.png")
    assert cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed").exit_code == 0
    assert "STALE: manifest closed: 1 row added" in cli(ws, "status").output
    locks.rows_file(lock_path(res)).write_bytes(b"damaged")
    out = cli(ws, "status").output
    assert "STALE: manifest closed: 12 rows -> 13 rows, changed" in out and "not itemised" in out
    assert run(ws).encoded == 1


def test_a_noop_that_stats_in_two_processes_still_sees_a_changed_file(ws, monkeypatch):
    from leakpipe.pipeline.store import stats

    when = backdate(ws)
    run(ws)
    forks = []
    real = stats._forked
    monkeypatch.setattr(stats, "PROBE", 2)  # the first 2 files here, the other 10 halved with a child
    monkeypatch.setattr(stats, "FORK_MIN", 2)
    monkeypatch.setattr(stats, "STAT_WAITS_S", 1.0)  # every stat reads as one from the kernel's cache
    monkeypatch.setattr(stats, "_can_fork", lambda: True)
    # the side file's names as its bytes (stats.Joined): each process cuts the paths it stats
    monkeypatch.setattr(
        stats, "_forked", lambda paths, *out: forks.append((len(paths), type(paths))) or real(paths, *out)
    )
    calls = planned(monkeypatch)
    assert run(ws).up_to_date and "encode closed  up to date" in cli(ws, "status").output
    assert calls == {"manifest": 0, "hash_many": 0} and forks == [(10, stats.Joined)] * 2
    last = read_manifest(ws / "manifests" / "closed.csv").abspaths()[-1]  # in the half the child stats
    os.utime(last, (when + 1, when + 1))
    assert "encode closed  up to date" in cli(ws, "status").output  # the stat changed, the bytes did not
    assert calls == {"manifest": 1, "hash_many": 1}


def test_a_side_files_names_reach_os_stat_as_the_file_systems_bytes(tmp_path):
    from leakpipe.pipeline.ledger.columns import ENCODING, Column

    (tmp_path / "a").mkdir()
    names = ["a/1.png", "a/\u00fc.png", "a/\udcff.png"]  # the last: a name that was not UTF-8 (0xff)
    for raw_name in (b"1.png", "\u00fc.png".encode(), b"\xff.png"):
        with open(os.fsencode(tmp_path / "a") + b"/" + raw_name, "wb") as f:
            f.write(b"x")
    utf8 = Column("\0".join(names[:2]).encode(*ENCODING), 2)
    assert utf8 == names[:2] and len(utf8) == 2 and utf8[1] == names[1]
    assert utf8.prefixed(f"{tmp_path}/").paths() == [os.fsencode(f"{tmp_path}/{n}") for n in names[:2]]
    escaped = Column("\0".join(names).encode(*ENCODING), 3)
    assert escaped.prefixed(f"{tmp_path}/") == [f"{tmp_path}/{n}" for n in names]  # strings: os.stat encodes
    assert [os.stat(p).st_size for p in utf8.prefixed(f"{tmp_path}/").paths()] == [1, 1]
    assert [os.stat(p).st_size for p in escaped.prefixed(f"{tmp_path}/")] == [1, 1, 1]
    assert locks.Rows(escaped, Column(b"h1\0h2\0h3", 3)).pairs() == [[n, f"h{i}"] for i, n in enumerate(names, 1)]
