"""`leakpipe demo` from an empty folder, before and after a change, side by side in one run.

    python benchmarks/demo.py [--before REF] [--after REF|worktree] [--repeats 1] [--root build/demo-bench]
                              [--profile] [--imports 5]

Each side's code is a snapshot (`git archive REF`, or a copy of this working tree), put first on
PYTHONPATH, so edits made while it runs change nothing and both sides run in the same venv. The runs
alternate (before, after, before, ...), each `/usr/bin/time -v leakpipe demo -C DIR` in a fresh folder.
Phases come from the time each log line appeared: start-up and synth (to the `synth:` line), the demo
VAE and encode (to the train line), train (to the first embed line; per epoch from the `epoch N:`
lines), embed and score (to the end). Also: peak RSS, the closed test top-1 and the open-set AUROC
(gating off) with their intervals from the run's metrics.json, the load average before and after, and
the start-up import time of `leakpipe --help` and of the demo's modules (median of --imports runs).
--profile records each run with py-spy (installed beside python) and adds its main-thread CPU samples
by phase (train forward, backward, optimizer, precise BatchNorm, validation, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "workflows")
# py-spy stacks: the first label whose substring the stack holds
PROFILE_GROUPS = (
    ("imports", "_find_and_load"),
    ("train: backward", "backward (torch"),
    ("train: optimizer", "step (torch/optim"),
    ("train: optimizer", "GradScaler.step"),
    ("train: precise BatchNorm", "recalibrate_batchnorm"),
    ("train: validation outputs", "_validate"),
    ("train: feature statistics", "fit_statistics"),
    ("train: forward and the rest of a step", "train_epoch"),
    ("train: checkpoint", "save_checkpoint"),
    ("train: other", "fit (pipeline/engine/fit.py"),
    ("embed", "stages/embed"),
    ("score", "stages/score"),
    ("encode", "stages/encode"),
    ("synth", "write_benchmark"),
)


def snapshot(ref: str, dest: Path) -> Path:
    """The package's code at `ref` (a commit, or "worktree": the files as they are now) under dest/leakpipe."""
    pkg = dest / "leakpipe"
    shutil.rmtree(dest, ignore_errors=True)
    pkg.mkdir(parents=True)
    if ref == "worktree":
        for name in PACKAGES:
            shutil.copytree(REPO / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, *PACKAGES], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
    return dest


def env_for(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}


CLI = "from leakpipe.pipeline.cli import main; main()"


def import_seconds(code: Path, repeats: int) -> dict[str, float]:
    """Median wall seconds of `leakpipe --help` and of importing what `leakpipe demo` imports first."""
    out = {}
    for label, args in (
        ("leakpipe --help", ["-c", CLI, "--help"]),
        ("demo's imports", ["-c", "import leakpipe.pipeline.cli, leakpipe.workflows.demo"]),
    ):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, *args], env=env_for(code), capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        out[label] = float(np.median(times))
    return out


def run_demo(code: Path, ws: Path, profile: Path | None) -> dict:
    """One `leakpipe demo -C ws` from an empty folder: (seconds, line) pairs, peak RSS, metrics."""
    shutil.rmtree(ws, ignore_errors=True)
    cmd = [sys.executable, "-c", CLI, "demo", "-C", str(ws)]
    if profile is not None:
        spy = Path(sys.executable).parent / "py-spy"
        cmd = [str(spy), "record", "-r", "50", "-f", "raw", "-o", str(profile), "--", *cmd]
    timing = ws.parent / f"{ws.name}.time"
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", "-o", str(timing), *cmd],
        env=env_for(code),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait():
        sys.exit(f"demo failed in {ws}:\n" + "\n".join(line for _, line in lines[-30:]))
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text())
    return {
        "lines": lines,
        "wall": time.perf_counter() - start,
        "rss_gb": int(rss.group(1)) / 2**20 if rss and profile is None else float("nan"),
        "load": (load[0], os.getloadavg()[0]),
        "metrics": json.loads((ws / "cache" / "runs" / "default" / "metrics.json").read_text()),
    }


