"""Why the open set fails on TAEF2 latents: the KDE's scores taken apart, and the open-set scores a
forensic expert would try first, on the same rows of cached recipe.py runs (nothing is retrained).

    python benchmarks/openset.py [--sets demo-taef2,taef2-b,taef2-c] [--seeds 0,1,2] [--root build/recipe]

Per set and seed (run leakpipe-seed<k>, trained and scored by benchmarks/recipe.py): the log-density
of the closed training rows (in-sample and leave-one-out), val rows, closed test rows and open rows;
their distance to the nearest training row and to their own (or nearest) class mean; AUROC of the
KDE at the cross-validated bandwidth and at multiples of the embeddings' scale; and AUROC (known test
rows positive, open rows negative, 95% bootstrap interval over images) of: the max softmax of the head,
the max logit, Mahalanobis to the nearest class mean on h_bar (the run's comparator, and one shared
covariance), Mahalanobis to the nearest class mean on z0 (the z0 probe's features) and on z0's
per-channel statistics, and how many training images show the same content (the benchmark writes
image i of every generator from the same content). Per set, each score's seed-mean AUROC minus the
KDE's, paired on the same resamples of the same images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipe import SETS, arguments  # noqa: E402

from leakpipe.pipeline.ledger import runs  # noqa: E402
from leakpipe.pipeline.math import bootstrap, metrics  # noqa: E402
from leakpipe.pipeline.math.kde import GaussianKDE, default_grid, log_density  # noqa: E402
from leakpipe.pipeline.math.mahalanobis import Mahalanobis  # noqa: E402
from leakpipe.pipeline.report import evaluate as ev  # noqa: E402
from leakpipe.pipeline.report.scored import load_split  # noqa: E402
from leakpipe.pipeline.store import latent_store  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import graph  # noqa: E402

FACTORS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # KDE bandwidths as multiples of the embeddings' scale
N_BOOT = 2000


def z0_of(ws: Workspace, split: str, rows: np.ndarray) -> np.ndarray:
    """The cached z0 means (n, C, h, w) of manifest rows `rows` of `split`, in the order given."""
    lat = graph(ws, ws.config()).plan("encode", split).data
    store = latent_store.open_store(lat.store)
    order = np.argsort(rows)
    z = latent_store.read_rows(store, rows[order])["mean"]
    out = np.empty_like(z)
    out[order] = z
    return out


def z0_stats(z: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of z0: (n, 2C)."""
    return np.concatenate([z.mean((2, 3)), z.std((2, 3))], 1)


def nearest_class(fit_x, fit_y, n_classes, x, shared=1.0) -> np.ndarray:
    """Minus the Mahalanobis distance to the nearest class mean (Lee et al. 2018 at shared = 1)."""
    return Mahalanobis(n_classes, 1e-3, shared).fit(fit_x, fit_y).score(x).max(1)


def kde_other_content(ref: np.ndarray, ref_content, x: np.ndarray, x_content, bandwidth: float) -> np.ndarray:
    """Eq. 16-17 at `bandwidth`, each query's reference being the training rows of other contents."""
    import torch

    d2 = torch.cdist(torch.as_tensor(x), torch.as_tensor(ref)) ** 2
    logk = -d2 / (2 * bandwidth**2)
    same = torch.as_tensor(np.asarray(x_content)[:, None] == np.asarray(ref_content)[None])
    logk[same] = -float("inf")
    n = (~same).sum(1).double()
    return (torch.logsumexp(logk, 1) - n.log() - 0.5 * ref.shape[1] * np.log(2 * np.pi * bandwidth**2)).numpy()


def content_index(split) -> np.ndarray:
    """The content of each row: the decoder family renders image i of every generator from content i."""
    return np.array([Path(p).stem for p in split.ids["path"]])


def auroc_ci(known: np.ndarray, unseen: np.ndarray) -> tuple[float, float, float]:
    pos = np.r_[np.ones(len(known), bool), np.zeros(len(unseen), bool)]
    s = np.r_[known, unseen]
    point = float(metrics.auroc(s, pos, metrics.unit(len(s)))[0])
    lo, hi = bootstrap.interval(bootstrap.Resamples(N_BOOT, 0).of(lambda w: metrics.auroc(s, pos, w), len(s)))
    return point, lo, hi


