"""The synthetic benchmark and post-processing: shape, determinism, replayable ops, calibration."""

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from leakpipe.pipeline import manifest as mf
from leakpipe.pipeline.bench import postprocess
from leakpipe.pipeline.bench import synth
from leakpipe.pipeline.bench.baseline import train_test_accuracy
from tests.conftest import cli


def tree_hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make(ws, out, *extra):
    r = cli(
        ws, "synth", "--out", str(out), "--closed", "3", "--open", "2", "--per-generator", "10", "--size", "48", *extra
    )
    assert r.exit_code == 0, r.output
    return r


def test_synth_writes_wild_shaped_tree_and_manifests(tmp_path):
    make(tmp_path, tmp_path / "d")
    closed = mf.read_manifest(tmp_path / "manifests" / "closed.csv")
    pp = mf.read_manifest(tmp_path / "manifests" / "closed-pp.csv")
    opened = mf.read_manifest(tmp_path / "manifests" / "open.csv")
    assert closed.labels() == ["closed00", "closed01", "closed02"] and len(closed) == 30
    assert Counter(r["partition"] for r in closed.rows) == {"train": 15, "val": 6, "test": 9}
    assert opened.labels() == ["open00", "open01"] and {r["partition"] for r in opened.rows} == {""}
    assert Counter(r["variant"] for r in pp.rows) == {"step1": 9, "step2": 9, "step3": 9}
    assert all(r["ops"] for r in pp.rows) and "ops" in pp.columns
    with Image.open(closed.abspath(0)) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_same_arguments_give_identical_bytes_and_seed_changes_them(tmp_path):
    make(tmp_path / "w1", tmp_path / "a")
    make(tmp_path / "w2", tmp_path / "b", "--workers", "1")  # worker count does not matter
    make(tmp_path / "w3", tmp_path / "c", "--seed", "1")
    a, b, c = (tree_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 30 + 27 + 20
    raw = {k for k in a if not k.startswith("closed-pp/")}
    assert raw <= set(c) and all(a[k] != c[k] for k in set(a) & set(c))  # the split moves too
    assert (tmp_path / "w1/manifests/closed-pp.csv").read_text().split("\n", 2)[2] == (
        tmp_path / "w2/manifests/closed-pp.csv"
    ).read_text().split("\n", 2)[2]


def test_content_is_shared_and_fingerprints_differ():
    fa, fb = synth.make_fingerprint("closed00", 0), synth.make_fingerprint("closed01", 0)
    content = synth.procedural_content(synth.rng_for(0, "content"), 64)
    a, b = (synth.apply_fingerprint(content, f, synth.rng_for(1)).astype(int) for f in (fa, fb))
    # one scene under two generators: highly correlated, but visibly different
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9 and np.abs(a - b).mean() > 1
    harder = synth.make_fingerprint("closed00", 0, difficulty=4.0)
    assert np.abs(harder.amps).sum() == pytest.approx(np.abs(fa.amps).sum() / 4)


def test_recorded_ops_replay_exactly(tmp_path):
    make(tmp_path, tmp_path / "d")
    pp = mf.read_manifest(tmp_path / "manifests" / "closed-pp.csv")
    closed = mf.read_manifest(tmp_path / "manifests" / "closed.csv")
    row = next(r for r in pp.rows if r["variant"] == "step3")
    source = closed.root / row["path"].split("/", 1)[1]
    with Image.open(source) as im:
        replayed = np.asarray(postprocess.apply_ops(im, row["ops"]))
    with Image.open(pp.root / row["path"]) as im:
        assert np.array_equal(np.asarray(im), replayed)
    n_ops = [len(postprocess.parse_ops(r["ops"])) for r in pp.rows]
    steps = [int(r["variant"][-1]) for r in pp.rows]
    assert all(1 <= n <= s for n, s in zip(n_ops, steps)) and max(n_ops) == 3


def test_postprocess_command_on_any_manifest(ws):
    r = cli(ws, "postprocess", "--split", "closed", "--partition", "all", "--steps", "2")
    assert r.exit_code == 0, r.output
    pp = mf.read_manifest(ws / "manifests" / "closed-pp.csv")
    assert len(pp) == 12 and {r["variant"] for r in pp.rows} == {"step2"}
    with pytest.raises(ValueError, match="unknown operation"):
        postprocess.parse_ops("sharpen(x=1)")


def test_pixel_baseline_is_calibrated(tmp_path):
    """Default difficulty, 10 generators: the pixel baseline must be far from chance (10%) and far
    from perfect. Measured here (seed 0, 60 images/generator, 64 px, 18 test images/generator):
    raw test top-1 0.689, step1 0.494, step3 0.456. The bounds leave 0.16-0.34 of margin on each
    side for other platforms' resampling and solver rounding; at 180 test images a binomial
    standard error is about 0.035."""
    r = cli(
        tmp_path,
        "synth",
        "--out",
        str(tmp_path / "d"),
        "--closed",
        "10",
        "--open",
        "0",
        "--per-generator",
        "60",
        "--size",
        "64",
        "--steps",
        "3",
    )
    assert r.exit_code == 0, r.output
    acc = train_test_accuracy(
        mf.read_manifest(tmp_path / "manifests" / "closed.csv"),
        {
            "closed": mf.read_manifest(tmp_path / "manifests" / "closed.csv"),
            "pp": mf.read_manifest(tmp_path / "manifests" / "closed-pp.csv"),
        },
    )
    assert 0.35 <= acc["closed:raw"] <= 0.85, acc
    assert acc["pp:step3"] < acc["closed:raw"], acc  # post-processing hides the fingerprint
