"""Provenance: `status` predicts exactly what each stage then does, for every kind of change, in
words; trained results are kept per config (run cache) and run names point at them; the VAE
follows the cache; installed import names cannot clash."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leakpipe.pipeline.engine.vae import save_random_vae
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, embed, encode, score, train
from tests.conftest import TINY_BLOCKS, cli, synth_workspace, write_images
from tests.helpers import TINY as FAST

HEX = re.compile(r"(?<![/\w])[0-9a-f]{12,}(?![\w.])")  # a bare hash, not part of a path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """3 generators x 16 images of 32 px plus 2 unseen, encoded once; each test works on a copy."""
    root = synth_workspace(tmp_path_factory.mktemp("prov"))
    for split in ("closed", "open"):
        encode.run(graph(Workspace(root), Workspace(root).config()), split, log=lambda m: None)
    return root


@pytest.fixture
def ws(base, tmp_path):
    shutil.copytree(base, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def sets(*extra):
    return [a for s in (*FAST, *extra) for a in ("--set", s)]


def status(ws, *extra) -> dict:
    r = cli(ws, "status", "--json", *sets(*extra))
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)
    for e in items:
        for reason in e["reasons"]:
            assert not HEX.search(reason), f"bare hash in a reason: {reason}"
    return {(e["stage"], e["name"]): e for e in items}


def do(ws, stage, *extra, run="default", split="closed"):
    """Run one stage in-process; returns whether it did any work."""
    w = Workspace(ws)
    cfg = w.config(None, [*FAST, *extra])
    quiet = lambda m: None  # noqa: E731
    if stage == "encode":
        return not encode.run(graph(w, cfg), split, log=quiet).up_to_date
    if stage == "train":
        return not train.run(graph(w, cfg), run, log=quiet).up_to_date
    if stage == "embed":
        return bool(embed.run(graph(w, cfg), run, log=quiet, splits=[split]))
    return not score.run(graph(w, cfg), run, log=quiet).up_to_date


def agree(ws, key, *extra, want_reason=None):
    """What status says of `key` is what the stage then does; then both say up to date."""
    predicted = status(ws, *extra)[key]
    if want_reason is not None:
        assert any(want_reason in r for r in predicted["reasons"]), predicted["reasons"]
    split = key[1].split("/")[-1]
    did = do(ws, key[0], *extra, run=key[1].split("/")[0], split=split)
    assert did == (not predicted["up_to_date"]), (key, predicted)
    assert status(ws, *extra)[key]["up_to_date"]
    assert not do(ws, key[0], *extra, run=key[1].split("/")[0], split=split)
    return predicted


def trained(ws):
    """train, embed closed and open, score: as `leakpipe train` then `leakpipe score` do."""
    do(ws, "train")
    do(ws, "embed", split="closed")
    do(ws, "embed", split="open")
    do(ws, "score")


@pytest.fixture(scope="module")
def trained_base(base, tmp_path_factory):
    """base trained, embedded and scored once (`trained`): the tests that start there work on a copy."""
    root = tmp_path_factory.mktemp("prov-trained") / "ws"
    shutil.copytree(base, root, symlinks=True)
    trained(root)
    return root


@pytest.fixture
def trained_ws(trained_base, tmp_path):
    shutil.copytree(trained_base, tmp_path / "ws", symlinks=True)
    return tmp_path / "ws"


def test_config_key_change(trained_ws):
    ws = trained_ws  # trained, embedded and scored
    agree(ws, ("train", "default"))
    p = agree(ws, ("train", "default"), "model.embed_dim=4", want_reason="model.embed_dim: 8 -> 4")
    assert not p["restores_stored_result"]


def test_vae_change(ws, tmp_path):
    other = save_random_vae(tmp_path / "other", TINY_BLOCKS, seed=5)
    p = agree(ws, ("encode", "closed"), f"vae.source={other}", want_reason=f"vae.source: ./vae -> {other}")
    assert "vae files: 1 file changed" in p["reasons"]  # other weights, the same architecture
    assert status(ws)[("encode", "closed")]["up_to_date"]  # the first encoder's store is kept


def add_row(ws, split, folder, name):
    """Copy the first image of `folder` to `name` and append it as a row of manifests/SPLIT.csv."""
    manifest = ws / "manifests" / f"{split}.csv"
    rows = manifest.read_text().splitlines()
    first = next(r for r in rows if r.startswith(folder + "/"))
    src = first.split(",")[0]
    shutil.copy(ws / "data" / split / src, ws / "data" / split / folder / name)
    manifest.write_text("\n".join(rows + [first.replace(src, f"{folder}/{name}", 1)]) + "\n")


def test_manifest_rows_and_file_bytes(trained_ws):
    ws = trained_ws  # trained, embedded and scored
    add_row(ws, "closed", "closed00", "added.png")
    p = status(ws)[("train", "default")]
    assert p["blocked_by"] == ["leakpipe encode --split closed"]
    assert p["reasons"] == ["latents of closed are stale: manifest closed: 1 row added"]
    agree(ws, ("encode", "closed"), want_reason="manifest closed: 1 row added")
    agree(ws, ("train", "default"), want_reason="latents of closed: re-encoded (rows: 48 -> 49)")
    shutil.copy(ws / "data" / "closed" / "closed01" / "00000.png", ws / "data" / "closed" / "closed00" / "added.png")
    agree(ws, ("encode", "closed"), want_reason="manifest closed: 1 file changed")


def test_upstream_redone_and_output_deleted(trained_ws):
    ws = trained_ws  # trained, embedded and scored
    rows = (ws / "manifests" / "open.csv").read_text().splitlines()
    (ws / "manifests" / "open.csv").write_text("\n".join(rows[:-1]) + "\n")  # one open row removed
    assert status(ws)[("embed", "default/open")]["blocked_by"] == ["leakpipe encode --split open"]
    agree(ws, ("encode", "open"), want_reason="manifest open: 1 row removed")
    agree(ws, ("embed", "default/open"), want_reason="latents of open: re-encoded (rows: 32 -> 31)")
    agree(ws, ("score", "default"), want_reason="embeddings of open: recomputed")
    result = runs.pointed(Workspace(ws), "default")
    (result / "report.md").unlink()
    agree(ws, ("score", "default"), want_reason="output missing")
    (result / "model.safetensors").unlink()
    agree(ws, ("train", "default"), want_reason="output missing")


def _package_copy(dest: Path) -> Path:
    """leakpipe's source in `dest/leakpipe`, found before the installed one with PYTHONPATH=dest."""
    import leakpipe.pipeline as pipeline_pkg

    src = Path(pipeline_pkg.__file__).parent.parent
    for part in ("pipeline", "stages", "workflows"):
        shutil.copytree(src / part, dest / "leakpipe" / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _status_with(pkg: Path, ws: Path) -> dict:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(pkg)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import leakpipe.pipeline, sys; assert leakpipe.pipeline.__file__"
            f".startswith({str(pkg)!r}); from leakpipe.pipeline.cli import main; main()",
            "status",
            "--json",
            "-C",
            str(ws),
            *sets(),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {(e["stage"], e["name"]): e for e in json.loads(out.stdout)}


def _edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} is gone; update the test"
    path.write_text(text.replace(old, new))
    return text