def phases(run: dict) -> dict[str, float]:
    """Seconds per phase, from when the marking log lines appeared."""
    lines = run["lines"]

    def first(pattern: str) -> float:
        return next((t for t, line in lines if re.search(pattern, line)), float("nan"))

    synth, train, embed = first(r"^synth: "), first(r"^train default: training"), first(r"^embed ")
    epochs = [t for t, line in lines if re.match(r"epoch \d+: loss", line)]
    return {
        "start-up and synth": synth,
        "demo VAE and encode": train - synth,
        "train": embed - train,
        "  of which per epoch (median)": float(np.median(np.diff([train, *epochs]))) if epochs else float("nan"),
        "  epochs": float(len(epochs)),
        "embed and score": run["wall"] - embed,
        "total (wall)": run["wall"],
    }


def quality(run: dict) -> dict[str, str]:
    m = run["metrics"]
    head, auroc = m["closed"]["raw"]["head"], m["open"]["gating_off"]
    lo, hi = head["ci"]["top1"]
    alo, ahi = auroc["ci"]["auroc"]
    return {
        "closed test top-1": f"{head['top1']:.3f} [{lo:.3f}, {hi:.3f}]",
        "open-set AUROC (gating off)": f"{auroc['auroc']:.3f} [{alo:.3f}, {ahi:.3f}]",
    }


def profile_table(paths: list[Path]) -> dict[str, float]:
    """Share of the main thread's CPU samples per group, over the runs' py-spy records."""
    counts, total = collections.Counter(), 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if "Command.main" not in stack:  # other threads: zarr's, decode workers' feeders
                continue
            total += int(n)
            counts[next((label for label, key in PROFILE_GROUPS if key in stack), "other")] += int(n)
    return {label: 100 * n / max(total, 1) for label, n in counts.most_common()}


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="b90e126", help="commit of the code before (default: before issue 36)")
    ap.add_argument("--after", default="worktree", help="commit of the code after, or worktree")
    ap.add_argument("--repeats", type=int, default=1, help="demo runs per side, alternating")
    ap.add_argument("--root", default="build/demo-bench")
    ap.add_argument("--profile", action="store_true", help="record each run with py-spy (no peak RSS then)")
    ap.add_argument("--imports", type=int, default=5, help="runs of each start-up import timing")
    args = ap.parse_args()
    import torch

    root = Path(args.root).resolve()
    sides = {"before": args.before, "after": args.after}
    code = {side: snapshot(ref, root / "code" / side) for side, ref in sides.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(
        f"machine: {cpu or platform.processor()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; before = {args.before}, after = {args.after}",
        flush=True,
    )
    imports = {side: import_seconds(code[side], args.imports) for side in sides}
    runs = {side: [] for side in sides}
    spies = {side: [] for side in sides}
    for k in range(args.repeats):
        for side in sides:
            spy = root / f"{side}-{k}.pyspy" if args.profile else None
            runs[side].append(run_demo(code[side], root / f"{side}-{k}", spy))
            spies[side] += [spy] if spy else []
            r = runs[side][-1]
            print(f"{side} run {k}: {r['wall']:.1f} s, load {r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)
    out = [f"start-up, median of {args.imports} runs (s):", ""]
    out += table(
        ["command", "before", "after", "after / before"],
        [
            [
                k,
                f"{imports['before'][k]:.2f}",
                f"{imports['after'][k]:.2f}",
                f"{imports['after'][k] / imports['before'][k]:.2f}",
            ]
            for k in imports["before"]
        ],
    )
    for k in range(args.repeats):
        ph = {side: phases(runs[side][k]) for side in sides}
        q = {side: quality(runs[side][k]) for side in sides}
        rows = [
            [p, f"{ph['before'][p]:.1f}", f"{ph['after'][p]:.1f}", f"{ph['after'][p] / ph['before'][p]:.2f}"]
            for p in ph["before"]
        ]
        rows.append(["peak RSS (GB)", *(f"{runs[s][k]['rss_gb']:.2f}" for s in sides), ""])
        rows.append(
            [
                "load average (1 min) before -> after",
                *("{:.2f} -> {:.2f}".format(*runs[s][k]["load"]) for s in sides),
                "",
            ]
        )
        rows += [[key, q["before"][key], q["after"][key], ""] for key in q["before"]]
        out += ["", f"run {k} (seconds):", ""] + table(["phase", "before", "after", "after / before"], rows)
    if args.profile:
        prof = {side: profile_table(spies[side]) for side in sides}
        labels = list(dict.fromkeys([*prof["before"], *prof["after"]]))
        out += ["", "py-spy, share of the main thread's CPU samples (%):", ""]
        out += table(
            ["group", "before", "after"],
            [[g, f"{prof['before'].get(g, 0):.1f}", f"{prof['after'].get(g, 0):.1f}"] for g in labels],
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