def one_run(ws: Workspace, run: str) -> dict:
    """Every score of the closed test (positive) and open (negative) rows of one run, and the diagnostics."""
    result = runs.pointed(ws, run)
    closed, attrs = load_split(ws, result, "closed")
    opened, _ = load_split(ws, result, "open")
    classes = attrs["classes"]
    part = {p: closed.select((closed.partition == p) & (closed.variant == "raw")) for p in ("train", "val", "test")}
    tr, va, te = part["train"], part["val"], part["test"]
    ytr = ev.label_index(tr, classes)
    cfg = ws.config().score
    h = {k: s.embedding("h_bar") for k, s in (("train", tr), ("val", va), ("test", te), ("open", opened))}
    kde = ev.kde_for(tr, "h_bar", cfg)
    scores = {"KDE (CV bandwidth)": (kde.score_samples(h["test"]), kde.score_samples(h["open"]))}
    for f, bw in zip(FACTORS, default_grid(kde.reference_, FACTORS)):
        k = GaussianKDE(bandwidth=bw).fit(h["train"])
        scores[f"KDE h = {f} x scale"] = (k.score_samples(h["test"]), k.score_samples(h["open"]))
    # the same KDE with each query's own content left out of the reference (an oracle: it reads the content
    # index): how much of the score is the familiarity of the image's content rather than of its generator
    scores["KDE without the query's content (oracle)"] = tuple(
        kde_other_content(h["train"], content_index(tr), h[k], content_index(s), kde.bandwidth_)
        for k, s in (("test", te), ("open", opened))
    )
    soft = {k: metrics.softmax(s.arrays["logits"].astype(np.float64)) for k, s in (("test", te), ("open", opened))}
    scores["max softmax (head)"] = (soft["test"].max(1), soft["open"].max(1))
    scores["max logit (head)"] = (te.arrays["logits"].max(1), opened.arrays["logits"].max(1))
    fit = closed.select(np.isin(closed.partition, ev.MAHA_PARTS[cfg.maha_rows]) & (closed.variant == "raw"))
    comp = ev.comparator(fit, classes, cfg)
    scores["Mahalanobis h_bar (run's comparator)"] = tuple(comp.score(h[k]).max(1) for k in ("test", "open"))
    scores["Mahalanobis h_bar (shared cov.)"] = tuple(
        nearest_class(h["train"], ytr, len(classes), h[k]) for k in ("test", "open")
    )
    z = {
        "train": z0_of(ws, "closed", tr.ids["row"]),
        "test": z0_of(ws, "closed", te.ids["row"]),
        "open": z0_of(ws, "open", opened.ids["row"]),
    }
    flat = {k: v.reshape(len(v), -1).astype(np.float64) for k, v in z.items()}
    stats = {k: z0_stats(v).astype(np.float64) for k, v in z.items()}
    scores["Mahalanobis z0 (shared cov.)"] = tuple(
        nearest_class(flat["train"], ytr, len(classes), flat[k]) for k in ("test", "open")
    )
    scores["Mahalanobis z0 channel stats (shared cov.)"] = tuple(
        nearest_class(stats["train"], ytr, len(classes), stats[k]) for k in ("test", "open")
    )
    # how many training images show the row's content: a score that knows nothing of generators
    seen = {c: n for c, n in zip(*np.unique(content_index(tr), return_counts=True))}
    scores["training images of the same content"] = tuple(
        np.array([seen.get(c, 0) for c in content_index(s)], float) for s in (te, opened)
    )
    rows = {"train": tr, "val": va, "test": te, "open": opened}
    scale = default_grid(kde.reference_, (1.0,))[0]
    diag = diagnostics(h, kde, rows, ytr, classes)
    return {"scores": scores, "diag": diag, "bandwidth": kde.bandwidth_, "scale": scale}


