"""Synthetic benchmark: generation speed, and the pixel baseline across difficulty and steps.

    python benchmarks/synth.py [--speed-images 1000] [--size 256] [--difficulties 0.5,1,2,4]

Prints the time to generate N images of SIZE x SIZE with all cores (worker processes), and a
table of the pixel baseline's test top-1 (logistic regression on channel means + low-frequency
DCT) for each difficulty and post-processing step, 10 closed generators.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leakpipe.pipeline import manifest as mf  # noqa: E402
from leakpipe.pipeline.bench.baseline import train_test_accuracy  # noqa: E402
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark  # noqa: E402


def speed(n: int, size: int, tmp: Path) -> str:
    spec = SynthSpec(n_closed=10, n_open=0, per_generator=n // 10, size=size, steps=())
    t = time.perf_counter()
    write_benchmark(tmp / "speed", tmp / "speed-m", spec)
    took = time.perf_counter() - t
    return f"generate {n} images {size}x{size}: {took:.1f} s ({n / took:.0f} img/s), {os.cpu_count()} cores"


def table(difficulties, per: int, size: int, tmp: Path) -> list[str]:
    lines = ["| difficulty | raw | step1 | step2 | step3 |", "|---|---|---|---|---|"]
    for d in difficulties:
        out = tmp / f"d{d}"
        write_benchmark(out, out / "m", SynthSpec(10, 0, per, size, d, 0, (1, 2, 3)))
        closed = mf.read_manifest(out / "m" / "closed.csv")
        acc = train_test_accuracy(closed, {"c": closed, "p": mf.read_manifest(out / "m" / "closed-pp.csv")})
        cells = [acc["c:raw"]] + [acc[f"p:step{k}"] for k in (1, 2, 3)]
        lines.append(f"| {d} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed-images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--table-size", type=int, default=128)
    ap.add_argument("--per-generator", type=int, default=100)
    ap.add_argument("--difficulties", default="0.5,1,2,4")
    args = ap.parse_args()
    print(
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        print(speed(args.speed_images, args.size, Path(tmp)), flush=True)
        lines = table([float(d) for d in args.difficulties.split(",")], args.per_generator, args.table_size, Path(tmp))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
