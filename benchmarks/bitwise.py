"""Bitwise: one small workspace encoded, trained, embedded and scored by leakpipe at REV and by this checkout.

    nice -n 10 .venv/bin/python benchmarks/bitwise.py --before REV [--root build/bitwise] [--epochs 2]

The evidence for an upgrade of code identity (ledger/code_upgrades.json, docs/developer.md "Code
identity"): units edited since REV whose outputs are the same bit for bit. The workspace (synthetic
images through `leakpipe synth`, a seeded random VAE through `leakpipe vae random`, 32 px, fp32 on the
CPU) is made once by this checkout, then copied for each side; each side runs `leakpipe encode` (splits
closed and open) and `leakpipe train` (runs `leakpipe` and `paper`, one per profile; train embeds every
encoded split) in its own copy, REV's code a `git archive` snapshot first on PYTHONPATH, in a
subprocess, and each side scores the run `leakpipe`. Printed: one line per artefact (each split's
latent store arrays, each run's model.safetensors and embeddings, the scored run's metrics.json,
report.md, scores and figures as bytes), equal or differs with the largest absolute difference; then
what this checkout's `leakpipe status` says of REV's workspace: the stages it would run again, and why.
Exit status 1 if an artefact differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import CLI, env_for, snapshot  # noqa: E402

SPLITS = ("closed", "open")
RUNS = ("leakpipe", "paper")  # each trained with the profile of its name
CONFIG = """[vae]
source = "./vae"
dtype = "float32"
[preprocess]
size = 32
[encode]
num_workers = 0
[compute]
device = "cpu"
precision = "fp32"
[model]
stem = "imagenet"
[train]
epochs = {epochs}
batch_size = 16
[score]
bootstrap = 50
kde_folds = 2
"""


def leakpipe(code: Path, ws: Path | None, *args: str) -> str:
    """`leakpipe ARGS -C ws` with the package at `code`: its output, or exit with it on a failure."""
    cmd = [sys.executable, "-c", CLI, *args, *(("-C", str(ws)) if ws else ())]
    p = subprocess.run(cmd, env=env_for(code), capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"`leakpipe {' '.join(args)}` failed in {ws}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout


def make_workspace(code: Path, ws: Path, epochs: int) -> None:
    """3 + 2 generators x 12 images of 32 px, no post-processed copies, a random VAE of 2 blocks at ./vae."""
    ws.mkdir(parents=True)
    synth = ("--closed", "3", "--open", "2", "--per-generator", "12", "--size", "32", "--difficulty", "0.1")
    leakpipe(code, ws, "synth", *synth, "--steps", "", "--workers", "1")
    leakpipe(code, None, "vae", "random", str(ws / "vae"), "--blocks", "8,16", "--seed", "0")
    (ws / "leakpipe.toml").write_text(CONFIG.format(epochs=epochs))


def run_side(code: Path, ws: Path) -> None:
    leakpipe(code, ws, "encode", *(a for s in SPLITS for a in ("--split", s)))
    for run in RUNS:
        leakpipe(code, ws, "train", "--run", run, "--profile", run)
    leakpipe(code, ws, "score", "--run", RUNS[0])


SCORED = ("metrics.json", "report.md", "open_scores.safetensors", "calibration.safetensors")  # and figures/*


def artefacts(ws: Path) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """{artefact: (its folder's name, {array name: values})}: each split's latent store (its folder is
    named by the encoder fingerprint), each run's weights and embeddings (its result folder)."""
    out = {}
    for split in SPLITS:
        (store,) = (ws / "cache" / "latents" / split).glob("*.zarr")  # one encoder, so one store
        out[f"latents {split}"] = (store.name, _arrays(store))
    for run in RUNS:
        result = (ws / "cache" / "runs" / run).resolve()
        out[f"weights {run}"] = (result.name, load_file(str(result / "model.safetensors")))
        for split in SPLITS:
            out[f"embeddings {run} {split}"] = (result.name, _arrays(result / "embeddings" / f"{split}.zarr"))
    result = (ws / "cache" / "runs" / RUNS[0]).resolve()  # score's files, as bytes
    scored = [p for p in sorted(result.rglob("*")) if p.is_file() and (p.name in SCORED or p.parent.name == "figures")]
    out[f"score {RUNS[0]}"] = (result.name, {str(p.relative_to(result)): np.fromfile(p, np.uint8) for p in scored})
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {name: a[...] for name, a in zarr.open_group(str(path), mode="r").arrays()}


def compare(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> str:
    """'equal' if every array has the same dtype, shape and bytes; else what differs."""
    if before.keys() != after.keys():
        return f"differs: arrays {sorted(before.keys() ^ after.keys())} on one side only"
    worst = {}
    for name, b in before.items():
        a = after[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"differs: {name} is {b.dtype}{b.shape} before, {a.dtype}{a.shape} after"
        if a.tobytes() != b.tobytes():
            worst[name] = (
                float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.dtype.kind == "f" else -1
            )
    if not worst:
        return "equal"
    name = max(worst, key=worst.get)
    which = ", ".join(sorted(worst))
    return f"differs in {len(worst)} of {len(before)} arrays ({which}); max abs diff {worst[name]:.3g} ({name})"


def stale(code: Path, ws: Path) -> list[str]:
    """What `leakpipe status` with the package at `code` says is stale in ws, with its reasons: each run
    as status sees it under its own profile, the stores under the first."""
    lines = []
    for run in RUNS:
        for e in json.loads(leakpipe(code, ws, "status", "--json", "--profile", run)):
            mine = e["name"].split("/")[0] == run if e["stage"] != "encode" else run == RUNS[0]
            if mine and not e["up_to_date"]:
                lines.append(f"{e['stage']} {e['name']}: {'; '.join(e.get('reasons', []))}")
    return [line if len(line) < 400 else f"{line[:400]} ... ({len(line)} characters)" for line in lines]


def cpu_model() -> str:
    lines = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    return f"{lines[0].split(':', 1)[1].strip()} x {len(lines)}" if lines else platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the git revision to compare this checkout with")
    ap.add_argument("--root", type=Path, default=Path("build/bitwise"), help="scratch folder (emptied)")
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    shutil.rmtree(a.root, ignore_errors=True)
    codes = {"before": snapshot(a.before, a.root / "code-before"), "after": snapshot("worktree", a.root / "code-after")}
    print(f"# {cpu_model()}, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
    make_workspace(codes["after"], a.root / "base", a.epochs)
    got = {}
    for side, code in codes.items():
        shutil.copytree(a.root / "base", a.root / side, symlinks=True)
        run_side(code, a.root / side)
        got[side] = artefacts(a.root / side)
    differs = False
    for name, (folder, before) in got["before"].items():
        folder_after, after = got["after"][name]
        verdict = compare(before, after)
        differs |= verdict != "equal"
        print(f"{name}: {verdict} (folder {folder} before, {folder_after} after)")
    print(f"status of {a.before}'s workspace by this checkout:")
    print(
        "\n".join(f"  stale: {line}" for line in stale(codes["after"], a.root / "before")) or "  everything up to date"
    )
    print(f"# load {os.getloadavg()[0]:.1f}")
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()
