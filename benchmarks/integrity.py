"""What checking latent rows costs: reading N rows of SD2.1-sized latents (4 x 32 x 32, float32)
with and without their latent_hash check, side by side in one run, against encoding them.

    python benchmarks/integrity.py [--rows 2048] [--repeats 5]

Reports seconds per 1,000 rows for: reading the rows (zarr), reading and checking them
(latent_store.read_rows), the full check encode makes before reusing a store (row_states), and
the ratio of checking to reading. An SD2.1 encode of the same rows costs ~1.1 s per row on the
2-core CPU used here (RESULTS.md), so that is the scale the check is compared with.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from leakpipe.pipeline.store import latent_store


def build(path: Path, n: int, chunk: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    want = rng.integers(1, 255, (n, 16), dtype=np.uint8)
    group = latent_store.row_arrays(latent_store.create(str(path), n, (4, 32, 32), chunk, "float32", {}))
    for start, stop in latent_store.chunk_bounds(n, chunk):
        rows = np.arange(start, stop)
        latents = {k: rng.standard_normal((stop - start, 4, 32, 32), dtype=np.float32) for k in ("mean", "logvar")}
        latent_store.write_chunk(group, start, stop, rows, latents, want[start:stop])
    return want


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        want = build(store, args.rows, args.chunk)
        group = latent_store.open_store(str(store))
        idx = np.arange(args.rows)
        plain = timed(lambda: [group[k].get_orthogonal_selection((idx,)) for k in ("mean", "logvar")], args.repeats)
        checked = timed(lambda: latent_store.read_rows(group, idx), args.repeats)
        states = timed(lambda: latent_store.row_states(group, want), args.repeats)
    per_k = 1000 / args.rows
    print(
        f"device: CPU ({platform.processor() or platform.machine()}), {args.rows} rows of 4x32x32 float32, "
        f"chunks of {args.chunk}, best of {args.repeats}"
    )
    print("| what | s per 1,000 rows |\n|---|---:|")
    print(f"| read mean + logvar (zarr) | {plain * per_k:.3f} |")
    print(f"| read and check against latent_hash (train, embed) | {checked * per_k:.3f} |")
    print(f"| row_states: the check encode makes before reusing rows | {states * per_k:.3f} |")
    print(
        f"checked / plain read: {checked / plain:.2f}x; row_states per row: {states / args.rows * 1e3:.3f} ms "
        f"(an SD2.1 encode: ~1,100 ms per row on this CPU)"
    )


if __name__ == "__main__":
    main()
