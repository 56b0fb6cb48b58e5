"""Stage one: store contents, incremental cases, failures, locks."""

import re
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from leakpipe.pipeline.ledger import locks as ledger

from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.images import load_image, to_model_range
from leakpipe.pipeline.store.locking import Busy, exclusive
from leakpipe.pipeline.manifest import read_manifest, write_manifest
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from tests.conftest import cli, write_images
from tests.helpers import encode_closed as run


def store_of(result):
    return zarr.open_group(str(result.store), mode="r")


def test_store_holds_unscaled_moments_readable_by_zarr_and_dask(ws, tiny_vae):
    res = run(ws)
    assert res.encoded == 12 and not res.failures
    g = store_of(res)
    assert g["mean"].shape == (12, 4, 16, 16) and g["mean"].chunks == (4, 4, 16, 16)
    assert g["mean"].dtype == np.float32 and g["source_hash"].shape == (12, 16)
    assert g.attrs["encoder_fingerprint"].startswith(Path(res.store).stem)
    m = read_manifest(ws / "manifests" / "closed.csv")
    model = vae_lib.load_vae(vae_lib.resolve(ws_config(ws).vae))
    img = torch.from_numpy(load_image(m.abspath(5), ws_config(ws).preprocess))[None]
    with torch.no_grad():
        post = model.encode(to_model_range(img)).latent_dist
    np.testing.assert_allclose(g["mean"][5], post.mean[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["logvar"][5], post.logvar[0].numpy(), rtol=1e-5, atol=1e-6)
    lazy = da.from_zarr(str(res.store), component="mean")
    assert lazy.chunks[0] == (4, 4, 4)
    np.testing.assert_array_equal(lazy[5].compute(), g["mean"][5])


def ws_config(ws):
    return Workspace(ws).config()


def test_unchanged_rerun_does_no_model_work(ws, counting):
    run(ws)
    assert counting == {"images": 12, "loads": 1}
    res = run(ws)
    assert res.up_to_date and counting == {"images": 12, "loads": 1}
    r = cli(ws, "encode", "--split", "closed")
    assert "up to date" in r.output and "nothing to do" in r.output


def test_added_rows_encode_only_the_new_rows(ws, counting):
    run(ws)
    before = store_of(run(ws))["mean"][:]
    write_images(ws / "data", labels=("c",), n=3, seed=5)
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    counting["images"] = 0
    res = run(ws)
    assert counting["images"] == 3 and res.encoded == 3
    g = store_of(res)
    assert g["mean"].shape[0] == 15
    np.testing.assert_array_equal(g["mean"][:12], before)  # a, b rows come first and are untouched


def test_reordered_and_removed_rows_are_copied_not_reencoded(ws, counting):
    first = run(ws)
    old = store_of(first)
    by_hash = {old["source_hash"][i].tobytes(): old["mean"][i] for i in range(12)}
    m = read_manifest(ws / "manifests" / "closed.csv")
    rows = list(reversed(m.rows))[:-2]  # reverse, drop two
    write_manifest(ws / "manifests" / "closed.csv", m.root, rows)
    counting["images"] = 0
    res = run(ws)
    assert counting["images"] == 0 and res.copied == 10 and res.encoded == 0
    g = store_of(res)
    assert g["mean"].shape[0] == 10
    for i in range(10):
        np.testing.assert_array_equal(g["mean"][i], by_hash[g["source_hash"][i].tobytes()])
    assert run(ws).up_to_date


def test_changed_file_bytes_reencode_only_that_row(ws, counting):
    run(ws)
    write_images(ws / "data", labels=("a",), n=1, seed=99)  # overwrites a/000.png
    counting["images"] = 0
    res = run(ws)
    assert counting["images"] == 1 and res.encoded == 1


def encode_state(ws, cfg=None):
    return graph(Workspace(ws), cfg or ws_config(ws)).plan("encode", "closed").check()


def test_status_names_the_changed_input(ws):
    run(ws)
    assert encode_state(ws).up_to_date
    write_images(ws / "data", labels=("a",), n=1, seed=98)
    v = encode_state(ws)
    assert not v.up_to_date and v.reasons == ["manifest closed: 1 file changed"]
    r = cli(ws, "status")
    assert "STALE: manifest closed: 1 file changed" in r.output


def test_changed_encoder_or_preprocessing_encodes_every_row_into_a_new_store(ws, counting, tmp_path):
    first = run(ws)
    counting["images"] = 0
    res = run(ws, overrides=["preprocess.resize=none"])
    assert counting["images"] == 12 and res.store != first.store and Path(first.store).exists()
    other = vae_lib.save_random_vae(tmp_path / "other-vae", (8, 16), seed=3)
    counting["images"] = 0
    res2 = run(ws, overrides=[f"vae.source={other}"])
    assert counting["images"] == 12 and res2.store not in (first.store, res.store)
    assert encode_state(ws).up_to_date  # old store kept, still current
    cfg = Workspace(ws).config(None, ["preprocess.resize=none", "preprocess.size=16"])
    v = encode_state(ws, cfg)  # explained against the split's latest store (the `other` VAE's)
    assert not v.up_to_date and "preprocess.size: 32 -> 16" in v.reasons
    assert f"vae.source: {other} -> {ws_config(ws).vae.source}" in v.reasons


def test_bad_images_are_reported_and_the_rest_encoded(ws):
    (ws / "data" / "b" / "zero.png").write_bytes(b"")
    (ws / "data" / "b" / "text.png").write_text("hello")
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    r = cli(ws, "encode", "--split", "closed")
    assert r.exit_code != 0 and "2 of 14 images could not be read" in r.output
    csv_path = ws / "cache" / "latents" / "closed.failures.csv"
    failures = csv_path.read_text()
    assert "zero.png,empty file" in failures and "text.png,not an image" in failures
    # the terminal names each failure (line, path, reason), then the CSV
    lines = {int(row.split(",")[0]): row.split(",")[1] for row in failures.splitlines()[1:]}
    for n, path in lines.items():
        reason = "empty file (0 bytes)" if path.endswith("zero.png") else "not an image Pillow can read"
        assert f"line {n}: {path}: {reason}" in r.output
    assert f"each with line, path and reason in {csv_path}" in r.output
    g = zarr.open_group(str(next((ws / "cache" / "latents" / "closed").glob("*.zarr"))), mode="r")
    assert (g["source_hash"][:].any(axis=1)).sum() == 12
    r = cli(ws, "encode", "--split", "closed", "--skip-bad")
    assert r.exit_code == 0 and "2 failed" in r.output
    assert "up to date" in cli(ws, "encode", "--split", "closed", "--skip-bad").output


def test_encode_shows_the_first_five_failures_inline(ws):
    """Seven bad files: five are named in the message (sorted by manifest line), the rest in the CSV."""
    for i in range(7):
        (ws / "data" / "b" / f"bad{i}.png").write_text(f"not a picture {i}")
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    r = cli(ws, "encode", "--split", "closed")
    assert r.exit_code != 0 and "7 of 19 images could not be read" in r.output
    csv_path = ws / "cache" / "latents" / "closed.failures.csv"
    rows = [row.split(",") for row in csv_path.read_text().splitlines()[1:]]
    assert len(rows) == 7 and [int(x[0]) for x in rows] == sorted(int(x[0]) for x in rows)
    shown = [f"line {line}: {path}: not an image Pillow can read" for line, path, _ in rows]
    assert all(s in r.output for s in shown[:5]) and not any(s in r.output for s in shown[5:])
    assert f"all 7 with line, path and reason in {csv_path}" in r.output
    assert "Traceback" not in r.output


def test_verify_finds_corruption_missing_chunks_and_partials(ws):
    res = run(ws)
    assert cli(ws, "verify").exit_code == 0
    chunk = next(p for p in (Path(res.store) / "mean").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (Path(res.store) / "mean" / "c" / "0.partial").write_bytes(b"x")
    shutil.rmtree(Path(res.store) / "logvar" / "c")
    r = cli(ws, "verify")
    assert r.exit_code != 0
    assert "checksum mismatch (corrupted)" in r.output and "orphaned partial" in r.output
    assert r.output.count("output missing:") == 3


def test_second_concurrent_encode_is_refused_and_stale_lock_recovered(ws):
    res = run(ws)
    lock = Path(res.store).with_name(Path(res.store).stem + ".writer.lock")
    with exclusive(lock, "test"):
        write_images(ws / "data", labels=("a",), n=1, seed=7)
        with pytest.raises(Busy, match="in use by another leakpipe process"):
            run(ws)
    lock.write_text("pid 999999 on somewhere since long ago")  # left by a killed process
    assert run(ws).encoded == 1


def test_lock_records_rows_and_checksums(ws):
    res = run(ws)
    lock = ledger.read_lock(Path(res.store).with_name(Path(res.store).stem + ".lock.json"))
    assert lock["stage"] == "encode" and lock["inputs"]["files"]["manifest closed"]["rows"] == 12
    assert "source_hash/zarr.json" in lock["outputs"]


@pytest.fixture
def chunk_reads(monkeypatch):
    """The chunks whose rows encode reads back and checks (one read_rows call per chunk)."""
    from leakpipe.pipeline.store import latent_store

    seen, real = [], latent_store.read_rows

    def read_rows(group, idx):
        seen.append(int(idx[0]) // group["mean"].chunks[0])
        return real(group, idx)

    monkeypatch.setattr(latent_store, "read_rows", read_rows)
    return seen


def test_only_changed_chunks_are_read_back(ws, counting, chunk_reads):
    run(ws)  # 12 rows, chunks of 4
    chunk_reads.clear()
    write_images(ws / "data", labels=("c",), n=1, seed=5)  # row 12: a new chunk
    cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed")
    res = run(ws)
    assert res.encoded == 1 and res.reused == 12 and chunk_reads == []  # no stored chunk changed
    store = Path(res.store)
    flip = store / "mean" / "c" / "1" / "0" / "0" / "0"  # chunk 1 (rows 4-7): damaged
    data = bytearray(flip.read_bytes())
    data[-1] ^= 0xFF
    flip.write_bytes(bytes(data))
    write_images(ws / "data", labels=("a",), n=1, seed=99)  # row 0 (chunk 0): another image
    counting["images"] = 0
    res = run(ws)
    assert chunk_reads == [1] and res.damaged == 4 and counting["images"] == 5 and res.reused == 8
    assert run(ws).up_to_date and cli(ws, "verify").exit_code == 0


def test_a_relayout_links_the_chunks_whose_rows_stay(ws, counting, chunk_reads):
    first = run(ws)
    inode = (Path(first.store) / "mean" / "c" / "0" / "0" / "0" / "0").stat().st_ino
    m = read_manifest(ws / "manifests" / "closed.csv")
    write_manifest(ws / "manifests" / "closed.csv", m.root, m.rows[:5] + m.rows[6:])  # rows 6.. move up
    chunk_reads.clear()
    counting["images"] = 0
    res = run(ws)
    assert counting["images"] == 0 and res.copied == 7 and res.reused == 4
    assert (Path(res.store) / "mean" / "c" / "0" / "0" / "0" / "0").stat().st_ino == inode  # not rewritten
    assert sorted(chunk_reads) == [1, 2]  # the copied chunks are checked, the linked one is not
    g = store_of(res)
    want = graph(Workspace(ws), ws_config(ws)).plan("encode", "closed").data.file_hashes
    for i, _ in enumerate(m.rows[:5] + m.rows[6:]):
        assert g["source_hash"][i].tobytes().hex() == want[i]
    assert cli(ws, "verify").exit_code == 0


def test_switching_to_pixels_is_said_in_words_and_set_vae_source_is_remembered(ws, tiny_vae, tmp_path):
    """`encode --set vae.source=pixels` is saved like --vae (later commands need no flag), and the
    reasons say "VAE -> pixels (no encoder)", not how many entries of the VAE's file list changed."""
    assert cli(ws, "encode", "--split", "closed").exit_code == 0
    r = cli(ws, "encode", "--split", "closed", "--set", "vae.source=pixels")
    assert r.exit_code == 0, r.output
    toml = ws / "leakpipe.toml"
    assert f"vae.source = pixels saved in {toml} by --set vae.source (was {tiny_vae})" in r.output
    assert f"--vae {tiny_vae}` switches back" in r.output
    assert 'source = "pixels"' in toml.read_text() and "VAE pixels" in r.output
    assert "VAE -> pixels (no encoder)" in r.output and "vae files" not in r.output
    st = cli(ws, "status")  # no flag: the workspace's encoder is now pixels
    assert re.search(r"encode closed +up to date", st.output) and "VAE pixels" in st.output, st.output
    other = vae_lib.save_random_vae(tmp_path / "other-vae", (8, 16), seed=3)
    back = cli(ws, "status", "--set", f"vae.source={other}")  # explained against the pixels store
    assert "pixels (no encoder) -> VAE" in back.output and "vae files" not in back.output, back.output
    assert 'source = "pixels"' in toml.read_text()  # status never saves a setting


def test_a_relative_set_vae_source_is_relative_to_the_workspace(ws, tiny_vae, tmp_path, monkeypatch):
    shutil.copytree(tiny_vae, ws / "models" / "vae")
    monkeypatch.chdir(tmp_path)  # not the workspace: the path is read as the config reads it
    r = cli(ws, "encode", "--split", "closed", "--set", "vae.source=models/vae")
    assert r.exit_code == 0, r.output
    assert 'source = "./models/vae"' in (ws / "leakpipe.toml").read_text() and "VAE ./models/vae" in r.output
