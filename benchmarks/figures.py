"""The report's figures (issue 36 item 1): seconds per figure of `score`'s `_write_figures`, before and
after a change, side by side in one run, on the inputs of a scored workspace.

    leakpipe demo -C DIR     # once: a scored workspace
    python benchmarks/figures.py --workspace DIR [--run default] [--before HEAD] [--rounds 3]

The figures' inputs (metrics, embeddings, thumbnails, config) are taken in each measuring process from a
scoring of DIR's run (score's `work` up to its outputs, which are not written; the reconstruction baseline
left out, no figure reads it), so nothing is kept between processes. Each side's code is a snapshot put
first on PYTHONPATH (benchmarks/demo.py's `snapshot`: `git archive REF`, or this working tree). Each round
runs both sides, alternating, each in its own process: `_write_figures` once to warm up (fonts, imports),
then twice timed (see `worker`), every figure function wrapped in a timer. Printed: the best of the rounds
per figure and for the whole `_write_figures`, with the ratio, the CPU and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import REPO, env_for, snapshot  # noqa: E402


class _Taken(Exception):
    pass


def capture(workspace: Path, run: str) -> tuple:
    """(m, figs, cfg) as score's `work` hands them to `write_outputs`; nothing is written into the
    workspace (write_outputs is replaced, and no stage runner takes a lock)."""
    from leakpipe.pipeline.ledger.locks import Verdict
    from leakpipe.pipeline.report import outputs
    from leakpipe.pipeline.workspace import Workspace
    from leakpipe.stages import graph, score

    ws = Workspace(workspace)
    cfg = ws.config()
    cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, reconstruction=[]))
    plan = graph(ws, cfg).plan("score", run)
    taken: list = []

    def take(run_dir, m, figs, cfg, prototypes):
        taken.append((m, figs, cfg))
        raise _Taken

    outputs.write_outputs = take
    try:
        score.work(plan, cfg, lambda line: None, Verdict(False, ["benchmarks/figures.py"]))
    except _Taken:
        return taken[0]
    raise RuntimeError("score's work returned without handing over its outputs")


def worker(workspace: Path, run: str, out: Path) -> dict[str, float]:
    """Seconds of each figure function, and of the whole `_write_figures`, after a warm-up pass. The
    figures are timed with the garbage collector off (a full collection between them, untimed): on, it
    runs where the allocations happen to cross its threshold, in whichever figure that is. The whole is
    timed with it on, as in `leakpipe score`."""
    from leakpipe.pipeline.report import explain_figures, figures, outputs

    m, figs, cfg = capture(workspace, run)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        def call(*args, **kwargs):
            if not gc.isenabled():
                gc.collect()
            start = time.perf_counter()
            fn(*args, **kwargs)
            seconds.setdefault(name, time.perf_counter() - start)

        return call

    for module in (figures, explain_figures):
        for name in [n for n in vars(module) if n.endswith("_figure")]:
            setattr(module, name, timed(name, getattr(module, name)))
    out.mkdir(parents=True, exist_ok=True)
    outputs._write_figures(out, dict(m), figs, cfg)  # warm-up
    seconds.clear()
    gc.disable()
    outputs._write_figures(out, dict(m), figs, cfg)
    gc.enable()
    start = time.perf_counter()
    outputs._write_figures(out, dict(m), figs, cfg)
    seconds["_write_figures (all, garbage collector on)"] = time.perf_counter() - start
    seconds["code"] = figures.__file__
    return seconds


def side(code: Path, workspace: Path, run: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--workspace", str(workspace), "--run", run, "--out", str(out)],
        env=env_for(code),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a scored workspace (`leakpipe demo -C DIR`)")
    ap.add_argument("--run", default="default")
    ap.add_argument("--before", default="HEAD", help="the commit measured beside this working tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=REPO / "build" / "figures-bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.workspace, args.run, args.out)))
        return
    sides = {"before": snapshot(args.before, args.root / "before"), "after": snapshot("worktree", args.root / "after")}
    load = [os.getloadavg()]
    best: dict[str, dict[str, float]] = {s: {} for s in sides}
    for _ in range(args.rounds):
        for name, code in sides.items():
            got = side(code, args.workspace, args.run, args.root / f"out-{name}")
            assert got.pop("code").startswith(str(code)), "the snapshot is not what was imported"
            for fig, s in got.items():
                best[name][fig] = min(s, best[name].get(fig, float("inf")))
    load.append(os.getloadavg())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"{cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}; load average {load[0]} -> {load[1]}")
    print(f"best of {args.rounds} rounds, seconds; before = {args.before}, after = this working tree")
    print("| figure | before | after | after / before |\n|---|---|---|---|")
    for fig in sorted(best["before"], key=lambda f: (f.startswith("_"), -best["before"][f])):
        b, a = best["before"][fig], best["after"].get(fig, float("nan"))
        print(f"| {fig} | {b:.3f} | {a:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
