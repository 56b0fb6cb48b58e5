"""How hard the demo's data is for an encoder: a linear probe on the cached z0 of the demo's closed split.

    python benchmarks/demo_difficulty.py [--difficulties 1.0,0.3] [--vaes taef2,random] [--root build/demo-difficulty]

For each difficulty it writes the demo's closed split (DEMO_SPEC with that difficulty, no post-processed
copies, one unseen generator), and for each encoder (taef2: the shipped TAEF2, as `leakpipe demo`; random:
the seeded random VAE of `leakpipe demo --vae random`) encodes it through stage one and fits the report's
linear probe (pipeline/math/probe.py) on the cached train rows; prints its test top-1 with a Wilson 95%
interval, beside chance. What it answers: at which difficulty the demo's numbers are neither at chance nor
at the ceiling for that encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head import cached_z0  # noqa: E402
from leakpipe.pipeline.math.probe import probe  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import encode, graph  # noqa: E402
from leakpipe.workflows import demo  # noqa: E402


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) - half) / d, (p + z * z / (2 * n) + half) / d


def measure(root: Path, difficulty: float, vae: str) -> str:
    ws = Workspace(root / f"{difficulty}-{vae}")
    spec = dataclasses.replace(demo.DEMO_SPEC, difficulty=difficulty, n_open=1, steps=())
    demo.setup(ws, None if vae == "taef2" else demo.RANDOM, spec, log=lambda m: None)
    start = time.perf_counter()
    encode.run(graph(ws, ws.config()), "closed", log=lambda m: None)
    took = time.perf_counter() - start
    ztr, ytr, zte, yte = cached_z0(ws.root)
    right = int((probe(ztr.reshape(len(ztr), -1), ytr, zte.reshape(len(zte), -1)) == yte).sum())
    low, high = wilson(right, len(yte))
    return (
        f"| {difficulty} | {vae} | {tuple(ztr.shape[1:])} | {right / len(yte):.3f} [{low:.3f}, {high:.3f}] | "
        f"{1 / (ytr.max() + 1):.3f} | {len(yte)} | {took:.0f} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--difficulties", default="1.0,0.3")
    ap.add_argument("--vaes", default="taef2", help="taef2 and/or random")
    ap.add_argument("--root", type=Path, default=Path("build/demo-difficulty"))
    args = ap.parse_args()
    lines = [
        "| difficulty | encoder | z0 | probe top-1 [Wilson 95%] | chance | test images | encode s |",
        "|---|---|---|---|---|---|---|",
    ]
    for difficulty in (float(d) for d in args.difficulties.split(",")):
        for vae in args.vaes.split(","):
            lines.append(measure(args.root, difficulty, vae))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
