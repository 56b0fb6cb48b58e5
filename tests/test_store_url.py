"""Latent stores at fsspec URLs (store.url): zarr's memory store and a local S3 server (moto) stand
in for object storage (no rename, one atomic PUT per object), `file://` for the local URL form. The
same bytes as a local store, the same idempotence, relayouts that survive a crash, verify and gc,
dask worker processes; training from a URL store is in test_train."""

import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import LocalCluster

from leakpipe.pipeline.ledger import locks as ledger

from leakpipe.pipeline.store import storage
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.manifest import read_manifest, write_manifest
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode as stage
from tests.conftest import cli

ARRAYS = ("mean", "logvar", "source_hash")


def run(ws_path, *overrides):
    ws = Workspace(ws_path)
    return stage.run(graph(ws, ws.config(None, overrides)), "closed", log=lambda m: None)


def arrays(location):
    g = zarr.open_group(location, mode="r")
    return {k: g[k][:] for k in ARRAYS}


def lock_of(ws_path, result) -> dict:
    fp12 = Path(result.store).name[: -len(".zarr")]
    return ledger.read_lock(Workspace(ws_path).store_lock("closed", fp12))


@pytest.fixture
def url():
    """A fresh memory:// prefix, removed afterwards (the memory file system is process-wide)."""
    prefix = f"memory://leakpipe-{uuid.uuid4().hex[:8]}/latents"
    yield prefix
    storage.remove(prefix)


def test_memory_url_store_has_the_local_bytes_and_reruns_do_nothing(ws, url):
    local = run(ws)
    remote = run(ws, f"store.url={url}")
    assert remote.store == f"{url}/closed/{Path(local.store).name}" and remote.encoded == 12
    assert lock_of(ws, remote)["outputs_root"] == remote.store
    got, want = arrays(remote.store), arrays(local.store)
    for k in ARRAYS:
        np.testing.assert_array_equal(got[k], want[k])
    # chunk for chunk the same objects: same names, sizes and checksums as the local store's files
    assert lock_of(ws, remote)["outputs"] == ledger.checksums(local.store)
    assert run(ws, f"store.url={url}").up_to_date
    # back to the local cache: the lock points elsewhere, so it is stale, but every row is reused
    v = graph(Workspace(ws), Workspace(ws).config()).plan("encode", "closed").check()
    assert not v.up_to_date and "outputs moved" in v.reasons[0] and url in v.reasons[0]
    again = run(ws)
    assert again.encoded == 0 and again.reused == 12 and run(ws).up_to_date


def _reorder(ws):
    m = read_manifest(ws / "manifests" / "closed.csv")
    write_manifest(ws / "manifests" / "closed.csv", m.root, list(reversed(m.rows))[:-2])


def assert_relaid(got: dict, before: dict) -> None:
    """`got` holds the 10 rows left, reversed, each with the bytes it had in `before`."""
    np.testing.assert_array_equal(got["source_hash"], before["source_hash"][::-1][:10])
    for k in ("mean", "logvar"):
        np.testing.assert_array_equal(got[k], before[k][::-1][:10])


def test_relayout_on_object_storage_survives_a_crash_mid_copy(ws, url, monkeypatch):
    store = run(ws, f"store.url={url}").store
    before = arrays(store)
    _reorder(ws)
    fs = storage.filesystem(url)[0]
    real_copy, calls = type(fs).copy, []

    def killed_on_second_copy(self, *a, **k):  # the latents are copied, the hashes never are
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-copy")
        return real_copy(self, *a, **k)

    monkeypatch.setattr(type(fs), "copy", killed_on_second_copy)
    with pytest.raises(KeyboardInterrupt):
        run(ws, f"store.url={url}")
    assert storage.exists(store + ".relayout.done") and not storage.files(store + "/source_hash").get("c/0/0")
    assert all(p.split(".relayout/")[1].startswith("source_hash/") for p in calls[1][0])
    monkeypatch.setattr(type(fs), "copy", real_copy)
    res = run(ws, f"store.url={url}")  # recovery finishes the swap: nothing to encode or copy again
    assert res.encoded == 0 and res.reused == 10
    assert not storage.exists(store + ".relayout") and not storage.exists(store + ".relayout.done")
    assert_relaid(arrays(store), before)


@pytest.mark.parametrize("local", [False, True], ids=["memory", "local"])
def test_relayout_killed_before_it_completes_leaves_the_old_store(ws, url, monkeypatch, local):
    url = str(ws / "stores") if local else url
    first = run(ws, f"store.url={url}")
    before = arrays(first.store)
    _reorder(ws)
    real_open = storage.open_file

    def killed_before_marker(location, mode="rb"):
        if location.endswith(".relayout.done"):
            raise KeyboardInterrupt("killed before the new layout was marked complete")
        return real_open(location, mode)

    monkeypatch.setattr(storage, "open_file", killed_before_marker)
    with pytest.raises(KeyboardInterrupt):
        run(ws, f"store.url={url}")
    assert storage.exists(first.store + ".relayout") and storage.files(first.store + "/source_hash")
    monkeypatch.setattr(storage, "open_file", real_open)
    res = run(ws, f"store.url={url}")  # the half-done copy is dropped and the relayout redone
    assert res.encoded == 0 and res.copied == 10 and not storage.exists(first.store + ".relayout")
    assert_relaid(arrays(res.store), before)