def test_code_identity_comes_from_the_code(trained_ws, tmp_path):
    """Editing a function in a copy of the package makes status report every stage whose code reaches it
    stale, naming the module and the function, and no other stage; editing only comments, docstrings and layout
    does not. A stage's code is found through its imports: fit keeps the epoch of the best macro_auc, so
    train reaches metrics; encode reads images with load_image, never the baselines' load_native."""
    ws = trained_ws  # trained, embedded and scored
    pkg = _package_copy(tmp_path / "pkg")
    diffusion = pkg / "leakpipe" / "pipeline" / "math" / "diffusion.py"
    text = diffusion.read_text()
    diffusion.write_text(
        text.replace('"""Noise schedules', '# a comment\n"""Noise  schedules, reworded').replace(
            "return torch.cumprod(1 - betas(schedule, num_steps), dim=0)",
            "return torch.cumprod(\n        1 - betas(schedule, num_steps),  # why\n        dim=0)",
        )
    )
    cosmetic = _status_with(pkg, ws)
    assert all(e["up_to_date"] for e in cosmetic.values()), [e for e in cosmetic.values() if not e["up_to_date"]]
    diffusion.write_text(text.replace("(t + 0.008) / 1.008", "(t + 0.009) / 1.009"))
    edited = _status_with(pkg, ws)
    # score's figure of the features at each stage (engine/trained.py:stage_features) diffuses z0 too
    for key in (("train", "default"), ("embed", "default/closed"), ("embed", "default/open"), ("score", "default")):
        assert not edited[key]["up_to_date"]
        assert "code changed: leakpipe.pipeline.math.diffusion: betas" in edited[key]["reasons"], edited[key]
    assert edited[("encode", "closed")]["up_to_date"] and edited[("encode", "open")]["up_to_date"]
    diffusion.write_text(text)
    _edit(
        pkg / "leakpipe/pipeline/math/metrics.py",
        "return _nanmean_rows(per_class_auc",
        "return 0 + _nanmean_rows(per_class_auc",
    )
    _edit(pkg / "leakpipe/pipeline/engine/images.py", "(min(n, max_side) // 8 * 8", "(min(n, max_side + 0) // 8 * 8")
    both = _status_with(pkg, ws)
    assert "code changed: leakpipe.pipeline.math.metrics: macro_auc" in both[("train", "default")]["reasons"]
    assert not both[("score", "default")]["up_to_date"]
    assert "code changed: leakpipe.pipeline.engine.images: load_native" in both[("score", "default")]["reasons"]
    assert both[("encode", "closed")]["up_to_date"] and both[("embed", "default/closed")]["up_to_date"]


