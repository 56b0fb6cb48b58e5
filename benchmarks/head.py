"""Where the gap to the z0 probe comes from, on the cached z0 of benchmarks/recipe.py's workspaces.

    python benchmarks/head.py [--sets demo,synth-b,synth-c] [--root build/recipe] [--seeds 0,1,2]

Two questions, each answered with the probe's own test rows (closed train / test partitions):
1. Which features of z0 carry the generator: the linear probe on z0 flattened (where each value sits)
   against translation-invariant summaries (channel means and stds, |FFT|), which is what a backbone
   that pools over positions sees most easily, and the DCT_low block (k = 8) that model.dct_readout reads.
2. What the prototype head does to a linear embedding of those features: h = W vec(z0) (D = 128, M = 4
   prototypes per class, Eq. 9-11 with w = 1), trained like the recipe (AdamW lr 1e-3, label smoothing
   0.1, batch 64, 30 epochs) with prototypes drawn at model.prototype_std = 0.5 (the paper's here) or
   0.01 (the authors' code), beside a linear softmax on the same features. The first-epoch loss shows
   where training starts against ln C.
3. What the readout should read (model.dct_readout, model.latent_readout, features.latent_stats): the
   head of question 2 (prototype_std 0.01) on z0 flattened standardised per position (as the probe) or
   per channel (one mean and std per channel, as f_t's z_t channels were), on the DCT_low block
   (per coefficient), and on the block beside z0 per position (the default readout).
Top-1 is over the closed test rows; seeds are the training seeds of questions 2 and 3.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leakpipe.pipeline.math.probe import probe  # noqa: E402
from leakpipe.pipeline.store import latent_store  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import graph  # noqa: E402


def cached_z0(root: Path):
    """(train z0, train labels, test z0, test labels) of the closed manifest, as cached by encode."""
    ws = Workspace(root)
    lat = graph(ws, ws.config()).plan("encode", "closed").data
    store, rows = latent_store.open_store(lat.store), lat.manifest.rows
    classes = sorted({r["label"] for r in rows if r["partition"] == "train"})
    out = []
    for part in ("train", "test"):
        idx = np.array([i for i, r in enumerate(rows) if r["partition"] == part])
        out += [latent_store.read_rows(store, idx)["mean"], np.array([classes.index(rows[i]["label"]) for i in idx])]
    return out


def summaries(z: np.ndarray) -> dict[str, np.ndarray]:
    """The feature sets of question 1, (N, F) each."""
    import torch

    from leakpipe.pipeline.math.dct import dct2

    n = len(z)
    return {
        "z0 flattened (the probe)": z.reshape(n, -1),
        "DCT_low block, k = 8": dct2(torch.from_numpy(z)).numpy()[..., :8, :8].reshape(n, -1),
        "channel means": z.mean((2, 3)),
        "channel means and stds": np.concatenate([z.mean((2, 3)), z.std((2, 3))], 1),
        "|FFT| (translation-invariant)": np.log(np.abs(np.fft.fft2(z)) + 1e-6).reshape(n, -1),
    }


def per_channel(ztr: np.ndarray, zte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z0 (N, C, h, w) standardised with one mean and std per channel over the training rows, flattened."""
    mu, sd = ztr.mean((0, 2, 3), keepdims=True), ztr.std((0, 2, 3), keepdims=True)
    return tuple(((z - mu) / sd).reshape(len(z), -1) for z in (ztr, zte))


