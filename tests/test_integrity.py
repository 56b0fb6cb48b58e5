"""Integrity: damaged data is detected, recomputed and never used or vouched for; bad inputs are
clear errors naming the file, the row and what to do; readers and writers of a store exclude each
other. Each case is one the issue found by hand."""

import errno
import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from leakpipe.pipeline.config import ConfigError
from leakpipe.pipeline.config_files import load_config
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.store.locking import shared
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from tests.conftest import cli, synth_workspace
from tests.helpers import TINY as FAST

SETS = [a for s in FAST for a in ("--set", s)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """3 generators x 16 images + 2 unseen, encoded, trained and scored once; tests use copies."""
    root = synth_workspace(tmp_path_factory.mktemp("integrity"))
    for args in (["encode", "--split", "closed", "--split", "open"], ["train", *SETS], ["score", *SETS]):
        r = cli(root, *args)
        assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def ws(base, tmp_path):
    shutil.copytree(base, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def store_of(ws, split="closed") -> Path:
    return Path(graph(Workspace(ws), Workspace(ws).config()).plan("encode", split).data.store)


def chunk(store: Path, array="mean", index=1) -> Path:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[index]


def flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def arrays(store: Path) -> dict:
    g = zarr.open_group(str(store), mode="r")
    return {k: g[k][:] for k in ("mean", "logvar", "source_hash")}


def ok(ws, *args):
    r = cli(ws, *args)
    assert r.exit_code == 0, f"leakpipe {' '.join(args)}:\n{r.output}"
    return r.output


# ---------------------------------------------------------------- damaged latents
@pytest.mark.parametrize("damage", ["deleted", "flipped", "flipped+row added"])
def test_damaged_latent_chunk_is_reencoded_never_vouched(ws, damage):
    store = store_of(ws)
    want = arrays(store)
    target = chunk(store)
    if damage == "deleted":
        target.unlink()
    else:
        flip(target)
    if damage.endswith("row added"):
        rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
        src = rows[3].split(",")[0]
        shutil.copy(ws / "data" / "closed" / src, ws / "data" / "closed" / "closed00" / "extra.png")
        (ws / "manifests" / "closed.csv").write_text(
            "\n".join(rows + [rows[3].replace(src, "closed00/extra.png", 1)]) + "\n"
        )
    if damage == "deleted":  # the cheap check (sizes) already sees a missing chunk
        assert "output missing" in cli(ws, "status").output
    out = ok(ws, "encode", "--split", "closed")
    if damage == "flipped":  # same size: the cheap check passes; the first reader finds it
        assert "up to date" in out
        r = cli(ws, "train", *[a for s in (*FAST, "model.embed_dim=4") for a in ("--set", s)])
        assert r.exit_code != 0 and "latents of closed are damaged" in r.output
        out = ok(ws, "encode", "--split", "closed")
    assert "8 rows damaged and re-encoded" in out, out  # the chunk's 8 rows, no other
    got = arrays(store)
    for k in ("mean", "logvar"):
        np.testing.assert_array_equal(got[k][:48], want[k][:48])
    ok(ws, "verify")


def test_train_refuses_a_damaged_latent_chunk_and_encode_repairs_it(ws):
    store = store_of(ws)
    flip(chunk(store))
    assert "up to date" in ok(ws, "encode", "--split", "closed")  # same size: only hashing can tell
    r = cli(ws, "train", *[a for s in (*FAST, "model.embed_dim=4") for a in ("--set", s)])
    assert r.exit_code != 0 and "damaged" in r.output and "leakpipe encode --split closed" in r.output
    assert "STALE" in cli(ws, "status").output  # the damaged chunk was set aside
    assert "8 rows" in ok(ws, "encode", "--split", "closed")
    ok(ws, "train", *[a for s in (*FAST, "model.embed_dim=4") for a in ("--set", s)])


# ---------------------------------------------------------------- damaged results
def test_damaged_model_is_retrained_not_used(ws):
    result = runs.pointed(Workspace(ws), "default")
    want = (result / "model.safetensors").read_bytes()
    flip(result / "model.safetensors", at=len(want) // 2)
    r = cli(ws, "score", *SETS)
    assert r.exit_code != 0 and "model.safetensors" in r.output and "damaged" in r.output
    out = ok(ws, "train", *SETS)
    assert "checksum mismatch" in out
    from safetensors.torch import load

    a, b = load(want), load((result / "model.safetensors").read_bytes())
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # retrained to the same weights
    ok(ws, "score", *SETS)


@pytest.mark.parametrize(
    "name", ["metrics.json", "report.md", "open_scores.safetensors", "calibration.safetensors", "embeddings"]
)
def test_damaged_outputs_are_recomputed(ws, name):
    result = runs.pointed(Workspace(ws), "default")
    want = json.loads((result / "metrics.json").read_text())
    if name == "embeddings":
        target = sorted(p for p in (result / "embeddings" / "closed.zarr" / "h_bar").rglob("*") if p.is_file())[-1]
    else:
        target = result / name
    flip(target, at=len(target.read_bytes()) // 2)
    out = ok(ws, "score", *SETS)
    assert "checksum mismatch" in out, out
    assert json.loads((result / "metrics.json").read_text()) == want
    ok(ws, "verify")


def test_damaged_lock_and_hash_cache_are_recomputed(ws):
    lock = next((ws / "cache" / "latents" / "closed").glob("*.lock.json"))
    lock.write_text(lock.read_text()[:-40])  # torn by hand
    (ws / "cache" / "file-hashes.sqlite").write_text("[]")
    out = ok(ws, "encode", "--split", "closed")
    assert "0 encoded" in out and "48 already valid" in out  # rows checked, not trusted blindly
    assert "file-hash cache" in out and "damaged" in out and "rebuilt" in out
    for wal in ws.glob("cache/file-hashes.sqlite-*"):  # a damaged copy of the database alone
        wal.unlink()
    (ws / "cache" / "file-hashes.sqlite").write_text("\ufeff{")
    assert "rebuilt" in ok(ws, "status")


# ---------------------------------------------------------------- readers and writers
def test_encode_waits_for_readers_of_the_store(ws):
    lat = graph(Workspace(ws), Workspace(ws).config()).plan("encode", "closed").data
    with shared(lat.writer_lock, "test reader"):
        rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
        (ws / "manifests" / "closed.csv").write_text("\n".join(rows[:3] + rows[4:]) + "\n")  # a relayout
        r = cli(ws, "encode", "--split", "closed")
        assert r.exit_code != 0 and "in use" in r.output
    ok(ws, "encode", "--split", "closed")


# ---------------------------------------------------------------- bad inputs
def test_bad_images_and_unreadable_files_are_rows_not_aborts(ws, monkeypatch):
    data = ws / "data" / "closed" / "closed00"
    big = data / "big.png"
    Image.new("L", (9500, 9500)).save(big)  # between 1x and 2x Pillow's limit
    locked = data / "locked.png"
    shutil.copy(next(data.glob("*.png")), locked)
    real_open = open

    def denied(file, *args, **kwargs):  # tests run as root, who can read a chmod 0 file: inject it
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    real_os_open = os.open

    def denied_fd(file, *args, **kwargs):  # the hash cache reads through file descriptors
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    monkeypatch.setattr(os, "open", denied_fd)
    rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
    first = rows[3]
    src = first.split(",")[0]
    extra = [first.replace(src, "closed00/big.png", 1), first.replace(src, "closed00/locked.png", 1)]
    (ws / "manifests" / "closed.csv").write_text("\n".join(rows + extra) + "\n")
    try:
        st = cli(ws, "status")
        assert st.exit_code == 0 and "STALE" in st.output
        r = cli(ws, "encode", "--split", "closed")
        assert r.exit_code != 0 and "2 of 50 images could not be read" in r.output
        failures = (ws / "cache" / "latents" / "closed.failures.csv").read_text()
        assert "big.png" in failures and "decompression bomb" in failures and "locked.png" in failures
        assert "permission" in failures.lower()
        out = ok(ws, "encode", "--split", "closed", "--skip-bad")
        assert "48 already valid" in out and "2 failed" in out
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("name", ["a\rb.png", "a\u2028b.png"])
def test_file_names_with_line_breaks_are_rows(tmp_path, tiny_vae, name):
    from tests.conftest import TOML, write_images

    write_images(tmp_path / "data")
    shutil.copy(tmp_path / "data" / "a" / "000.png", tmp_path / "data" / "a" / name)
    (tmp_path / "leakpipe.toml").write_text(TOML.format(vae=tiny_vae))
    out = ok(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert "13 rows" in out
    assert "13 rows" in ok(tmp_path, "encode", "--split", "closed")


def test_path_aliases_are_one_row(ws):
    rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
    first = rows[3]
    src = first.split(",")[0]
    label, name = src.split("/")
    aliases = [f"./{src}", f"{label}//{name}", f"closed01/../{src}"]
    (ws / "manifests" / "closed.csv").write_text("\n".join(rows + [first.replace(src, a, 1) for a in aliases]) + "\n")
    r = cli(ws, "encode", "--split", "closed")
    assert r.exit_code != 0 and r.output.count("duplicate path") == 3 and f"{src!r}" in r.output


def test_manifest_root_and_split_names_cannot_escape(ws):
    m = ws / "manifests" / "closed.csv"
    m.write_text(m.read_text().replace("# root: ../data/closed", "# root: /"))
    r = cli(ws, "encode", "--split", "closed")
    assert r.exit_code != 0 and "root" in r.output and "filesystem root" in r.output
    r = cli(ws, "manifest", "build", str(ws / "data" / "closed"), "--split", "../../x")
    assert r.exit_code != 0 and "split name" in r.output and not (ws.parent / "x.csv").exists()


def test_split_json_is_matched_by_relative_path(tmp_path):
    root = tmp_path / "tree"
    for label in ("a", "b"):
        for sub in ("x", "y"):
            (root / label / sub).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / label / sub / f"{i}.png")
    split = {
        "train": {"a": ["x/0.png", "y/0.png"], "b": ["x/0.png", "y/0.png"]},
        "test": {"a": ["x/1.png", "y/1.png"], "b": ["x/1.png", "y/1.png"]},
    }
    (root / "Split.json").write_text(json.dumps(split))
    ok(tmp_path, "manifest", "build", str(root), "--split", "s")
    text = (tmp_path / "manifests" / "s.csv").read_text()
    assert "a/x/0.png,a,train" in text and "a/y/1.png,a,test" in text
    split["val"] = {"a": ["0.png", "../b/x/0.png", "nope.png"]}
    (root / "Split.json").write_text(json.dumps(split))
    r = cli(tmp_path, "manifest", "build", str(root), "--split", "s2")
    assert r.exit_code != 0
    assert "ambiguous" in r.output and "escapes" in r.output and "not in the tree" in r.output
    assert not (tmp_path / "manifests" / "s2.csv").exists()


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("train.epochs", "-1", ">= 1"),
        ("train.lr", "nan", "finite"),
        ("store.chunk_rows", "0", ">= 1"),
        ("train.batch_size", "0", ">= 1"),
        ("encode.batch_size", "-3", ">= 1"),
        ("preprocess.size", "0", ">= 8"),
        ("diffusion.timesteps", "0,5,1000", "0 to 999"),
        ("compute.eval_batch_size", "0", ">= 1"),
        ("train.seed", "-1", "0 to 2"),
        ("score.seed", "-5", "0 to 2"),
        ("compute.device", "bogus", "cuda:N"),
        ("encode.device", "gpu0", "cuda:N"),
    ],
)
def test_config_values_are_checked_on_load(key, value, says):
    with pytest.raises(ConfigError, match=says) as err:
        load_config(None, [f"{key}={value}"])
    assert key in str(err.value)


def test_full_disk_is_a_clear_error_and_a_rerun_completes(ws, monkeypatch):
    from leakpipe.pipeline.store import atomic

    calls = {"n": 0}
    original = atomic._fsync_tree

    def full(path):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "_fsync_tree", full)
    r = cli(ws, "train", *[a for s in (*FAST, "model.embed_dim=4") for a in ("--set", s)])
    assert r.exit_code != 0 and "No space left" in r.output and "Free some space" in r.output
    assert "Traceback" not in r.output and calls["n"] >= 1
    monkeypatch.setattr(atomic, "_fsync_tree", original)
    ok(ws, "train", *[a for s in (*FAST, "model.embed_dim=4") for a in ("--set", s)])
    ok(ws, "verify")


def test_single_class_validation_is_an_error_before_training(ws):
    m = ws / "manifests" / "closed.csv"
    lines = m.read_text().splitlines()
    lines = [
        ln if not (",val," in ln and not ln.split(",")[1].endswith("00")) else ln.replace(",val,", ",test,")
        for ln in lines
    ]
    m.write_text("\n".join(lines) + "\n")
    assert "labels and partitions of closed: 6 rows changed" in cli(ws, "status").output
    ok(ws, "encode", "--split", "closed")
    r = cli(ws, "train", *SETS)
    assert r.exit_code != 0 and "val partition has rows of only 1 class" in r.output


@pytest.fixture
def small_disk(tmp_path):
    """A 120 MiB tmpfs (a real full disk), or a skip where this machine cannot mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected ENOSPC test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk_then_more_space(base, small_disk):
    ws = small_disk / "ws"
    shutil.copytree(base, ws, symlinks=True)
    more = [a for s in (*FAST, "model.embed_dim=4", "train.epochs=2") for a in ("--set", s)]
    r = cli(ws, "train", *more)  # epoch 1's checkpoint (weights, Adam state, best weights) does not fit
    assert r.exit_code != 0 and "No space left" in r.output and "Traceback" not in r.output, r.output
    assert not list(ws.rglob("*.tmp")) and not list(ws.rglob("*.partial"))  # no half-written file left
    subprocess.run(["mount", "-o", "remount,size=600m", str(small_disk)], check=True)
    ok(ws, "train", *more)
    ok(ws, "verify")


def test_damaged_checkpoint_is_detected_not_resumed(tmp_path):
    import torch

    from leakpipe.pipeline.store.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    best = {k: v.clone() for k, v in model.state_dict().items()}
    average = {"weight": torch.randn(3, 4), "updates": torch.tensor(7)}
    save_checkpoint(tmp_path, model, opt, best, {"fingerprint": "fp", "epoch": 3}, {"ema": average})
    state, got, extra = load_checkpoint(tmp_path, torch.nn.Linear(4, 3), torch.optim.AdamW(model.parameters()), "fp")
    assert state["epoch"] == 3 and all(torch.equal(got[k], best[k]) for k in best)
    assert extra.keys() == {"ema"} and all(torch.equal(extra["ema"][k], v) for k, v in average.items())
    path = tmp_path / "checkpoint.safetensors"
    for at in (len(path.read_bytes()) - 3, 20):  # a weight byte, then a header byte
        saved = path.read_bytes()
        flip(path, at=at)
        with pytest.raises(DamagedCheckpoint):
            load_checkpoint(tmp_path, torch.nn.Linear(4, 3), torch.optim.AdamW(model.parameters()), "fp")
        path.write_bytes(saved)


def test_train_restarts_a_result_whose_checkpoint_is_damaged(ws):
    more = [*FAST, "model.embed_dim=4"]
    plan = graph(Workspace(ws), Workspace(ws).config(None, more)).plan("train", "default")
    (plan.data.result / "checkpoint").mkdir(parents=True)
    (plan.data.result / "checkpoint" / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    out = ok(ws, "train", *[a for s in more for a in ("--set", s)])
    assert "checkpoint" in out and "damaged" in out and "training this result from the start" in out


def test_split_json_in_every_form_the_authors_read(tmp_path):
    """Index lists (into each class's files sorted by lower-cased name), the key aliases training,
    validation and testing in any case, and other keys ignored with a note, as their reader does."""
    root = tmp_path / "tree"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for name in ("C.png", "a.png", "B.png", "d.png"):
            Image.new("RGB", (8, 8)).save(root / label / name)
    (root / "Split.json").write_text(
        json.dumps({"Training": [0, 1], "VALIDATION": [2], "testing": [3], "open": {"x": ["y.png"]}})
    )
    r = cli(tmp_path, "manifest", "build", str(root), "--split", "s")
    assert r.exit_code == 0 and "key 'open' is not a partition" in r.output, r.output
    text = (tmp_path / "manifests" / "s.csv").read_text()
    for label in ("a", "b"):  # sorted by lower-cased name: a, B, C, d
        for name, part in (("a.png", "train"), ("B.png", "train"), ("C.png", "val"), ("d.png", "test")):
            assert f"{label}/{name},{label},{part}" in text
    (root / "Split.json").write_text(json.dumps({"train": [0, 7]}))
    r = cli(tmp_path, "manifest", "build", str(root), "--split", "s3")
    assert r.exit_code != 0 and "index out of range (the class has 4 files)" in r.output


# ---------------------------------------------------------------- settings that name their key (issue 24)
def test_seeds_exclude_and_split_errors_name_what_to_change(ws):
    before = sorted((ws / "cache" / "results").iterdir())
    r = cli(ws, "train", "--seeds", "-1,2", *SETS)
    assert r.exit_code != 0 and "-1: a seed is an integer from 0 to 2**32 - 1" in r.output
    r = cli(ws, "train", "--seeds", "", *SETS)
    assert r.exit_code != 0 and "at least two distinct seeds" in r.output
    r = cli(ws, "train", "--set", "train.seed=-2", *SETS)
    assert r.exit_code != 0 and "train.seed = -2" in r.output
    assert sorted((ws / "cache" / "results").iterdir()) == before  # nothing trained, no partial result
    for exclude, left in (
        ('["closed00","closed01","closed02"]', "0 of the 3"),
        ('["closed00","closed01"]', "1 of the 3"),
    ):
        r = cli(ws, "train", "--run", "ex", "--set", f"train.exclude={exclude}", *SETS)
        assert r.exit_code != 0 and "train.exclude = " in r.output and f"leaves {left} generators" in r.output
    r = cli(ws, "train", "--set", "train.split=nosuch", *SETS)
    assert r.exit_code != 0 and "train.split = nosuch: there is no manifest" in r.output
    assert "manifests here: closed, open" in r.output and "manifest build ROOT --split nosuch" in r.output
    lines = (ws / "manifests" / "closed.csv").read_text().replace("closed00/0000", "closed00/9999")
    (ws / "manifests" / "broken.csv").write_text(lines)
    r = cli(ws, "train", "--set", "train.split=broken", *SETS)
    assert r.exit_code != 0 and "10 problem(s): line 4: file not found" in r.output and "(7 more)" in r.output


def test_model_init_on_a_run_name_trained_before_then_status_score_and_retrain(ws):
    import torch
    from safetensors.torch import save_file

    from leakpipe.pipeline.nn.backbones import ResNet

    torch.manual_seed(0)
    save_file(
        {k: v.contiguous() for k, v in ResNet("resnet18", 3, num_classes=1000).state_dict().items()},
        ws / "rn18.safetensors",
    )
    init = [*SETS, "--set", "model.init=rn18.safetensors"]
    assert "training because" in ok(ws, "train", *init)  # `default` was trained before, without init
    lock = json.loads((runs.pointed(Workspace(ws), "default") / "train.lock.json").read_text())
    assert lock["inputs"]["files"]["model.init file"] == [
        ["rn18.safetensors", lock["inputs"]["files"]["model.init file"][0][1]]
    ]
    assert "train  default         up to date" in ok(ws, "status", *init)
    ok(ws, "score", *init)
    assert "up to date, nothing to do" in ok(ws, "train", *init)
    said = ok(ws, "status", *SETS)  # the workspace without init: the name's result differs in it
    assert "model.init: rn18.safetensors -> ;" in said and "model.init file: 1 row removed" in said
    flip(ws / "rn18.safetensors", at=-5)
    assert "model.init file: 1 file changed" in ok(ws, "status", *init)


# ---------------------------------------------------------------- nothing read unchecked (issue 24)
def a_test_image(ws) -> str:
    from leakpipe.pipeline.manifest import read_manifest

    m = read_manifest(ws / "manifests" / "closed.csv")
    return str(m.abspath(m.column("partition").index("test")))


def test_a_hand_edited_metrics_json_is_refused_by_attribute_export_and_compare(ws, tmp_path):
    out = runs.pointed(Workspace(ws), "default")
    m = json.loads((out / "metrics.json").read_text())
    m["unseen_threshold"]["log_density_threshold"] = -1000.0
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    for args in (["attribute", a_test_image(ws)], ["export", str(tmp_path / "e")]):
        r = cli(ws, *args, *SETS)
        assert r.exit_code != 0 and "metrics.json" in r.output and "leakpipe score --run default" in r.output, r.output
    assert not (tmp_path / "e").exists()
    r = cli(ws, "compare", "default", *SETS)
    assert r.exit_code != 0 and "does not match its checksum in score.lock.json" in r.output
    assert "edited by hand" in r.output


def test_attribute_and_export_refuse_a_run_whose_manifest_changed(ws, tmp_path):
    """Issue 24: after `manifest build --seed 1` export rebuilt the reference embeddings from the new
    partitions and kept the old threshold; the same image scored -7.86 with one export, 15.95 with the other."""
    ok(ws, "manifest", "build", str(ws / "data" / "closed"), "--split", "closed", "--seed", "1")
    for args in (["attribute", a_test_image(ws)], ["export", str(tmp_path / "e")]):
        r = cli(ws, *args, *SETS)
        assert r.exit_code != 0 and "run 'default' is stale" in r.output, r.output
        assert "labels and partitions of closed:" in r.output and "leakpipe score --run default" in r.output
    assert not (tmp_path / "e").exists()


def test_export_is_atomic_and_its_errors_say_what_to_do(ws, tmp_path):
    from tests.conftest import kill_midway

    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    for dest, says in (
        (tmp_path / "afile" / "sub", "afile is a file, not a folder"),
        (tmp_path / "dangling", "is a symbolic link to"),
    ):
        r = cli(ws, "export", str(dest), *SETS)
        assert r.exit_code != 0 and says in r.output, r.output
    r = cli(ws, "export", str(tmp_path / "x"), "--run", "nosuch", *SETS)
    assert r.exit_code != 0 and "there is no run 'nosuch'" in r.output and "runs here: default" in r.output
    dest = tmp_path / "att"
    body = (
        f"from leakpipe.pipeline.cli import main; main(['export', {str(dest)!r}, '-C', {str(ws)!r}, "
        f"*{[a for a in SETS]!r}])"
    )
    partial = lambda: [p for p in tmp_path.glob(".att.export-*.tmp") if (p / "attributor.json").exists()]  # noqa: E731
    kill_midway("leakpipe.workflows.export._write", 30, body, lambda: bool(partial()))
    assert not dest.exists() and partial()  # killed after writing, before the rename: no export under its name
    r = cli(ws, "export", str(dest), *SETS)
    assert r.exit_code == 0 and "a partial export left by a killed export" in r.output, r.output
    assert not partial() and (dest / "attributor.json").exists()
    r = cli(ws, "export", str(dest), *SETS)
    assert r.exit_code != 0 and "not empty (it holds an attributor exported before)" in r.output


def test_run_names_that_are_no_link_to_a_result_are_named(ws, tmp_path):
    import os

    w = Workspace(ws)
    result, link = runs.pointed(w, "default"), ws / "cache" / "runs" / "default"
    link.unlink()  # a real copy of the result stands in for the link, and its model is damaged
    shutil.copytree(result, link)
    flip(link / "model.safetensors")
    r = cli(ws, "verify")
    assert r.exit_code != 0 and "cache/runs/default is a folder, not a link" in r.output
    assert f"ln -s ../results/{result.name} cache/runs/default" in r.output
    assert f"checksum mismatch (corrupted): {link / 'model.safetensors'}" in r.output
    assert "default/ (a folder)" in ok(ws, "runs", *SETS)
    assert "is a folder, not a link" in ok(ws, "status", *SETS)
    assert "nothing to remove" in ok(ws, "gc") and result.exists()  # the result it copies is kept
    shutil.rmtree(link)  # the link back, then the result deleted
    os.symlink(os.path.relpath(result, link.parent), link)
    shutil.rmtree(result)
    dangling = f"cache/runs/default points at cache/results/{result.name}, which does not exist"
    r = cli(ws, "verify")
    assert r.exit_code != 0 and dangling in r.output and "rm cache/runs/default" in r.output
    for command in ("status", "runs"):
        assert dangling in ok(ws, command, *SETS)
    for args in (["attribute", a_test_image(ws)], ["export", str(tmp_path / "e")], ["compare", "default"]):
        r = cli(ws, *args, *SETS)
        assert r.exit_code != 0 and dangling in r.output, r.output


def test_compare_refuses_runs_scored_on_other_test_images_or_trained_on_them(ws):
    """Issue 24: run B, trained on a manifest whose partitions differ, was paired with `default` on
    closed's test set, where most of the test images were B's training images, with no note."""
    ok(ws, "manifest", "build", str(ws / "data" / "closed"), "--split", "closed2", "--seed", "1")
    ok(ws, "encode", "--split", "closed2")
    ok(ws, "train", "--run", "B", "--set", "train.split=closed2", *SETS)
    ok(ws, "score", "--run", "B", *SETS)
    r = cli(ws, "compare", "default", "B", *SETS)
    assert r.exit_code != 0 and re.search(
        r"B was trained on \d+ of the 15 test images of closed \(train.split "
        r"closed2 has them in its train or val partition\)",
        r.output,
    ), r.output
    ok(ws, "score", "--run", "B", "--set", "score.closed=closed2", *SETS)
    r = cli(ws, "compare", "default", "B", *SETS)
    assert r.exit_code != 0 and re.search(
        r"not scored on the same test images: B on closed2 \(15 test images, "
        r"\d+ of them among default's 15\)",
        r.output,
    ), r.output
    r = cli(ws, "compare", "default", "nosuch", *SETS)
    assert r.exit_code != 0 and "there is no run 'nosuch'" in r.output
    assert "| default |" in ok(ws, "compare", "default", *SETS)


def _unprivileged():
    import os

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run leakpipe as an unprivileged user (uid 65534)")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_read_only_queries_work_on_a_read_only_cache(base):
    """As a user who cannot write the workspace: status, runs, verify, attribute, compare, export and
    score of an up-to-date run work (the file-hash cache is opened read-only, with a note); writing
    commands say that they cannot write, with no traceback. The files keep the modes they were made with
    (issue 34: safetensors and diffusers made theirs 0600, so this user could read none of them)."""
    import os
    import sys
    import tempfile

    from leakpipe.pipeline.store.atomic import umask

    as_nobody = _unprivileged()
    if umask() != 0o022:
        pytest.skip("the workspace's files must have been made under umask 022 for another user to read them")
    top = Path(tempfile.mkdtemp(prefix="leakpipe-ro-"))
    try:
        ws = top / "ws"
        shutil.copytree(base, ws, symlinks=True)
        (top / "home").mkdir()
        owners = top / "owners"  # the owner exports from a copy of their own (this one's hash cache stays closed)
        shutil.copytree(base, owners, symlinks=True)
        assert cli(owners, "export", str(top / "att-by-owner"), *SETS).exit_code == 0
        subprocess.run(["chmod", "755", str(top), str(ws), str(owners)], check=True)  # pytest's folders are 0700
        subprocess.run(["chmod", "777", str(top / "home")], check=True)
        subprocess.run(["chmod", "-R", "a-w", str(ws / "cache"), str(ws / "manifests")], check=True)
        env = {**os.environ, "HOME": str(top / "home"), "MPLCONFIGDIR": str(top / "home")}

        def leakpipe(*args):
            return subprocess.run(
                [
                    *as_nobody,
                    sys.executable,
                    "-c",
                    "from leakpipe.pipeline.cli import main; main()",
                    *args,
                    "-C",
                    str(ws),
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=top / "home",
            )

        for args in (
            ["status"],
            ["runs"],
            ["verify"],
            ["score"],
            ["encode", "--split", "closed"],
            ["attribute", a_test_image(ws)],
            ["export", str(top / "home" / "att")],
            ["attribute", "--model", str(top / "att-by-owner"), a_test_image(ws)],
            ["compare", "default"],
        ):
            r = leakpipe(*args, *(SETS if args[0] != "verify" else []))
            assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
        assert "file-hash cache" in r.stderr and "not writable by this user" in r.stderr
        r = leakpipe("train", "--set", "train.seed=7", *SETS)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "cannot be written by this user" in r.stderr
        r = leakpipe("manifest", "build", str(ws / "data" / "closed"), "--split", "other")
        assert r.returncode != 0 and "Traceback" not in r.stderr and "this user cannot write there" in r.stderr
        r = leakpipe("score", *SETS, "--set", "score.kde_folds=3")  # stale: it would write
        assert r.returncode != 0 and "score default is not up to date (score.kde_folds: 2 -> 3)" in r.stderr, r.stderr
        assert "cannot be written by this user" in r.stderr and "Traceback" not in r.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(top)], check=True)
        shutil.rmtree(top)


# ---------------------------------------------------------------- issue 34: nothing lost, nobody locked out
def flip_in_place(path: Path, at: int = -1) -> None:
    """Bit rot: one byte flipped with the file's size and mtime kept (its stat is unchanged)."""
    import os

    st = path.stat()
    flip(path, at)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_rot_is_recorded_by_verify_shown_by_status_and_repaired_by_encode(ws):
    """Issue 34: `verify` found a flipped byte and told the user to rerun the stage, but `encode` said
    "up to date, nothing to do" (the chunk's stat was unchanged), and so did `status`."""
    store = store_of(ws)
    want = arrays(store)
    flip_in_place(chunk(store))
    assert "up to date" in ok(ws, "encode", "--split", "closed")  # a no-op encode reads no chunk: stat only
    r = cli(ws, "verify")
    assert r.exit_code != 0 and "1 problem(s), 8 rows damaged" in r.output, r.output
    assert "To repair them: `leakpipe encode --split closed` (re-encodes the 8 damaged rows" in r.output
    assert "not read: the input images" in r.output and "verify --contents" in r.output
    status = ok(ws, "status")
    assert "encode closed" in status and "STALE: 8 rows damaged" in status, status
    assert "8 rows damaged and re-encoded" in ok(ws, "encode", "--split", "closed")
    got = arrays(store)
    for k in ("mean", "logvar"):
        np.testing.assert_array_equal(got[k], want[k])
    assert "all checksums match" in ok(ws, "verify")
    flip_in_place(chunk(store, "logvar", 3))  # encode --verify: the same check, then the repair, in one command
    out = ok(ws, "encode", "--split", "closed", "--verify")
    assert "8 rows damaged and re-encoded" in out and "up to date" not in out, out
    np.testing.assert_array_equal(arrays(store)["logvar"], want["logvar"])
    assert "all checksums match" in ok(ws, "verify")


def test_verify_contents_finds_an_image_changed_in_place_with_its_stat_kept(ws):
    import os

    image = Path(a_test_image(ws))
    hour_ago = image.stat().st_mtime_ns - 3600 * 10**9  # older than the cache's racy window (2 s)
    os.utime(image, ns=(hour_ago, hour_ago))
    assert "up to date" in ok(ws, "encode", "--split", "closed")  # same bytes: the cache takes the new stat
    flip_in_place(image)  # the IEND chunk's CRC: the file changes, its size, mtime and pixels do not
    assert "up to date" in ok(ws, "encode", "--split", "closed")  # the stat test cannot see it
    assert cli(ws, "verify").exit_code == 0
    r = cli(ws, "verify", "--contents")
    assert r.exit_code != 0 and f"changed in place (size and mtime kept): {image}" in r.output, r.output
    assert "`leakpipe encode --split closed`" in r.output
    assert "manifest closed: 1 file changed" in ok(ws, "status")  # its new hash is in the cache now
    assert "1 encoded" in ok(ws, "encode", "--split", "closed")


KILL_AT_CHECKPOINT = """
import os, signal, sys
import torch
torch.set_num_threads(int(sys.argv.pop(1)))  # the test process's: bitwise needs the same split of the work
target, seen, real = int(sys.argv[1]), [0], os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("checkpoint.safetensors"):
        seen[0] += 1
        if seen[0] == target:  # epoch `target` trained, its checkpoint not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from leakpipe.pipeline.cli import main
main(sys.argv[2:])
"""


def test_a_training_killed_in_epoch_4_of_5_is_kept_by_gc_and_resumes_bitwise(ws, tmp_path):
    """Issue 34: every kill probe of train had landed in epoch 1, and `gc` deleted an interrupted
    training that `status` said would resume (`runs`: "(none: gc frees it)")."""
    import sys

    sets = [a for s in (*FAST, "train.epochs=5", "model.embed_dim=4") for a in ("--set", s)]
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref, symlinks=True)
    ok(ref, "train", *sets)  # uninterrupted
    import torch

    threads = str(torch.get_num_threads())
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CHECKPOINT, threads, "4", "train", *sets, "-C", str(ws)])
    assert killed.returncode == -9
    result = runs.results(Workspace(ws))
    stopped = next(r for r in result if runs.interrupted(r))
    assert runs.interrupted(stopped)["epoch"] == 3
    status = ok(ws, "status", *sets)
    assert "an interrupted training of this config resumes from" in status and stopped.name in status
    listed = ok(ws, "runs", *sets)
    assert "(interrupted, kept by gc)" in listed, listed
    assert "interrupted after epoch 3 of 5, resumes on `leakpipe train`" in listed
    kept = ok(ws, "gc", "--dry-run", *sets)
    assert f"keeping cache/results/{stopped.name}" in kept, kept
    assert not [line for line in kept.splitlines() if "would remove" in line and stopped.name in line], kept
    dropped = ok(ws, "gc", "--dry-run", "--drop", stopped.name, *sets)
    assert [line for line in dropped.splitlines() if "would remove" in line and stopped.name in line], dropped
    assert "interrupted after epoch 3 (another config" not in listed
    ok(ws, "gc", *sets)
    assert stopped.is_dir()
    assert "(resumed after epoch 3)" in ok(ws, "train", *sets)
    want = runs.pointed(Workspace(ref), "default")
    for name in ("model.safetensors", "history.json"):
        assert (stopped / name).read_bytes() == (want / name).read_bytes(), name