def test_a_legacy_code_label_reads_as_its_code(trained_ws, monkeypatch):
    """A lock written with a code version label (before code identity) is valid while the code is the
    one LEGACY records for that label, and stale, naming the module, once it is not."""
    from leakpipe.pipeline.ledger import code as code_id
    from leakpipe.stages import STAGES

    ws = trained_ws  # trained, embedded and scored
    lock_path = runs.pointed(Workspace(ws), "default") / "score.lock.json"
    lock = json.loads(lock_path.read_text())
    identity = lock["inputs"]["code"]
    monkeypatch.setitem(
        code_id.LEGACY, "score-test", identity if isinstance(identity, dict) else code_id.identity(STAGES["score"].code)
    )
    from leakpipe.pipeline.ledger.locks import Inputs, Upstream

    lock["inputs"]["code"] = "score-test"  # as an older leakpipe wrote it: format 2, by its fingerprint
    lock["format"] = 2
    del lock["identity"]
    i = lock["inputs"]
    lock["fingerprint"] = Inputs(
        i["config"], {k: Upstream(**u) for k, u in i["upstream"].items()}, i["files"], "score-test"
    ).fingerprint()
    lock_path.write_text(json.dumps(lock))
    assert "code changed" not in " ".join(status(ws)[("score", "default")]["reasons"])
    was = code_id.LEGACY["score-test"]
    unit = next(u for u in sorted(was) if u.startswith("leakpipe.pipeline.math.metrics:"))
    monkeypatch.setitem(code_id.LEGACY, "score-test", {**was, unit: "0" * 32})  # that unit, as it once was
    reasons = status(ws)[("score", "default")]["reasons"]
    assert f"code changed: leakpipe.pipeline.math.metrics: {unit.split(':')[1]}" in reasons, reasons


