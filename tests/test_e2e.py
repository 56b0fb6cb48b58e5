"""End to end: every documented command in a temporary workspace on a tiny synthetic set, then
everything again, which must do no work (no file under cache/ changes)."""

import json
import re

import pytest

from leakpipe.pipeline.manifest import read_manifest
from tests.conftest import TOML, cli

TRAIN = [  # one epoch: what is tested is what each command does, then that none does it again
    "--set",
    "train.epochs=1",
    "--set",
    "model.embed_dim=16",
    "--set",
    "model.prototypes_per_class=2",
    "--set",
    "train.batch_size=8",
]


def ok(ws, *args):
    r = cli(ws, *args)
    assert r.exit_code == 0, f"leakpipe {' '.join(args)}:\n{r.output}"
    return r.output


def snapshot(ws):
    """Size and mtime of every file under cache/ except the flock files (their holder note is
    rewritten by each writer that takes them)."""
    return {
        str(p.relative_to(ws)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted((ws / "cache").rglob("*"))
        if p.is_file() and not p.name.endswith("writer.lock")
    }


def encode_locks(ws) -> dict:
    return {str(p.relative_to(ws)): json.loads(p.read_text()) for p in (ws / "cache" / "latents").glob("*/*.lock.json")}


def every_command(ws, photos):
    out = {}
    ok(
        ws,
        "synth",
        "--closed",
        "3",
        "--open",
        "2",
        "--per-generator",
        "12",
        "--size",
        "32",
        "--difficulty",
        "0.1",
        "--steps",
        "",
        "--workers",
        "1",
    ) if not (ws / "manifests").exists() else None
    if not (ws / "manifests" / "closed-pp.csv").exists():
        ok(ws, "postprocess", "--split", "closed", "--steps", "1,2", "--workers", "1")
    out["build"] = ok(ws, "manifest", "build", str(photos), "--split", "photos", "--partition", "none")
    out["show"] = ok(ws, "manifest", "show", "closed")
    out["encode"] = ok(
        ws, "encode", "--split", "closed", "--split", "closed-pp", "--split", "open", "--split", "photos"
    )
    out["train"] = ok(ws, "train", *TRAIN)
    out["score"] = ok(ws, "score", *TRAIN)
    out["json"] = cli(ws, "score", "--json", *TRAIN).stdout
    out["attribute"] = cli(ws, "attribute", str(next(photos.rglob("*.png"))), "--json").stdout
    out["sweep"] = ok(ws, "sweep", "--only", "full,no-gating", *TRAIN)
    out["compare"] = ok(ws, "compare", "default", "no-gating", "--out", str(ws / "compare.md"))
    out["status"] = ok(ws, "status", *TRAIN)
    out["verify"] = ok(ws, "verify")
    out["gc"] = ok(ws, "gc", "--dry-run", *TRAIN)
    out["config"] = ok(ws, "config", *TRAIN)
    return out


@pytest.fixture
def e2e_ws(tmp_path, tiny_vae):
    (tmp_path / "leakpipe.toml").write_text(TOML.format(vae=tiny_vae))
    photos = tmp_path / "photos" / "unknown"
    photos.mkdir(parents=True)
    from PIL import Image
    import numpy as np

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(photos / f"{i}.png")
    return tmp_path


def test_every_command_then_nothing_to_do(e2e_ws):
    ws = e2e_ws
    first = every_command(ws, ws / "photos")
    assert "closed00=12" in first["show"].replace(" ", "") or "closed00" in first["show"]
    assert first["encode"].count("encoded") == 4
    assert "validation macro AUC" in first["train"] and "report:" in first["score"]
    m = json.loads(first["json"])
    assert list(m["closed"]) == ["raw", "step1", "step2"] and "gating_on" in m["open"]
    a = json.loads(first["attribute"])
    assert len(a) == 1 and a[0]["top"][0]["generator"].startswith("closed")
    default = (ws / "cache" / "runs" / "default").resolve().name
    assert "train full: restored a stored result, no training" in first["sweep"]  # = default's config
    assert f"| full | {default} | - |" in first["sweep"] and "| model.gating=false |" in first["sweep"]
    assert f"| default | {default} | - |" in first["compare"] and "model.gating=false" in first["compare"]
    assert (ws / "compare.md").read_text() in first["compare"]
    assert "Paired against `default` on the same test images" in first["compare"]
    assert "open AUROC difference" in first["compare"]
    assert "| top-1 | macro AUC |" in first["compare"] and "[" in first["compare"]  # intervals in the cells
    stale = [line for line in first["status"].splitlines() if "STALE" in line]
    assert len(stale) == 1 and "train  no-gating" in stale[0] and "model.gating: false -> true" in stale[0]
    assert "all checksums match" in first["verify"]
    assert "[model]" in first["config"]
    for run in ("default", "no-gating"):
        assert (ws / "cache" / "runs" / run / "report.md").exists()

    before, locks = snapshot(ws), encode_locks(ws)
    again = every_command(ws, ws / "photos")
    after = snapshot(ws)
    # nothing rewritten but the rows an encode lock records with the stat of each file when it was hashed:
    # rows hashed within 2 s of their file's mtime are "racy" (hashing.RACY_NS) and vouched for once they
    # are not, by rewriting them beside the same lock, outputs and fingerprint untouched
    refreshed = {k for k, v in after.items() if before.get(k) != v}
    assert all(re.fullmatch(r"cache/latents/\w[\w-]*/\w+\.lock\.json(\.rows)?", k) for k in refreshed), refreshed
    assert {k: {f: v for f, v in lock.items() if f != "rows"} for k, lock in encode_locks(ws).items()} == {
        k: {f: v for f, v in lock.items() if f != "rows"} for k, lock in locks.items()
    }
    before = after
    ok(ws, "encode", "--split", "closed", "--split", "closed-pp", "--split", "open", "--split", "photos")
    assert snapshot(ws) == before  # and refreshed once only
    assert again["encode"].count("up to date") == 4
    assert "up to date" in again["train"] and "up to date" in again["score"]
    assert "train no-gating: up to date" in again["sweep"] and "train full: up to date" in again["sweep"]
    assert again["compare"] == first["compare"]


def test_demo_small_end_to_end(tmp_path):
    """The demo with a small spec: every stage on the shipped TAEF2 (a trained latent space, said so, and
    no random-weights note), a report; a rerun does nothing."""
    from leakpipe.workflows.demo import DEMO_TAEF2_SCALE

    demo = ["demo", "--closed", "2", "--open", "2", "--per-generator", "10", "--size", "64", "--epochs", "2"]
    r = cli(tmp_path, *demo)
    assert r.exit_code == 0, r.output
    assert "TAEF2" in r.output and "seeded random weights" not in r.output and "report" in r.output
    assert (
        "images of 64 px, each one's low-frequency latent bias rendered through builtin:taef2's decoder, at "
        "difficulty 0.5" in r.output
    )
    toml = (tmp_path / "leakpipe.toml").read_text()
    assert 'source = "builtin:taef2"' in toml and f"[latent]\nscale = {DEMO_TAEF2_SCALE}\n" in toml
    report = (tmp_path / "cache" / "runs" / "default" / "report.md").read_text()
    assert "seeded random weights" not in report and "Table 3" in report
    history = json.loads((tmp_path / "cache" / "runs" / "default" / "history.json").read_text())
    assert ["val_loss" in h for h in history] == [False, True]  # the demo validates after its last epoch
    # its decisions are calibrated on 2 variants of each val image (training stays raw), and say so
    var = read_manifest(tmp_path / "manifests" / "closed-var.csv")
    assert {r["partition"] for r in var.rows} == {"val"} and len(var) == 2 * sum(
        r["partition"] == "val" for r in read_manifest(tmp_path / "manifests" / "closed.csv").rows
    )
    config = json.loads((tmp_path / "cache" / "runs" / "default" / "config.json").read_text())
    assert config["train"]["variants"] == "" and 'variants = "closed-var"' in toml
    assert "as `leakpipe postprocess --variants` draws them (closed-var)), its prediction set holds" in report
    before = snapshot(tmp_path)
    r = cli(tmp_path, *demo)
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert snapshot(tmp_path) == before
    r = cli(tmp_path, "train", "--run", "small-latents", "--set", "features.dct_k=9")
    assert r.exit_code != 0 and "features.dct_k = 9 exceeds the latent side 8" in r.output


def test_demo_random_vae_is_a_flag(tmp_path):
    """`--vae random` writes the seeded random demo VAE with its own measured scale, and the demo says so;
    a --vae for a workspace that exists is named, not silently dropped."""
    from leakpipe.workflows import demo
    from leakpipe.pipeline.workspace import Workspace

    ws, said = Workspace(tmp_path), []
    spec = demo.spec_with("random", n_closed=2, n_open=1, per_generator=2, size=32)
    demo.setup(ws, "random", spec, 1, log=said.append)
    written = demo.written_spec(ws, demo.DEMO_SPEC)  # the pixel family, with stronger fingerprints
    assert (written.family, written.difficulty) == ("pixel", demo.RANDOM_SPEC.difficulty)
    toml = (tmp_path / "leakpipe.toml").read_text()
    assert "models/demo-vae" in toml and f"[latent]\nscale = {demo.DEMO_VAE_SCALE}\n" in toml
    assert (tmp_path / "models" / "demo-vae" / "LEAKPIPE_RANDOM_WEIGHTS.txt").exists()
    demo.setup(ws, "builtin:taef2", spec, 1, log=said.append)
    assert (tmp_path / "leakpipe.toml").read_text() == toml
    assert "--vae builtin:taef2 applies to a new workspace" in said[-1]
