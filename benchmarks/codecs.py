"""Real photos through real codecs and resamplers (`bench/codecs.py`): the forensic pixel baseline, the
old 64-px one, and Proto-LeakNet on the pixels themselves with training crops (vae.source = pixels,
train.crop: `--profile pixels`) beside a linear probe on those pixels, with its training speed against whole images.

    python benchmarks/codecs.py [--n 90] [--size 256] [--seeds 0] [--epochs 20] [--root build/codecs]

The classes (processing chains) show the same crops; the split is by crop. Every top-1 has its 95%
bootstrap interval over test crops (groups); the model is paired with the forensic baseline.
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
from leakpipe.pipeline.bench.codecs import CHAINS, write_codec_set  # noqa: E402
from leakpipe.pipeline.math import bootstrap, metrics  # noqa: E402
from leakpipe.pipeline.report.baselines import forensic_matrix, probe  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import graph

# the recipe is the `pixels` profile (config.PROFILES); the file holds this set's own settings
PIXELS_TOML = """[preprocess]
size = {size}
[encode]
num_workers = 1
[train]
epochs = {epochs}
"""


def interval(correct: np.ndarray, groups: np.ndarray) -> str:
    lo, hi = bootstrap.interval(
        bootstrap.Resamples(2000, 0, groups).of(lambda w: metrics.top1(correct, w), len(correct))
    )
    return f"{correct.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def speed(ws: Workspace, crop: int, steps: int = 3) -> float:
    """Training images per second of one step, through the stage's own loop, with or without crops."""
    import torch

    from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
    from leakpipe.pipeline.engine.trained import build_model
    from leakpipe.pipeline.engine.training import train_epoch

    cfg = ws.config(None, [f"train.crop={crop}", "train.batch_size=32", "train.ema_half_life=0"], "pixels")
    lat = graph(ws, cfg).plan("encode", "closed").data
    rows = np.arange(32 * steps)
    data = LatentRows(lat.store, rows, rows % len(CHAINS), 2**34)
    build = FeatureBuilder(cfg, torch.device("cpu"))
    build.fit_statistics(LatentRows(lat.store, rows[:32], rows[:32] * 0, 2**34), 32)
    torch.manual_seed(0)
    model = build_model(cfg, len(CHAINS), data.latent_shape)
    opt = torch.optim.AdamW(model.parameters())
    train_epoch(model, opt, LatentRows(lat.store, rows[:32], rows[:32] % 6, 2**34), build, cfg.train, 1)  # warm
    start = time.perf_counter()
    train_epoch(model, opt, data, build, cfg.train, 2)
    return len(rows) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=90, help="crops (each through every chain)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--root", default="build/codecs")
    args = ap.parse_args()
    import torch

    from leakpipe.stages import embed, encode, score, train

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        flush=True,
    )
    root = Path(args.root).resolve()
    if not (root / "manifests" / "closed.csv").exists():
        write_codec_set(root / "data", root / "manifests", args.n, args.size)
        (root / "leakpipe.toml").write_text(PIXELS_TOML.format(size=args.size, epochs=args.epochs))
    m = mf.read_manifest(root / "manifests" / "closed.csv")
    part, labels = np.array(m.column("partition")), np.array(m.column("label"))
    groups = np.array(m.column("group"))
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    tr, te = part == "train", part == "test"
    paths = [m.abspath(i) for i in range(len(m))]
    start = time.perf_counter()
    x = forensic_matrix(paths, 512, 10**9)
    per_image = (time.perf_counter() - start) / len(paths)
    low = np.stack([pixel_features(p) for p in paths])
    right = {"forensic": probe(x[tr], y[tr], x[te]) == y[te], "64px": probe(low[tr], y[tr], low[te]) == y[te]}
    lines = [
        f"{len(classes)} chains ({', '.join(classes)}) x {args.n} crops of {args.size} px; "
        f"{int(te.sum())} test images; chance {1 / len(classes):.3f}",
        "",
        "| classifier | top-1 [95% interval] | forensic minus this (paired) |",
        "|---|---:|---:|",
        f"| forensic pixel baseline ({per_image * 1000:.0f} ms per image for its features) | "
        f"{interval(right['forensic'], groups[te])} | |",
        f"| old 64-px pixel baseline | {interval(right['64px'], groups[te])} | |",
    ]
    ws = Workspace(root)
    encode.run(graph(ws, ws.config(profile="pixels")), "closed", log=lambda s: None)
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = ws.config(
            None, [f"train.seed={seed}", "score.open=", "score.postprocessed=[]", "score.bootstrap=2000"], "pixels"
        )
        run = f"pixels-seed{seed}"
        t = time.perf_counter()
        train.run(graph(ws, cfg), run, log=print)
        trained = time.perf_counter() - t
        embed.run(graph(ws, cfg), run, log=lambda s: None, splits=["closed"])
        b = score.run(graph(ws, cfg), run, log=lambda s: None).metrics["baselines"]
        d = b["head_minus_forensic"]
        if seed == int(args.seeds.split(",")[0]):
            z = b["z0_probe"]
            lines.append(
                f"| linear probe on the pixels (z0) | {z['top1']:.3f} [{z['ci']['top1'][0]:.3f}, "
                f"{z['ci']['top1'][1]:.3f}] | |"
            )
        lines.append(
            f"| Proto-LeakNet on pixels, 64-px crops, tiled evaluation, seed {seed} ({trained:.0f} s "
            f"training) | {b['head']['top1']:.3f} [{b['head']['ci']['top1'][0]:.3f}, "
            f"{b['head']['ci']['top1'][1]:.3f}] | {-d['difference']:+.3f} [{-d['ci'][1]:+.3f}, "
            f"{-d['ci'][0]:+.3f}] |"
        )
        print(lines[-1], flush=True)
    whole, crops = speed(ws, 0), speed(ws, 64)
    lines += [
        "",
        f"Training speed, one epoch of 96 images through the stage's loop, side by side: whole "
        f"{args.size}-px images {whole:.1f} img/s, 64-px crops {crops:.1f} img/s ({crops / whole:.1f}x).",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