def prototype_head(xtr, ytr, xte, yte, head: str, std: float, seed: int, epochs: int = 30, standardise=True):
    """(test top-1, first-epoch mean loss) of a linear embedding with prototypes (or a linear softmax),
    on the features standardised per feature (or as given, `standardise` false)."""
    import torch
    import torch.nn.functional as F

    from leakpipe.pipeline.nn.model import class_logits, prototype_distances, soft_min_distance

    torch.manual_seed(seed)
    mu, sd = (xtr.mean(0), xtr.std(0) + 1e-8) if standardise else (0.0, 1.0)
    a, b = (torch.from_numpy((x - mu) / sd).float() for x in (xtr, xte))
    y, c = torch.from_numpy(ytr), int(ytr.max()) + 1
    if head == "linear":
        lin = torch.nn.Linear(a.shape[1], c)
        params, logits = list(lin.parameters()), lin
    else:
        lin = torch.nn.Linear(a.shape[1], 128)
        protos = torch.nn.Parameter(torch.randn(c, 4, 128) * std)
        params = [*lin.parameters(), protos]

        def logits(x):
            h = lin(x)
            return class_logits(soft_min_distance(prototype_distances(h, torch.ones_like(h), protos), 1.0))

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    first = []
    for epoch in range(epochs):
        for idx in torch.randperm(len(a)).split(64):
            loss = F.cross_entropy(logits(a[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first += [loss.item()] if epoch == 0 else []
    with torch.no_grad():
        return float((logits(b).argmax(1).numpy() == yte).mean()), float(np.mean(first))


def report(name: str, root: Path, seeds: list[int]) -> list[str]:
    ztr, ytr, zte, yte = cached_z0(root)
    c = int(ytr.max()) + 1
    lines = [
        f"### {name}: {len(ytr)} train / {len(yte)} test images, z0 {ztr.shape[1:]}, chance {1 / c:.3f}",
        "",
        f"The VAE's z0 means have std {ztr.std():.4f}: latent.scale {1 / ztr.std():.3g} gives z0 unit variance.",
        "",
    ]
    lines += ["| features of z0 | probe top-1 |", "|---|---:|"]
    tr, te = summaries(ztr), summaries(zte)
    for key in tr:
        lines.append(f"| {key} | {(probe(tr[key], ytr, te[key]) == yte).mean():.3f} |")
    lines += ["", f"Heads on h = W vec(z0), {len(seeds)} seeds (ln C = {math.log(c):.2f}):", ""]
    lines += ["| head | top-1 (mean +- sd) | first-epoch loss |", "|---|---:|---:|"]
    for label, head, std in (
        ("linear softmax", "linear", 0.0),
        ("prototypes, prototype_std 0.5", "prototypes", 0.5),
        ("prototypes, prototype_std 0.01", "prototypes", 0.01),
    ):
        xtr, xte = ztr.reshape(len(ztr), -1), zte.reshape(len(zte), -1)
        top, loss = np.array([prototype_head(xtr, ytr, xte, yte, head, std, s) for s in seeds]).T
        sd = top.std(ddof=1) if len(top) > 1 else 0.0
        lines.append(f"| {label} | {top.mean():.3f} +- {sd:.3f} | {loss.mean():.2f} |")
    return lines + [""] + readout_inputs(ztr, ytr, zte, yte, tr, te, seeds)


def readout_inputs(ztr, ytr, zte, yte, tr: dict, te: dict, seeds: list[int]) -> list[str]:
    """Question 3: the prototype head (prototype_std 0.01) on what a readout could read."""
    dct = "DCT_low block, k = 8"
    flat = "z0 flattened (the probe)"
    inputs = {
        "z0, per position (model.latent_readout, features.latent_stats = per_position)": (tr[flat], te[flat], True),
        "z0, per channel (features.latent_stats = per_channel)": (*per_channel(ztr, zte), False),
        "DCT_low block, per coefficient (model.dct_readout alone)": (tr[dct], te[dct], True),
        "DCT_low block and z0, per position (the default readout)": (
            np.concatenate([tr[dct], tr[flat]], 1),
            np.concatenate([te[dct], te[flat]], 1),
            True,
        ),
    }
    lines = ["Prototype head (prototype_std 0.01) on what the readout reads:", ""]
    lines += ["| readout input | top-1 (mean +- sd) |", "|---|---:|"]
    for label, (a, b, standardise) in inputs.items():
        top = [prototype_head(a, ytr, b, yte, "prototypes", 0.01, s, standardise=standardise)[0] for s in seeds]
        lines.append(f"| {label} | {np.mean(top):.3f} +- {np.std(top, ddof=1) if len(top) > 1 else 0:.3f} |")
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="demo,synth-b,synth-c")
    ap.add_argument("--root", default="build/recipe", help="benchmarks/recipe.py's --root (its workspaces)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.sets.split(","):
        root = Path(args.root) / name
        if not (root / "manifests" / "closed.csv").exists():
            sys.exit(f"{root}: no workspace; run benchmarks/recipe.py --sets {name} --root {args.root} first")
        print("\n".join(report(name, root, seeds)), flush=True)


if __name__ == "__main__":
    main()
