"""SIGKILL an encode part-way; the rerun must end with the same bytes as an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import zarr

from pipeline.workspace import Workspace
from stages import encode as stage
from tests.conftest import cli, write_images

# The victim writes slowly (after each chunk) so the kill lands mid-run, between chunk writes or
# inside one; nothing else differs from a normal encode.
VICTIM = textwrap.dedent("""
    import sys, time
    from pipeline import latent_store
    from pipeline.workspace import Workspace
    from stages import encode
    real = latent_store.write_chunk
    def slow(*a, **k):
        real(*a, **k)
        time.sleep(0.15)
    latent_store.write_chunk = slow
    ws = Workspace(sys.argv[1])
    encode.run(ws, "closed", ws.config(), log=print)
""")


def arrays(store):
    g = zarr.open_group(str(store), mode="r")
    return {k: g[k][:] for k in ("mean", "logvar", "source_hash")}


def test_sigkill_then_rerun_equals_uninterrupted(ws, tmp_path):
    write_images(ws / "data", labels=("c", "d"), n=18, seed=11)
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    clean = tmp_path / "clean"
    shutil.copytree(ws, clean, ignore=shutil.ignore_patterns("cache"))
    reference = stage.run(Workspace(clean), "closed", Workspace(clean).config(), log=lambda m: None)

    proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(ws)], cwd=os.getcwd(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_dir = ws / "cache" / "latents" / "closed"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        hashes = list(store_dir.glob("*.zarr/source_hash/c/*/*"))
        if len(hashes) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "encode finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = next(store_dir.glob("*.zarr"))
    valid = zarr.open_group(str(store), mode="r")["source_hash"][:].any(axis=1).sum()
    assert 0 < valid < 48, valid  # killed part-way
    assert not list(store_dir.glob("*.lock.json"))  # no lock: the stage is not done

    res = stage.run(Workspace(ws), "closed", Workspace(ws).config(), log=lambda m: None)
    assert res.encoded == 48 - valid
    got, want = arrays(res.store), arrays(reference.store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].tobytes() == want[name].tobytes()
    assert cli(ws, "verify").exit_code == 0
