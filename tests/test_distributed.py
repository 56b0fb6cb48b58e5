"""Stage one on a local dask.distributed cluster of 2 worker processes: same bytes as one process,
even when a worker process is SIGKILLed mid-run.

CPU convolutions round differently with different intra-op thread counts (measured here: up to
1.5e-6, one float32 ulp, between 2 threads and a dask worker's 1), so both sides run with
encode.torch_threads = 1 and must then agree bitwise."""

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode as stage
from tests.conftest import cli, write_images

pytestmark = pytest.mark.timeout(300)


def arrays(store):
    g = zarr.open_group(str(store), mode="r")
    return {k: g[k][:] for k in ("mean", "logvar", "source_hash")}


@pytest.fixture
def dws(ws, tmp_path):
    """The ws fixture with 2 x 16 images and a single-process reference store beside it."""
    shutil.rmtree(ws / "data")
    write_images(ws / "data", labels=("c", "d"), n=16, seed=5)
    assert cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed").exit_code == 0
    ref = tmp_path / "reference"
    shutil.copytree(ws, ref, ignore=shutil.ignore_patterns("cache", "reference"))
    toml = ws / "leakpipe.toml"
    toml.write_text(toml.read_text().replace("[encode]\n", "[encode]\ntorch_threads = 1\n"))
    shutil.copy(ws / "leakpipe.toml", ref / "leakpipe.toml")
    result = stage.run(graph(Workspace(ref), Workspace(ref).config()), "closed", log=lambda m: None)
    return ws, arrays(result.store)


def test_two_workers_write_the_same_store(dws):
    ws, want = dws
    environ = dict(os.environ)
    r = cli(ws, "encode", "--split", "closed", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert dict(os.environ) == environ  # LocalCluster's OMP_NUM_THREADS=1 must not leak to later work
    assert "on dask" in r.output and "2 workers" in r.output and "32 encoded" in r.output
    store = next((ws / "cache" / "latents" / "closed").glob("*.zarr"))
    got = arrays(store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert "up to date" in cli(ws, "encode", "--split", "closed", "--workers", "2").output


def _slow_batches():  # runs on each worker: the kill must land while chunks are still pending
    import time as _time

    import leakpipe.pipeline.engine.encoding as e

    real = e.encode_batch
    e.encode_batch = lambda *a: (_time.sleep(0.4), real(*a))[1]


def test_killed_worker_process_still_gives_every_row(dws):
    from distributed import Client, LocalCluster

    ws, want = dws
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.run(_slow_batches)
        pids = client.run(os.getpid)
        cfg = Workspace(ws).config(None, [f"encode.scheduler={cluster.scheduler_address}"])
        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault("r", stage.run(graph(Workspace(ws), cfg), "closed", log=lambda m: None))
        )
        t.start()
        store_dir = ws / "cache" / "latents" / "closed"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(store_dir.glob("*.zarr/source_hash/c/*/*"))) < 1:
            time.sleep(0.02)
        written_before_kill = len(list(store_dir.glob("*.zarr/source_hash/c/*/*")))
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        t.join(timeout=240)
        assert not t.is_alive()
    assert 1 <= written_before_kill < 8  # killed mid-run (8 chunks of 4 rows)
    result = box["r"]
    assert result.encoded == 32 and not result.failures
    got = arrays(result.store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