def test_an_export_of_a_run_with_too_few_validation_images_attributes(ws, tmp_path, monkeypatch):
    """Issue 34: with fewer validation images than the level needs, `score` rightly wrote thresholds of
    +inf, and `attribute --model` refused its export. Its app.py, README.md and requirements.txt are
    checksummed now, and attributing from another folder writes nothing there."""
    sets = [*SETS, "--set", "score.alpha=0.01"]  # 99 validation images needed; this split has a few
    ok(ws, "score", *sets)
    m = json.loads((runs.pointed(Workspace(ws), "default") / "metrics.json").read_text())
    assert m["conformal"]["thresholds"] == [float("inf")] * 3
    assert m["unseen_threshold"]["log_density_threshold"] == -float("inf")
    pin = "leakpipe[app] @ git+https://example.org/leakpipe@abc123"  # given to export, not edited in after
    ok(ws, "export", str(tmp_path / "att"), "--requirement", pin, *sets)
    assert (tmp_path / "att" / "requirements.txt").read_text().endswith(pin + "\n")
    record = json.loads((tmp_path / "att" / "attributor.json").read_text())
    assert {"app.py", "README.md", "requirements.txt"} <= set(record["files"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from click.testing import CliRunner

    from leakpipe.pipeline.cli import main

    r = CliRunner().invoke(main, ["attribute", "--model", str(tmp_path / "att"), a_test_image(ws), "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)[0]["prediction_set"]) == record["classes"]
    assert list(elsewhere.iterdir()) == []  # no ./cache/file-hashes.sqlite where the query ran
    with open(tmp_path / "att" / "app.py", "a") as fh:
        fh.write("import os  # an edit\n")
    r = CliRunner().invoke(main, ["attribute", "--model", str(tmp_path / "att"), a_test_image(ws)])
    assert r.exit_code != 0 and "app.py missing or damaged" in r.output, r.output


def test_status_export_and_attribute_agree_on_a_same_size_edit_of_metrics(ws, tmp_path):
    """Issue 34: `status` said score was up to date after a same-size edit of metrics.json (mtime kept)
    while export and attribute --run refused the run."""
    path = runs.pointed(Workspace(ws), "default") / "metrics.json"
    text = path.read_text()
    i = text.index('"top1": 0.') + len('"top1": 0.')
    flip_in_place(path, len(text[:i].encode()))  # one digit of top-1, the same length
    status = ok(ws, "status", *SETS)
    assert "score  default" in status and "STALE: checksum mismatch (corrupted)" in status, status
    for args in (["attribute", a_test_image(ws)], ["export", str(tmp_path / "e")]):
        r = cli(ws, *args, *SETS)
        assert r.exit_code != 0 and "metrics.json" in r.output, r.output


def test_a_folder_in_a_manifest_and_an_empty_split_are_said_as_such(ws):
    (ws / "data" / "closed" / "closed00" / "folder.png").mkdir()
    rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
    src = rows[3].split(",")[0]
    (ws / "manifests" / "closed.csv").write_text("\n".join([*rows, rows[3].replace(src, "closed00/folder.png", 1)]))
    r = cli(ws, "encode", "--split", "closed")
    assert r.exit_code != 0 and "a folder, not an image file" in r.output and "file not found" not in r.output
    header_only = "# leakpipe manifest v1\n# root: ../data\npath,label,partition,variant\n"
    (ws / "manifests" / "nothing.csv").write_text(header_only)
    assert "the split is empty" in ok(ws, "encode", "--split", "nothing")  # every row removed by hand


def test_a_16_bit_image_is_attributed_with_a_note_of_its_conversion(ws, tmp_path):
    grey = np.asarray(Image.open(a_test_image(ws)).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "deep.png")  # uint16: Pillow's I;16
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out = ok(ws, "attribute", str(tmp_path / "deep.png"), *SETS)
    assert "converted as encode converts: I;16: 16-bit greyscale scaled to 8 bits" in out, out


def test_a_leftover_read_only_shm_does_not_keep_the_hash_cache_read_only(base):
    """Issue 34: after a run on a database made read-only, its -shm file stayed 0444 (SQLite gives it the
    database's mode), and once the owner made the database writable again the cache stayed "not
    writable", the note blaming the database."""
    import os
    import sys
    import tempfile

    as_nobody = _unprivileged()
    top = Path(tempfile.mkdtemp(prefix="leakpipe-shm-"))
    try:
        ws = top / "ws"
        shutil.copytree(base, ws, symlinks=True)
        db = ws / "cache" / "file-hashes.sqlite"
        for side in ("-wal", "-shm"):
            Path(f"{db}{side}").unlink(missing_ok=True)
        subprocess.run(["chown", "-R", "65534:65534", str(top)], check=True)
        env = {**os.environ, "HOME": str(top), "MPLCONFIGDIR": str(top)}

        def status():
            run = [*as_nobody, sys.executable, "-c", "from leakpipe.pipeline.cli import main; main()", "status"]
            return subprocess.run([*run, "-C", str(ws)], capture_output=True, text=True, env=env, cwd=top)

        db.chmod(0o444)
        r = status()
        assert r.returncode == 0 and "not writable by this user" in r.stderr, r.stderr
        shm = Path(f"{db}-shm")
        if not shm.exists():  # this SQLite read it without one: leave one as an older SQLite does
            shm.write_bytes(b"")
            os.chown(shm, 65534, 65534)
        shm.chmod(0o444)
        db.chmod(0o644)
        r = status()
        assert r.returncode == 0 and "not writable" not in r.stderr, r.stderr
        assert not shm.exists() or shm.stat().st_mode & 0o777 == 0o644  # SQLite removes it on a clean close
    finally:
        shutil.rmtree(top)
