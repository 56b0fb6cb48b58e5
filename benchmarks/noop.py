"""The no-op at the stat floor (issue 36 item 4): a no-op `encode` and `status`, before and after a change,
alternating, on the workspaces `benchmarks/scale.py --keep --workdir DIR` left, beside the stat floor of the
same files.

    python benchmarks/noop.py --workdir DIR [--sizes 1000,100000,1000000] [--repeats 5] [--before REF]

Each side's code is a snapshot put first on PYTHONPATH (benchmarks/demo.py's `snapshot`: `git archive REF`,
or this working tree), so both run in the same venv on the same workspace (DIR/ws-after-N, encoded and up
to date). Each command is its own process, start-up included: wall time, and CPU seconds from wait4; one
warm-up run of each, then --repeats alternating pairs. The stat floor (scale.py's `stat_floor`) is the
fastest of os.stat in one thread, in 4 threads and in two processes (each keeping or dropping its results)
and `find -printf`, best of 3 each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import CLI, REPO, snapshot  # noqa: E402
from scale import stat_floor  # noqa: E402

COMMANDS = {"no-op encode": ["encode", "--split", "closed"], "status": ["status"]}


def timed(code: Path, ws: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command in its own process; an encode must find nothing to do."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args, "-C", str(ws)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0 or (args[0] == "encode" and b"up to date" not in out):
        raise SystemExit(f"{' '.join(args)} in {ws} ({code}):\n{out.decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="scale.py's --workdir, run with --keep")
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default="HEAD", help="the commit measured beside this working tree")
    ap.add_argument("--root", type=Path, default=REPO / "build" / "noop-bench")
    args = ap.parse_args()
    sides = {"before": snapshot(args.before, args.root / "before"), "after": snapshot("worktree", args.root / "after")}
    print(f"load average at the start: {os.getloadavg()}")
    for n in map(int, args.sizes.split(",")):
        ws = args.workdir / f"ws-after-{n}"
        floor = stat_floor(args.workdir / f"data-{n}")
        print(f"\n{n:,} rows; stat floor " + ", ".join(f"{k} {v:.3f} s" for k, v in floor.items()))
        for name, cmd in COMMANDS.items():
            runs: dict[str, list] = {side: [] for side in sides}
            for code in sides.values():
                timed(code, ws, cmd)
            for _ in range(args.repeats):
                for side, code in sides.items():
                    runs[side].append(timed(code, ws, cmd))
            for side, got in runs.items():
                wall = sorted(w for w, _ in got)
                cpu, mid = statistics.median(c for _, c in got), statistics.median(wall)
                print(
                    f"  {name:13} {side:6}: wall median {mid:.3f} s (min {wall[0]:.3f}, max {wall[-1]:.3f}), "
                    f"CPU median {cpu:.3f} s; median / floor {mid / floor['floor']:.2f}"
                )
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