def _declared_hash(entry: str) -> str:
    """How leakpipe hashed a declared code entry (a module, or "module:function") before code identities
    were derived from the imports: kept here as it was, to write the locks that version wrote."""
    import ast
    import hashlib

    from leakpipe.pipeline.ledger.reach import source_path

    module, _, name = entry.partition(":")
    tree = ast.parse(source_path(module).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    if name:
        tree = next(n for n in tree.body if getattr(n, "name", None) == name)
    return hashlib.blake2b(ast.unparse(tree).encode(), digest_size=16).hexdigest()


def test_a_workspace_of_declared_code_stays_valid(ws, monkeypatch):
    """A workspace made by the last leakpipe whose stages declared their code entries by hand (locks that
    record {entry: hash} of those entries, or the legacy label that stands for them) reads as up to date
    with derived identities, nothing re-encoded or retrained, while the code is the one the declared table
    (ledger/declared_code.json) was made from; once a unit of a stage's derived code differs, that stage
    is stale, naming it. The table is made here as tests/declared_code.py makes it, of today's source."""
    from leakpipe.pipeline.ledger import code as code_id
    from leakpipe.stages import STAGES

    table = {
        name: {
            "declared": {e: _declared_hash(e) for e in next(iter(code_id.declared().values()))[name]["declared"]},
            "derived": code_id.identity(stage.code),
        }
        for name, stage in STAGES.items()
    }
    monkeypatch.setattr(code_id, "declared", lambda: {"today": table})
    for split in ("closed", "open"):  # the copy's stores, unless their code's recorded form has changed
        do(ws, "encode", split=split)
    trained(ws)
    w = Workspace(ws)
    result = runs.pointed(w, "default")
    locks = {
        "encode": graph(w, w.config(None, FAST)).plan("encode", "closed").lock,
        "train": result / "train.lock.json",
    }
    locks.update(embed=result / "embeddings" / "closed.lock.json", score=result / "score.lock.json")
    for name, lock in locks.items():  # as that leakpipe wrote them: its entries' hashes, or their label
        old = table[name]["declared"]
        want = next((label for label, c in code_id.LEGACY.items() if c == old), old)
        assert json.loads(lock.read_text())["inputs"]["code"] == want, name
    assert all(e["up_to_date"] for e in status(ws).values()), status(ws)
    changed = dict(table["train"]["derived"], **{"leakpipe.pipeline.math.metrics:macro_auc": "0" * 32})
    monkeypatch.setitem(table, "train", {"declared": table["train"]["declared"], "derived": changed})
    assert "code changed: leakpipe.pipeline.math.metrics: macro_auc" in status(ws)[("train", "default")]["reasons"]


def test_runs_are_never_overwritten_and_come_back_without_training(trained_ws, monkeypatch):
    ws = trained_ws  # trained, embedded and scored
    w = Workspace(ws)
    first = runs.pointed(w, "default")
    r = cli(ws, "train", *sets("model.embed_dim=4"))
    assert r.exit_code == 0 and "model.embed_dim: 8 -> 4" in r.output and str(first) in r.output
    second = runs.pointed(w, "default")
    assert second != first and (first / "model.safetensors").exists()
    p = status(ws)[("train", "default")]  # back to the first config: restorable, no training
    assert p["restores_stored_result"] and "model.embed_dim: 4 -> 8" in p["reasons"]

    def no_training(*a, **k):
        raise AssertionError("trained although a stored result matches")

    monkeypatch.setattr("leakpipe.pipeline.engine.fit.fit", no_training)
    res = train.run(graph(w, w.config(None, FAST)), "default", log=lambda m: None)
    assert res.restored and runs.pointed(w, "default") == first
    assert (ws / "cache" / "runs" / "default" / "report.md").exists()  # the old name's files are back


def test_run_name_means_one_thing_to_every_command(trained_ws):
    ws = trained_ws  # trained, embedded and scored
    cli(ws, "train", "--run", "p30", *sets("model.embed_dim=4"))
    r = cli(ws, "train", "--run", "p30", *sets())  # without the --set it was made with
    assert "model.embed_dim: 4 -> 8" in r.output
    w = Workspace(ws)
    p30 = runs.pointed(w, "p30")
    assert p30 == runs.pointed(w, "default")  # the same config: the same stored result, not retrained
    cli(ws, "train", "--run", "p30", *sets("model.embed_dim=4"))
    p30 = runs.pointed(w, "p30")
    s = cli(ws, "score", "--run", "p30", "--json", *sets())
    assert s.exit_code == 0 and "would not keep it: model.embed_dim: 4 -> 8" in s.output
    assert json.loads(s.stdout)["result"] == p30.name
    image = next((ws / "data" / "open").rglob("*.png"))
    a = cli(ws, "attribute", str(image), "--run", "p30", "--json", *sets())
    assert a.exit_code == 0, a.output
    assert json.loads(a.stdout)[0]["result"] == p30.name
    st = status(ws)
    assert st[("train", "p30")]["result"] == p30.name and not st[("train", "p30")]["up_to_date"]
    assert st[("score", "p30")]["up_to_date"]


def test_runs_lists_and_gc_frees_only_what_nothing_refers_to(trained_ws):
    ws = trained_ws  # trained, embedded and scored
    w = Workspace(ws)
    kept = runs.pointed(w, "default")
    cli(ws, "train", *sets("model.embed_dim=4"))
    orphan = kept
    kept = runs.pointed(w, "default")
    listing = cli(ws, "runs", *sets()).output
    assert "(none: gc frees it)" in listing and "model.embed_dim: 4 -> 8" in listing
    rows = json.loads(cli(ws, "runs", "--json", *sets()).stdout)
    assert {r["result"] for r in rows} == {orphan.name, kept.name}
    dry = cli(ws, "gc", "--dry-run", *sets())
    assert f"would remove {orphan}" in dry.output and str(kept) not in dry.output and orphan.exists()
    r = cli(ws, "gc", *sets())
    assert r.exit_code == 0 and "freed" in r.output
    assert not orphan.exists() and kept.exists() and status(ws)[("train", "default")]["reasons"]


def test_the_vae_follows_the_cache(tmp_path, tiny_vae):
    write_images(tmp_path / "data", labels=("a", "b", "c"), n=8, size=(32, 32))
    (tmp_path / "leakpipe.toml").write_text("[preprocess]\nsize = 32\n[encode]\nnum_workers = 0\n")
    cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed", "--ratios", "0.5,0.25,0.25")
    shutil.copytree(tiny_vae, tmp_path / "vae")
    r = cli(tmp_path, "encode", "--split", "closed", "--vae", str(tmp_path / "vae"))
    assert r.exit_code == 0 and "vae.source = ./vae saved in" in r.output and "VAE ./vae" in r.output
    assert 'source = "./vae"' in (tmp_path / "leakpipe.toml").read_text()
    st = cli(tmp_path, "status")
    assert "encode closed  up to date" in st.output and "VAE ./vae" in st.output, st.output
    t = cli(tmp_path, "train", *sets())
    assert t.exit_code == 0 and "VAE ./vae" in t.output, t.output
    s = cli(tmp_path, "score", *sets("score.open="))
    assert s.exit_code == 0 and "VAE ./vae, store" in s.output, s.output
    a = cli(tmp_path, "attribute", str(next((tmp_path / "data").rglob("*.png"))), *sets("score.open="))
    assert a.exit_code == 0 and "VAE ./vae" in a.output, a.output


def test_installed_names_do_not_take_bare_pipeline_or_stages(tmp_path):
    code = (
        "import importlib.util as u, leakpipe.pipeline, leakpipe.stages\n"
        "print(u.find_spec('pipeline'), u.find_spec('stages'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    from leakpipe.pipeline.store.atomic import atomic_path

    target = tmp_path / "folder"
    with atomic_path(target, folder=True) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_path(target, folder=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and (target / "a").read_text() == "1"
    with atomic_path(target, folder=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_made_with_the_umask_and_safetensors_bytes_are_deterministic(tmp_path, umask):
    import torch

    from leakpipe.pipeline.store.atomic import atomic_path, atomic_write_text
    from leakpipe.pipeline.store.checkpoint import load_tensors, save_tensors

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with atomic_path(tmp_path / "store", folder=True) as tmp:
            (tmp / "a").write_text("1")
        tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
        meta = {k: {"v": i, "nested": {"z": 1, "a": 2}} for i, k in enumerate("qwertyuiopasdfgh")}
        for name in ("one", "two"):  # safetensors orders the metadata by a hash map, differently each call
            save_tensors(tmp_path / f"{name}.safetensors", tensors, meta)
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "store" / "a").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    back, got = load_tensors(tmp_path / "one.safetensors")
    assert got == meta and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_run_folder_from_leakpipe_0_1_is_kept(ws):
    old = ws / "cache" / "runs" / "old"
    old.mkdir(parents=True)
    (old / "report.md").write_text("numbers from 0.1")
    assert cli(ws, "status", *sets()).exit_code == 0 and old.is_dir() and not old.is_symlink()  # reading moves nothing
    assert cli(ws, "train", "--run", "old", *sets()).exit_code == 0
    kept = list((ws / "cache" / "results").glob("legacy-old-*"))
    assert len(kept) == 1 and (kept[0] / "report.md").read_text() == "numbers from 0.1"
    assert old.is_symlink() and runs.pointed(Workspace(ws), "old") != kept[0]


def test_gc_never_removes_what_is_in_use(trained_ws):
    """A result being trained has no run name until it is finished: gc must not pull it away."""
    from leakpipe.pipeline.store.locking import exclusive

    ws = trained_ws  # trained, embedded and scored
    w = Workspace(ws)
    first = runs.pointed(w, "default")
    cli(ws, "train", *sets("model.embed_dim=4"))  # `first` now has no name: gc would free it
    with exclusive(first / ".writer.lock", "a training in another process"):
        r = cli(ws, "gc", *sets())
        assert r.exit_code == 0 and f"skipping {first}: in use" in r.output and first.exists()
        assert "gc: 0 item(s) removed, 0.0 MiB freed; 1 in use, skipped" in r.output  # it once said "1 freed"
    r = cli(ws, "gc", *sets())
    assert f"removing {first}" in r.output and not first.exists() and "gc: 1 item(s) removed" in r.output