def test_local_relayout_killed_between_delete_and_rename_is_finished(ws, monkeypatch):
    first = run(ws)
    before = arrays(first.store)
    _reorder(ws)

    def killed(src, dst):
        raise KeyboardInterrupt("killed after the old store was deleted, before the rename")

    monkeypatch.setattr(storage, "move", killed)
    with pytest.raises(KeyboardInterrupt):
        run(ws)
    assert not storage.exists(first.store) and storage.exists(first.store + ".relayout.done")
    monkeypatch.undo()
    res = run(ws)
    assert res.encoded == 0 and res.reused == 10 and not storage.exists(first.store + ".relayout")
    assert_relaid(arrays(res.store), before)


def test_verify_and_gc_reach_url_stores(ws, url):
    toml = ws / "leakpipe.toml"
    toml.write_text(toml.read_text().replace("[store]\n", f'[store]\nurl = "{url}"\n'))
    res = run(ws)
    assert cli(ws, "verify").exit_code == 0
    chunk = storage.join(res.store, next(n for n in storage.files(res.store) if n.startswith("mean/c/")))
    with storage.open_file(chunk) as fh:
        data = bytearray(fh.read())
    data[-1] ^= 0xFF
    with storage.open_file(chunk, "wb") as fh:
        fh.write(bytes(data))
    r = cli(ws, "verify")
    assert r.exit_code != 0 and f"checksum mismatch (corrupted): {chunk}" in r.output
    stray = f"{url}/closed/0123456789ab.zarr"
    zarr.open_group(stray, mode="w")
    r = cli(ws, "gc", "--dry-run")
    assert f"would remove {stray}" in r.output and res.store not in r.output
    cli(ws, "gc")
    assert not storage.exists(stray) and storage.exists(res.store)


def test_file_url_and_relative_folder_are_the_local_path(ws, monkeypatch, tmp_path):
    res = run(ws, f"store.url=file://{ws}/stores")
    assert res.store == str(ws / "stores" / "closed" / Path(res.store).name)
    assert isinstance(zarr.open_group(res.store, mode="r").store, zarr.storage.LocalStore)
    assert lock_of(ws, res)["outputs_root"] == "../../../stores/closed/" + Path(res.store).name
    monkeypatch.chdir(tmp_path.parent)  # relative to the workspace, wherever the command runs
    assert run(ws, f"store.url={ws}/stores").up_to_date and run(ws, "store.url=stores").up_to_date
    zarr.open_group(str(ws / "stores" / "closed" / "0123456789ab.zarr"), mode="w")
    r = cli(ws, "gc", "--set", "store.url=stores")
    assert f"removing {ws}/stores/closed/0123456789ab.zarr" in r.output and res.store not in r.output


def test_an_unreachable_store_is_an_error_the_user_can_act_on(ws):
    with pytest.raises(UserError, match=r"cannot reach the latent store nosuch://bucket/x/closed/.*Check store.url"):
        run(ws, "store.url=nosuch://bucket/x")
    r = cli(ws, "status", "--set", "store.url=nosuch://bucket/x")
    assert r.exit_code == 0 and "STALE: cannot reach the latent store" in r.output


def test_memory_store_with_worker_processes_is_refused(ws, url):
    with pytest.raises(UserError, match="memory store, which only this process can see"):
        run(ws, f"store.url={url}", "encode.workers=2")


@pytest.mark.timeout(300)
def test_dask_workers_write_a_url_store_with_the_same_bytes(ws, url):
    """Workers as threads of this process, so they see its memory file system; the scheduler
    address goes in as a user's would."""
    import torch

    threads = torch.get_num_threads()
    want = arrays(run(ws, "encode.torch_threads=1").store)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
            res = run(ws, f"store.url={url}", f"encode.scheduler={c.scheduler_address}", "encode.torch_threads=1")
    finally:
        torch.set_num_threads(threads)
    assert res.encoded == 12 and res.store.startswith("memory://")
    got = arrays(res.store)
    for k in ARRAYS:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.fixture
def s3(monkeypatch):
    """A local S3 endpoint (moto), reached the way users reach MinIO or Ceph: through
    FSSPEC_S3_ENDPOINT_URL, which worker processes read at start and this process via fsspec's
    config. Returns a bucket URL."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import socket

    import fsspec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("leakpipe")
    yield "s3://leakpipe/latents"
    server.stop()
    fsspec.AbstractFileSystem.clear_instance_cache()


@pytest.mark.timeout(300)
def test_s3_store_with_worker_processes_and_a_relayout(ws, s3):
    """Two dask worker processes write an S3 store; reordering the manifest then relays it out with
    server-side copies (no rename on S3), and every row keeps its bytes."""
    want = arrays(run(ws, "encode.torch_threads=1").store)
    r = cli(
        ws,
        "encode",
        "--split",
        "closed",
        "--workers",
        "2",
        "--set",
        f"store.url={s3}",
        "--set",
        "encode.torch_threads=1",
    )
    assert r.exit_code == 0, r.output
    assert "2 workers" in r.output and f"-> {s3}/closed/" in r.output
    store = r.output.strip().rsplit("-> ", 1)[1]
    got = arrays(store)
    for k in ARRAYS:
        np.testing.assert_array_equal(got[k], want[k])
    assert "up to date" in cli(ws, "encode", "--split", "closed", "--set", f"store.url={s3}").output
    _reorder(ws)
    res = run(ws, f"store.url={s3}")
    assert res.encoded == 0 and res.copied == 10 and not storage.exists(store + ".relayout")
    assert_relaid(arrays(store), want)
    assert cli(ws, "verify", "--set", f"store.url={s3}").exit_code == 0
