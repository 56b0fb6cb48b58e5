import os

from leakpipe.pipeline.store.hashing import HashCache, hash_file


def test_cache_reads_each_file_once_and_notices_changes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    cache = HashCache(tmp_path / "h.json")
    h1 = cache.hash(f)
    assert h1 == hash_file(f) and cache.reads == 1
    cache.save()
    again = HashCache(tmp_path / "h.json")
    assert again.hash(f) == h1 and again.reads == 0
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert again.hash(f) != h1 and again.reads == 1
