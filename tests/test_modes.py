"""Every file leakpipe creates has the permissions the umask gives (issue 34): a whole workspace and an
export after a full run, walked file by file, under the usual umask 022 (colleagues can read) and under
077 (nobody else can). safetensors' save_file and diffusers' save_pretrained create 0600 files, which
locked other users out of `attribute --model` and of a read-only workspace, until every writer went
through store/atomic.py."""

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from leakpipe.pipeline.cli import main
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
from tests.conftest import CPU_STEM, TINY_BLOCKS, cli
from tests.helpers import TINY

SETS = [a for s in (*TINY, "score.bootstrap=0", "score.baselines=false") for a in ("--set", s)]


def ok(ws, *args):
    r = cli(ws, *args)
    assert r.exit_code == 0, f"leakpipe {' '.join(args)}:\n{r.output}"
    return r.output


def full_run(root: Path) -> list[Path]:
    """Everything a user makes on a tiny workspace: images, a random VAE, manifests, latents, a training,
    a scoring, an export, a comparison table; the folders to walk."""
    from leakpipe.pipeline.engine.vae import save_random_vae

    write_benchmark(root / "data", root / "manifests", SynthSpec(3, 2, 8, 32, 0.1, 0, ()), workers=1)
    save_random_vae(root / "vae", TINY_BLOCKS, seed=0)
    (root / "leakpipe.toml").write_text(
        '[vae]\nsource = "./vae"\n[preprocess]\nsize = 32\n[encode]\nnum_workers = 0\n[store]\nchunk_rows = 8\n'
        + CPU_STEM
    )
    ok(root, "manifest", "build", str(root / "data" / "closed"), "--split", "again", "--partition", "none")
    ok(root, "encode", "--split", "closed", "--split", "open")
    ok(root, "train", *SETS)
    ok(root, "score", *SETS)
    ok(root, "compare", "default", "--out", str(root / "compare.md"), *SETS)
    for args in (["status"], ["runs"], ["verify"]):
        ok(root, *args, *SETS)
    ok(root, "export", str(root.parent / "export"), *SETS)
    r = CliRunner().invoke(main, ["vae", "random", str(root.parent / "vae-random")])  # no workspace
    assert r.exit_code == 0, r.output
    return [root, root.parent / "export", root.parent / "vae-random"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_of_a_workspace_and_an_export_honours_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        folders = full_run(tmp_path / "ws")
    finally:
        os.umask(old)
    wrong, files = [], 0
    for top in folders:
        for path in [top, *top.rglob("*")]:
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            want = (0o777 if path.is_dir() or mode & 0o111 else 0o666) & ~mask
            files += path.is_file()
            if mode != want:
                wrong.append(f"{oct(mode)} (want {oct(want)}): {path.relative_to(tmp_path)}")
    assert files > 100 and wrong == [], "\n".join(wrong)
    names = {p.name for top in folders for p in top.rglob("*")}
    for made_by_others in ("calibration.safetensors", "reference.safetensors", "diffusion_pytorch_model.safetensors"):
        assert made_by_others in names  # the files safetensors and diffusers made 0600 are among them
    assert {"file-hashes.sqlite", "open_scores.safetensors", "gallery.safetensors", "app.py"} <= names
