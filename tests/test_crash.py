"""SIGKILL an encode part-way; the rerun must end with the same bytes as an uninterrupted run."""

import shutil

import numpy as np
import zarr

from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode as stage
from tests.conftest import cli, kill_midway, write_images


def arrays(store):
    g = zarr.open_group(str(store), mode="r")
    return {k: g[k][:] for k in ("mean", "logvar", "source_hash")}


def test_sigkill_then_rerun_equals_uninterrupted(ws, tmp_path):
    write_images(ws / "data", labels=("c", "d"), n=18, seed=11)
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    clean = tmp_path / "clean"
    shutil.copytree(ws, clean, ignore=shutil.ignore_patterns("cache"))
    reference = stage.run(graph(Workspace(clean), Workspace(clean).config()), "closed", log=lambda m: None)

    # chunk writes are slowed so the kill lands mid-run; nothing else differs from a normal encode
    store_dir = ws / "cache" / "latents" / "closed"
    kill_midway(
        "leakpipe.pipeline.store.latent_store.write_chunk",
        0.15,
        f"from leakpipe.pipeline.workspace import Workspace\nfrom leakpipe.stages import encode, graph\n"
        f"ws = Workspace({str(ws)!r})\nencode.run(graph(ws, ws.config()), 'closed', log=print)",
        ready=lambda: len(list(store_dir.glob("*.zarr/source_hash/c/*/*"))) >= 3,
    )

    store = next(store_dir.glob("*.zarr"))
    valid = zarr.open_group(str(store), mode="r")["source_hash"][:].any(axis=1).sum()
    assert 0 < valid < 48, valid  # killed part-way
    assert not list(store_dir.glob("*.lock.json"))  # no lock: the stage is not done

    res = stage.run(graph(Workspace(ws), Workspace(ws).config()), "closed", log=lambda m: None)
    assert res.encoded == 48 - valid
    got, want = arrays(res.store), arrays(reference.store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].tobytes() == want[name].tobytes()
    assert cli(ws, "verify").exit_code == 0
