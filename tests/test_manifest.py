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
        "g1/000.png": "train",
        "g1/001.png": "train",
        "g1/002.png": "val",
    }
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
        "g1/000.png,g1,train,raw\n"  # line 3: fine
        "g1/000.png,g1,train,raw\n"  # 4: duplicate
        "g1/001.png,,val,raw\n"  # 5: empty label
        "g1/001b.png,g1,holdout,raw\n"  # 6: unknown partition + missing file
        "../../etc/passwd,g1,test,raw\n"  # 7: escapes root
        "/abs.png,g1,test,raw\n"
    )  # 8: absolute
    with pytest.raises(mf.ManifestError) as err:
        mf.read_manifest(tmp_path / "m.csv")
    text = str(err.value)
    for expected in (
        "line 4: duplicate path 'g1/000.png' (first on line 3)",
        "line 5: empty label",
        "line 6: unknown partition 'holdout'",
        "line 6: file not found",
        "line 7: path '../../etc/passwd' escapes",
        "line 8: path '/abs.png' escapes",
    ):
        assert expected in text
    assert len(err.value.problems) == 6


def test_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(mf.ManifestError, match="missing column.*partition, variant"):
        mf.read_manifest(tmp_path / "m.csv")


def test_show_counts(ws):
    r = cli(ws, "manifest", "show", "closed")
    assert r.exit_code == 0 and "a=6  b=6" in r.output and "raw=12" in r.output


def reference_problems(path, check_files=True):
    """The row-by-row reader the bulk checks replaced (csv.DictReader, then normpath, resolve and
    is_file per row): the bulk one must report exactly the same problems, in the same order."""
    import csv
    import io
    import os
    import posixpath

    text = path.read_text(encoding="utf-8-sig")
    head = text.split("\n", 2)
    root = (path.parent / head[1].split(":", 1)[1].strip()).resolve()
    rows = list(csv.DictReader(io.StringIO(head[2], newline="")))
    problems, seen = [], {}
    for i, row in enumerate(rows):
        given = row["path"] or ""
        norm = posixpath.normpath(given.replace("\\", "/")) if given.strip() else ""
        row["path"] = "" if norm == "." else norm
        if row["path"] in seen and row["path"]:
            alias = "" if given == row["path"] else f", written here as {given!r}"
            problems.append(
                f"line {4 + i}: duplicate path {row['path']!r} (first on line {seen[row['path']]}{alias}); "
                "keep one row per file"
            )
        seen.setdefault(row["path"], 4 + i)
    for i, row in enumerate(rows):
        where, p = f"line {4 + i}", row["path"]
        if not p:
            problems.append(f"{where}: empty path")
            continue
        if not (row["label"] or "").strip():
            problems.append(f"{where}: empty label for {p!r}")
        if (row["partition"] or "").strip() not in mf.PARTITIONS:
            problems.append(
                f"{where}: unknown partition {(row['partition'] or '').strip()!r} for {p!r}; "
                "expected train, val, test or empty"
            )
        full = (root / p).resolve()
        if os.path.isabs(p) or not full.is_relative_to(root):
            problems.append(f"{where}: path {p!r} escapes the manifest root {root}")
        elif check_files and full.is_dir():  # issue 34: a folder was reported as "file not found"
            problems.append(f"{where}: a folder, not an image file: {full}")
        elif check_files and not full.is_file():
            problems.append(f"{where}: file not found: {full}")
    return problems


@pytest.mark.parametrize("check_files", [True, False])
def test_bulk_checks_report_what_row_by_row_checks_did(tmp_path, check_files):
    data = tmp_path / "data"
    write_images(data, labels=("big", "small"), n=12, size=(8, 8))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.png").write_bytes((data / "big" / "000.png").read_bytes())
    (data / "big" / "out.png").symlink_to(tmp_path / "outside" / "o.png")  # a link leaving the root
    (data / "big" / "in.png").symlink_to(data / "small" / "000.png")  # a link inside it: fine
    (data / "away").symlink_to(tmp_path / "outside")  # a folder leaving the root
    (data / "big" / "dir.png").mkdir()
    good = [f"big/{i:03d}.png" for i in range(1, 12)] + [f"small/{i:03d}.png" for i in range(1, 5)]
    odd = [
        "./big/000.png",
        "big//000.png",
        "small/../big/000.png",
        "small\\005.png",
        "big/in.png",
        "big/out.png",
        "away/o.png",
        "../outside/o.png",
        "/etc/passwd",
        "big/missing.png",
        "big/dir.png",
        "   ",
        "",
        "small/006.png",
        "small/007.png",
    ]
    lines = [f"{p},big,train,raw" for p in good + odd[:-2]]
    lines += ["small/006.png,,train,raw", "small/007.png,small,holdout,raw", "small/008.png , small ,val, raw"]
    path = tmp_path / "manifests" / "m.csv"
    path.parent.mkdir()
    for body in ("\n".join(lines), "\n".join(lines).replace("small\\005", '"small\\005"')):  # fast, csv
        path.write_text(f"# leakpipe manifest v1\n# root: ../data\npath,label,partition,variant\n{body}\n")
        want = reference_problems(path, check_files)
        with pytest.raises(mf.ManifestError) as err:
            mf.read_manifest(path, check_files=check_files)
        assert err.value.problems == want and len(want) >= 9
    clean = "\n".join(f"{p},big,train,raw" for p in good)
    path.write_text(f"# leakpipe manifest v1\n# root: ../data\npath,label,partition,variant\n{clean}\n")
    m = mf.read_manifest(path, check_files=check_files)
    assert m.column("path") == good and m.rows[0] == {
        "path": good[0],
        "label": "big",
        "partition": "train",
        "variant": "raw",
    }
    assert m.abspaths()[0] == str(data.resolve() / good[0])


def test_the_checkout_is_a_workspace_and_its_readmes_stay(ws):
    """The repository's cache/README.md and manifests/README.md (tracked: a clone is a workspace) sit
    beside a workspace's real files: they are no split, and gc never frees them."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for folder in ("cache", "manifests"):
        text = (repo / folder / "README.md").read_text()
        assert text.startswith(f"# {folder}/") and "ignored by git" in text
        (ws / folder).mkdir(exist_ok=True)
        shutil.copyfile(repo / folder / "README.md", ws / folder / "README.md")
    assert cli(ws, "encode", "--split", "closed").exit_code == 0
    st = cli(ws, "status")
    assert st.exit_code == 0 and "encode closed" in st.output and "README" not in st.output, st.output
    assert cli(ws, "gc").exit_code == 0 and cli(ws, "verify").exit_code == 0
    assert (ws / "cache" / "README.md").is_file() and (ws / "manifests" / "README.md").is_file()
