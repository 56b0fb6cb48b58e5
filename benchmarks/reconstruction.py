"""The decoder-rendered synthetic family (`leakpipe synth --family decoder`) and the reconstruction
baseline's features, measured: per difficulty, the top-1 of a logistic regression (the report's probe)
on each kind of feature, fitted on the closed training rows and scored on the test rows with 95%
bootstrap intervals: the forensic pixel baseline, the old 64-px pixel baseline, the linear probe on
the shipped encoder's latents (what stage one's z0 probe reads), and the reconstruction baseline's
candidate distances to the round trip through the shipped autoencoder (per octave band, SSIM, the
latents' distance, absolute or relative to the image's own power, and together). Also the rendering
speed and the round trip's cost per image.

    python benchmarks/reconstruction.py [--closed 6] [--per-generator 40] [--size 64]
                                        [--difficulties 0.5,1,2] [--seed 0] [--root build/reconstruction]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leakpipe.pipeline import manifest as mf  # noqa: E402
from leakpipe.pipeline.bench.baseline import pixel_features  # noqa: E402
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark  # noqa: E402
from leakpipe.pipeline.config import VaeConfig  # noqa: E402
from leakpipe.pipeline.engine.autoencoders import load_autoencoder  # noqa: E402
from leakpipe.pipeline.engine.vae import resolve  # noqa: E402
from leakpipe.pipeline.math import bootstrap, metrics, reconstruction as recon  # noqa: E402
from leakpipe.pipeline.report.baselines import forensic_matrix, probe, round_trips  # noqa: E402


def interval(correct: np.ndarray, groups: np.ndarray) -> str:
    lo, hi = bootstrap.interval(
        bootstrap.Resamples(2000, 0, groups).of(lambda w: metrics.top1(correct, w), len(correct))
    )
    return f"{correct.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def features(paths: list, ae) -> dict[str, np.ndarray]:
    """Every candidate's features of the files, and the seconds per image of the round trip."""
    start = time.perf_counter()
    trips = list(round_trips(paths, ae, 512, 10**9))
    per_image = (time.perf_counter() - start) / len(paths)
    out = {
        "band_abs": np.stack([recon.band_power(x - y) for x, y, _, _ in trips]),
        "band": np.stack([recon.band_errors(x, y) for x, y, _, _ in trips]),
        "ssim": np.stack([recon.ssim(x, y) for x, y, _, _ in trips]),
        "latent_abs": np.stack([np.log(((z - z2) ** 2).mean((1, 2)) + 1e-12) for _, _, z, z2 in trips]),
        "latent": np.stack([recon.latent_distance(z, z2) for _, _, z, z2 in trips]),
        "z0": np.stack([z.ravel() for _, _, z, _ in trips]),
    }
    out["all_abs"] = np.concatenate([out["band_abs"], out["ssim"], out["latent_abs"]], axis=1)
    out["all"] = np.concatenate([out["band"], out["ssim"], out["latent"]], axis=1)  # the report's
    return out, per_image


ROWS = [
    ("forensic", "forensic pixel baseline"),
    ("64px", "old 64-px pixel baseline"),
    ("z0", "linear probe on the encoder's latents (z0)"),
    ("band_abs", "reconstruction: residual power per octave band and channel"),
    ("band", "reconstruction: the same relative to the image's own power"),
    ("ssim", "reconstruction: SSIM per channel"),
    ("latent_abs", "reconstruction: latents' squared distance per channel"),
    ("latent", "reconstruction: the same relative to the latent's own"),
    ("all_abs", "reconstruction: the three absolute distances"),
    ("all", "reconstruction: the three relative ones (the report's baseline)"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--closed", type=int, default=6)
    ap.add_argument("--per-generator", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--difficulties", default="0.5,1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-latent-noise", action="store_true")
    ap.add_argument("--root", default="build/reconstruction")
    args = ap.parse_args()
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    ae = load_autoencoder(resolve(VaeConfig(source="builtin:taef2")))
    table = {}
    for difficulty in (float(d) for d in args.difficulties.split(",")):
        spec = SynthSpec(
            args.closed, 0, args.per_generator, args.size, difficulty, args.seed, (), "decoder",
            not args.no_latent_noise,
        )  # fmt: skip
        root = Path(args.root).resolve() / f"d{difficulty:g}-s{args.seed}-n{args.closed}x{args.per_generator}"
        start = time.perf_counter()
        if not (root / "manifests" / "closed.csv").exists():
            write_benchmark(root / "data", root / "manifests", spec, autoencoder=ae)
            n = args.closed * args.per_generator
            print(f"rendered {n} images of {args.size} px in {time.perf_counter() - start:.1f} s", flush=True)
        m = mf.read_manifest(root / "manifests" / "closed.csv")
        part, labels = np.array(m.column("partition")), np.array(m.column("label"))
        classes = sorted(set(labels))
        y = np.array([classes.index(c) for c in labels])
        tr, te = part == "train", part == "test"
        paths = [m.abspath(i) for i in range(len(m))]
        x, per_image = features(paths, ae)
        x["forensic"] = forensic_matrix(paths, 512, 10**9)
        x["64px"] = np.stack([pixel_features(p) for p in paths])
        groups = np.arange(int(te.sum()))
        table[difficulty] = {k: interval(probe(x[k][tr], y[tr], x[k][te]) == y[te], groups) for k, _ in ROWS}
        print(f"difficulty {difficulty:g}: round trip {per_image * 1000:.0f} ms per image", flush=True)
        print(table[difficulty], flush=True)
    diffs = list(table)
    print(
        f"\n{args.closed} generators x {args.per_generator} images of {args.size} px (decoder family, seed "
        f"{args.seed}, latent noise {'off' if args.no_latent_noise else 'on'}); chance {1 / args.closed:.3f}\n"
    )
    print("| features | " + " | ".join(f"difficulty {d:g}" for d in diffs) + " |")
    print("|---|" + "---:|" * len(diffs))
    for key, name in ROWS:
        print(f"| {name} | " + " | ".join(table[d][key] for d in diffs) + " |")


if __name__ == "__main__":
    main()
