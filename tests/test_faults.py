"""Fault injection: SIGKILL each stage just before its k-th file commit (every os.replace: zarr
chunks, locks, models, checkpoints, metrics), rerun it, and require the result to equal, bitwise, an
uninterrupted run from the same starting state. The default suite tries 2 kill points per stage;
`pytest -m slow tests/test_faults.py` tries up to 12 spread over every commit of the stage."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from tests.conftest import cli, synth_workspace

SETS = [
    a
    for s in (
        "train.epochs=2",
        "model.embed_dim=8",
        "model.prototypes_per_class=1",
        "train.batch_size=16",
        "score.kde_folds=2",
        "score.postprocessed=",
    )
    for a in ("--set", s)
]
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(int(sys.argv.pop(1)))  # the test process's: bitwise needs the same split of the work
target, count = int(sys.argv[1]), [0]
real = os.replace
def replace(*args, **kwargs):
    count[0] += 1
    if count[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)  # just before the commit: its temporary file is left behind
    return real(*args, **kwargs)
os.replace = replace
from leakpipe.pipeline.cli import main
main(sys.argv[2:])
"""
STAGES = {  # stage: (state it starts from, command)
    "encode": ("fresh", ["encode", "--split", "closed"]),
    "relayout": ("reordered", ["encode", "--split", "closed"]),
    "train": ("encoded", ["train", *SETS]),
    "embed": ("trained", ["embed", "--split", "closed", "--split", "open", *SETS]),
    "score": ("embedded", ["score", *SETS]),
}


def killed(ws, args, kill_at: int) -> int:
    """The command in a fresh process, SIGKILLed just before its commit `kill_at`: its return code."""
    threads = str(torch.get_num_threads())
    r = subprocess.run(
        [sys.executable, "-c", KILLER, threads, str(kill_at), *args, "-C", str(ws)], capture_output=True, timeout=300
    )
    return r.returncode


def run(ws, args) -> int:
    """The command to its end, in this process as `cli` runs every command (a process started for it would
    import torch again): the commits it made."""
    real, count = os.replace, [0]

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)

    os.replace = counting
    try:
        r = cli(ws, *args)
    finally:
        os.replace = real
    assert r.exit_code == 0, r.output
    return count[0]


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """A workspace at each starting state: fresh, encoded, reordered (rows moved), trained, embedded."""
    root = tmp_path_factory.mktemp("faults")
    fresh = synth_workspace(root / "fresh")
    out = {"fresh": fresh}
    for name, before, args in (
        ("encoded", "fresh", ["encode", "--split", "closed", "--split", "open"]),
        ("trained", "encoded", ["train", *SETS]),
        ("embedded", "trained", ["embed", *SETS]),
    ):
        shutil.copytree(out[before], root / name, symlinks=True)
        out[name] = root / name
        assert cli(out[name], *args).exit_code == 0
    shutil.rmtree(next((root / "trained" / "cache" / "results").iterdir()) / "embeddings")
    shutil.copytree(out["encoded"], root / "reordered", symlinks=True)
    manifest = root / "reordered" / "manifests" / "closed.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:3] + list(reversed(lines[3:]))[:-3]) + "\n")
    out["reordered"] = root / "reordered"
    return out


def outputs(ws) -> dict:
    """Every stored number of the workspace, by place: latents, model tensors, embeddings, metrics."""
    got = {}
    for store in sorted((ws / "cache" / "latents").glob("*/*.zarr")):
        g = zarr.open_group(str(store), mode="r")
        got.update({f"{store.parent.name}/{k}": g[k][:] for k in ("mean", "logvar", "latent_hash", "source_hash")})
    for result in sorted((ws / "cache" / "results").glob("*")):
        if (result / "model.safetensors").exists():
            got.update({f"model/{k}": v.numpy() for k, v in load_file(str(result / "model.safetensors")).items()})
        for emb in sorted(result.glob("embeddings/*.zarr")):
            g = zarr.open_group(str(emb), mode="r")
            got.update({f"{emb.name}/{k}": g[k][:] for k in g.array_keys()})
        if (result / "metrics.json").exists():
            got["metrics"] = json.loads((result / "metrics.json").read_text())
            got["report"] = (result / "report.md").read_text()
    return got


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] == b[k], k


def kill_points(commits: int, n: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(1, commits, n)})


def kill_and_resume(states, tmp_path, stage, n_points):
    start, args = STAGES[stage]
    ref = tmp_path / "ref"
    shutil.copytree(states[start], ref, symlinks=True)
    commits = run(ref, args)
    want = outputs(ref)
    tried = 0
    for k in kill_points(commits, n_points):
        ws = tmp_path / f"kill{k}"
        shutil.copytree(states[start], ws, symlinks=True)
        code = killed(ws, args, k)
        assert code == -signal.SIGKILL, f"{stage}: not killed at commit {k} of {commits}"
        run(ws, args)
        assert_same(outputs(ws), want)
        assert cli(ws, "verify").exit_code == 0, f"{stage}, killed at commit {k}"
        tried += 1
        shutil.rmtree(ws)
    print(f"{stage}: {tried} kill points of {commits} commits, {tried} bitwise resumes")
    return tried


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_then_rerun_equals_uninterrupted(states, tmp_path, stage):
    assert kill_and_resume(states, tmp_path, stage, 2) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_many_points(states, tmp_path, stage):
    assert kill_and_resume(states, tmp_path, stage, 12) >= 10
