import json
from collections import Counter

import pytest

from leakpipe.pipeline import manifest as mf
from tests.conftest import cli, write_images


def test_build_ratio_split_is_seeded_and_50_20_30(tmp_path):
    write_images(tmp_path / "data", labels=("g1", "g2"), n=10, size=(8, 8))
    r = cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert r.exit_code == 0, r.output
    m = mf.read_manifest(tmp_path / "manifests" / "closed.csv")
    assert len(m) == 20 and m.root == (tmp_path / "data").resolve()
    for label in ("g1", "g2"):
        parts = Counter(r["partition"] for r in m.rows if r["label"] == label)
        assert parts == {"train": 5, "val": 2, "test": 3}
    first = (tmp_path / "manifests" / "closed.csv").read_text()
    cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert (tmp_path / "manifests" / "closed.csv").read_text() == first
    cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed", "--seed", "1")
    assert (tmp_path / "manifests" / "closed.csv").read_text() != first


def test_build_from_split_file(tmp_path):
    write_images(tmp_path / "data", labels=("g1",), n=4, size=(8, 8))
    split = {"train": {"g1": ["000.png", "001.png"]}, "val": {"g1": ["002.png"]}, "test": {}}
    (tmp_path / "data" / "Split.json").write_text(json.dumps(split))
    r = cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert r.exit_code == 0 and "left out" in r.output
    m = mf.read_manifest(tmp_path / "manifests" / "closed.csv")
    assert {r["path"]: r["partition"] for r in m.rows} == {
        "g1/000.png": "train", "g1/001.png": "train", "g1/002.png": "val"}
    split["test"] = {"g1": ["missing.png"]}
    (tmp_path / "data" / "Split.json").write_text(json.dumps(split))
    r = cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert r.exit_code != 0 and "test/g1/missing.png: not in the tree" in r.output


def test_partition_none_for_inference_sets(tmp_path):
    write_images(tmp_path / "data", labels=("u1",), n=3, size=(8, 8))
    cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "open", "--partition", "none")
    m = mf.read_manifest(tmp_path / "manifests" / "open.csv")
    assert [r["partition"] for r in m.rows] == ["", "", ""]


def test_validation_reports_every_problem_with_line_numbers(tmp_path):
    write_images(tmp_path / "data", labels=("g1",), n=2, size=(8, 8))
    (tmp_path / "m.csv").write_text(
        "# root: data\npath,label,partition,variant\n"
        "g1/000.png,g1,train,raw\n"      # line 3: fine
        "g1/000.png,g1,train,raw\n"      # 4: duplicate
        "g1/001.png,,val,raw\n"          # 5: empty label
        "g1/001b.png,g1,holdout,raw\n"   # 6: unknown partition + missing file
        "../../etc/passwd,g1,test,raw\n"  # 7: escapes root
        "/abs.png,g1,test,raw\n")        # 8: absolute
    with pytest.raises(mf.ManifestError) as err:
        mf.read_manifest(tmp_path / "m.csv")
    text = str(err.value)
    for expected in ("line 4: duplicate path 'g1/000.png' (first on line 3)", "line 5: empty label",
                     "line 6: unknown partition 'holdout'", "line 6: file not found",
                     "line 7: path '../../etc/passwd' escapes", "line 8: path '/abs.png' escapes"):
        assert expected in text
    assert len(err.value.problems) == 6


def test_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(mf.ManifestError, match="missing column.*partition, variant"):
        mf.read_manifest(tmp_path / "m.csv")


def test_show_counts(ws):
    r = cli(ws, "manifest", "show", "closed")
    assert r.exit_code == 0 and "a=6  b=6" in r.output and "raw=12" in r.output
