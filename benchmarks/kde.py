"""leakpipe's torch KDE against scikit-learn's KernelDensity: time ratio and max difference.

    python benchmarks/kde.py [--n 5000] [--dims 128,512] [--bandwidths 0.5,1,2,4] [--device cpu]

Both score n queries against n references. The reference for the difference is a direct float64
numpy log-sum-exp on a subset of queries (scikit-learn's tree KDE drifts at small bandwidths in high
dimension, its issue #25799, so "difference to sklearn" alone would not say who is wrong).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.neighbors import KernelDensity

from leakpipe.pipeline.math.kde import GaussianKDE


def direct(q, x, h):
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    return logsumexp(-d2 / (2 * h * h), axis=1) - np.log(len(x)) - 0.5 * x.shape[1] * np.log(2 * np.pi * h * h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--bandwidths", default="0.5,1,2,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check", type=int, default=200, help="queries checked against numpy float64")
    a = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {a.device}, n = {a.n} references and queries"
    )
    print(
        "| D | h | leakpipe s | sklearn s | speed-up | max abs diff leakpipe vs numpy | max abs diff sklearn vs numpy |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    r = np.random.default_rng(0)
    for d in map(int, a.dims.split(",")):
        x, q = r.normal(size=(a.n, d)), r.normal(size=(a.n, d))
        for h in map(float, a.bandwidths.split(",")):
            t = time.perf_counter()
            ours = GaussianKDE(bandwidth=h, device=a.device).fit(x).score_samples(q)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            theirs = KernelDensity(bandwidth=h).fit(x).score_samples(q)
            t_sk = time.perf_counter() - t
            ref = direct(q[: a.check], x, h)
            print(
                f"| {d} | {h:g} | {t_ours:.2f} | {t_sk:.2f} | {t_sk / t_ours:.0f}x | "
                f"{np.abs(ours[: a.check] - ref).max():.1e} | {np.abs(theirs[: a.check] - ref).max():.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