def diagnostics(h: dict, kde: GaussianKDE, rows: dict, ytr: np.ndarray, classes) -> dict:
    """Median log-density, distance to the nearest training row and to the nearest class mean of each
    group of rows (training rows: in-sample and leaving themselves out), and how often the nearest
    training row shows the same content or has the same label."""
    import torch

    ref = torch.as_tensor(h["train"])
    out = {}
    mu = np.stack([h["train"][ytr == c].mean(0) for c in range(len(classes))])
    for k, x in h.items():
        q = torch.as_tensor(x)
        d = torch.cdist(q, ref)
        if k == "train":
            d.fill_diagonal_(float("inf"))
        ld = log_density(q, ref, kde.bandwidth_).numpy()
        if k == "train":  # leave-one-out: each row's own kernel left out of the sum
            own = np.arange(len(x))
            loo = kde_other_content(h["train"], own, x, own, kde.bandwidth_)
            out["train (leave-one-out)"] = {"logdens": float(np.median(loo))}
        nearest = d.argmin(1).numpy()
        same_content = content_index(rows[k]) == content_index(rows["train"])[nearest]
        same_label = rows[k].labels == rows["train"].labels[nearest]
        out[k] = {
            "same_content": float(same_content.mean()),
            "same_label": float(same_label.mean()),
            "logdens": float(np.median(ld)),
            "nn": float(d.min(1).values.median()),
            "class_mean": float(np.median(np.linalg.norm(x[:, None] - mu[None], axis=2).min(1))),
            "norm": float(np.median(np.linalg.norm(x, axis=1))),
        }
    return out


def seed_mean_minus(results: list[dict], name: str, ref: str) -> dict:
    """Seed-mean AUROC of score `name` minus score `ref`'s, paired on resamples of the same images."""
    k0, u0 = results[0]["scores"][name]
    pos = np.r_[np.ones(len(k0), bool), np.zeros(len(u0), bool)]

    def mean_auroc(key, w):
        return np.mean([metrics.auroc(np.r_[r["scores"][key][0], r["scores"][key][1]], pos, w) for r in results], 0)

    diff = bootstrap.Resamples(N_BOOT, 0).of(lambda w: mean_auroc(name, w) - mean_auroc(ref, w), len(pos))
    point = metrics.unit(len(pos))
    return bootstrap.paired(float(mean_auroc(name, point)[0] - mean_auroc(ref, point)[0]), diff)


def report(name: str, seeds: list[int], results: list[dict]) -> list[str]:
    ref = "KDE (CV bandwidth)"
    lines = [f"#### {name}: seeds {', '.join(map(str, seeds))}", ""]
    lines += [
        "| open-set score (higher: known) | AUROC per seed [95% interval] | seed mean | minus KDE (paired) |",
        "|---|---|---:|---|",
    ]
    for key in results[0]["scores"]:
        per = [auroc_ci(*r["scores"][key]) for r in results]
        cells = "; ".join(f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in per)
        d = "-" if key == ref else fmt(seed_mean_minus(results, key, ref))
        lines.append(f"| {key} | {cells} | {np.mean([p[0] for p in per]):.3f} | {d} |")
    lines += [
        "",
        "| rows (seed " + str(seeds[0]) + ") | median log-density | median distance to nearest training row "
        "| median distance to nearest class mean | median norm of h_bar | nearest training row: same content "
        "| same generator |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in results[0]["diag"].items():
        lines.append(
            f"| {k} | {v['logdens']:.1f} | {v.get('nn', float('nan')):.3f} | {v.get('class_mean', float('nan')):.3f} "
            f"| {v.get('norm', float('nan')):.3f} | {v.get('same_content', float('nan')):.2f} "
            f"| {v.get('same_label', float('nan')):.2f} |"
        )
    lines.append(
        "\nCV bandwidth per seed (x the embeddings' scale): "
        + ", ".join(f"{r['bandwidth']:.4g} ({r['bandwidth'] / r['scale']:.3g})" for r in results)
    )
    return lines


def fmt(d: dict) -> str:
    lo, hi = d["ci"]
    verdict = "below" if hi < 0 else ("above" if lo > 0 else "n.s.")
    return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({verdict}, p {d['p']:.3f})"


def main():
    args, log = arguments(__doc__, "build/recipe")
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.sets.split(","):
        assert name in SETS, name
        ws = Workspace(Path(args.root).resolve() / name)
        have = [s for s in seeds if runs.pointed(ws, f"leakpipe-seed{s}") is not None]
        results = [one_run(ws, f"leakpipe-seed{s}") for s in have]
        print("\n".join(report(name, have, results)), "\n", flush=True)


if __name__ == "__main__":
    main()
