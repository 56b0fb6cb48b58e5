"""The report's figures (matplotlib, Agg): confusion, ROC, embedding map, KDE scores, post-processing,
attention, reliability; written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leakpipe.pipeline.math import metrics
from leakpipe.pipeline.report.evaluate import GATING

FIGURES = (
    "confusion.png",
    "roc.png",
    "embedding_map.png",
    "kde_scores.png",
    "postprocessing.png",
    "attention.png",
    "stage_maps.png",
    "class_by_step.png",
    "prototype_gallery.png",
    "reliability.png",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 110  # of the written figures


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)


def _colours(n: int):
    """A distinct colour per class, never grey (the open set's): tab10 without its grey up to 9 classes,
    tab20 without its greys up to 18, then evenly spaced hues."""
    plt = _plt()
    if n <= 9:
        return [plt.get_cmap("tab10")(c) for c in range(10) if c != 7][:n]
    if n <= 18:
        return [plt.get_cmap("tab20")(c) for c in range(20) if c not in (14, 15)][:n]
    return [plt.get_cmap("hsv")(c / n) for c in range(n)]


def confusion_figure(confusion: list, classes: list[str], title: str, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(confusion, float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * n, 1.2 + 0.5 * n))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted generator")
    ax.set_ylabel("true generator")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true generator's images")
    _save(fig, path)


def roc_figure(scores: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = _colours(len(classes))
    for c, name in enumerate(classes):
        if not (labels == c).any() or (labels == c).all():
            continue
        fpr, tpr, _ = metrics.roc_curve(scores[:, c], labels == c)
        ax.plot(
            fpr,
            tpr,
            color=colours[c],
            lw=1.3,
            label=f"{name} (AUC {metrics.point(metrics.auroc, scores[:, c], labels == c):.3f})",
        )
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(fontsize=7, loc="lower right", ncol=1 + len(classes) // 12)
    _save(fig, path)


def project_2d(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """PCA (by SVD) or t-SNE to two dimensions."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(2, init="pca", random_state=seed, perplexity=min(30, max(5, len(x) // 4))).fit_transform(x)
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    centred = x - x.mean(0)
    # One BLAS thread: on a busy machine a second one mostly waits for a core; the SVD of Fig. 3's 2000 x
    # 512 took 2 to 7 s in two threads against 0.2 s in one (2 cores, load average 2)
    with threadpool_limits(1, user_api="blas"):
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T


def robust_limits(x: np.ndarray, fence: float = 1.5, keep: float = 10) -> tuple[float, float]:
    """Axis limits at Tukey's fences (quartiles widened by `fence` interquartile ranges), never
    narrower than the `keep`-th to (100 - keep)-th percentiles (a minority cluster is not cut off)
    and never wider than the data: a tail of outliers cannot squash the bulk into one strip."""
    if not len(x):
        return 0.0, 1.0
    q1, q3, p_lo, p_hi = np.percentile(x, [25, 75, keep, 100 - keep])
    lo = max(min(q1 - fence * (q3 - q1), p_lo), float(np.min(x)))
    hi = min(max(q3 + fence * (q3 - q1), p_hi), float(np.max(x)))
    pad = 0.04 * (hi - lo) or 1.0
    return float(lo - pad), float(hi + pad)


def onto_axes(xy: np.ndarray) -> tuple[np.ndarray, tuple, tuple, int]:
    """(points clipped to the robust limits, xlim, ylim, how many were clipped): points beyond the
    limits are drawn on the edge, and counted, rather than silently left out of the picture."""
    xlim, ylim = robust_limits(xy[:, 0]), robust_limits(xy[:, 1])
    clipped = np.c_[np.clip(xy[:, 0], *xlim), np.clip(xy[:, 1], *ylim)]
    return clipped, xlim, ylim, int((clipped != xy).any(axis=1).sum())


def beyond_note(n: int) -> str:
    return f"{n} point{'s' if n != 1 else ''} beyond the axes, drawn on the edge" if n else ""


def embedding_figure(
    closed: np.ndarray,
    closed_labels: np.ndarray,
    classes: list[str],
    opened: np.ndarray,
    method: str,
    seed: int,
    path: Path,
) -> None:
    plt = _plt()
    xy, xlim, ylim, beyond = onto_axes(project_2d(np.concatenate([closed, opened]), method, seed))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colours = _colours(len(classes))
    if len(opened):
        o = xy[len(closed) :]
        ax.scatter(o[:, 0], o[:, 1], s=9, marker="x", color="0.6", lw=0.7, label="open (unseen)")
    for c, name in enumerate(classes):
        p = xy[: len(closed)][closed_labels == c]
        ax.scatter(p[:, 0], p[:, 1], s=10, color=colours[c], label=name)
    name = {"pca": "PCA", "tsne": "t-SNE"}[method]
    ax.set(
        xlim=xlim,
        ylim=ylim,
        xlabel=f"{name} 1" + (f"  ({beyond_note(beyond)})" if beyond else ""),
        ylabel=f"{name} 2",
        title=f"embeddings h_bar of the closed test set and the open set ({name})",
    )
    ax.legend(fontsize=7, markerscale=1.5, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)


def kde_figure(scores: dict, open_metrics: dict, threshold: dict | None, path: Path) -> None:
    plt = _plt()
    kinds = [k for k in ("gating_off", "gating_on") if k in scores]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        closed, opened = scores[kind]["closed"], scores[kind]["open"]
        both = np.concatenate([closed, opened])
        bins = np.linspace(np.percentile(both, 0.5), both.max(), 40)
        # stepfilled: one polygon a histogram, not a rectangle a bin (the same picture, drawn faster)
        for x, label in ((closed, "closed test (known)"), (opened, "open (unseen)")):
            ax.hist(np.clip(x, bins[0], None), bins, alpha=0.6, density=True, histtype="stepfilled", label=label)
        m = open_metrics[kind]
        if threshold and GATING[kind] == threshold["embedding"] and np.isfinite(threshold["log_density_threshold"]):
            ax.axvline(
                threshold["log_density_threshold"],
                color="k",
                ls="--",
                lw=1,
                label=f"unseen flag: p <= {threshold['alpha']:g} below",
            )
        ax.set(
            xlabel="KDE log-density",
            ylabel="density",
            title=f"{kind.replace('_', ' ')}: AUROC {m['auroc']:.3f}, EER {m['eer']:.3f}, OVL {m['ovl']:.3f}",
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    _save(fig, path)


def postprocessing_figure(closed: dict, n_classes: int, path: Path) -> None:
    plt = _plt()
    variants = list(closed)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axhline(1 / n_classes, color="0.5", ls=":", lw=1, label=f"chance (1/{n_classes})")
    for k, (scorer, style) in enumerate((("head", "o-"), ("mahalanobis", "s--"))):
        x = np.arange(len(variants)) + (k - 0.5) * 0.08  # side by side, so the bars stay apart
        top1 = np.array([closed[v][scorer]["top1"] for v in variants])
        ci = np.array([closed[v][scorer].get("ci", {}).get("top1", [np.nan, np.nan]) for v in variants], float)
        err = None if np.isnan(ci).all() else np.abs(ci.T - top1)  # no bar where there is no interval
        ax.errorbar(
            x,
            top1,
            yerr=err,
            fmt=style,
            capsize=3,
            label="Proto-LeakNet head" if scorer == "head" else "Mahalanobis",
        )
    ax.set_xticks(np.arange(len(variants)), variants)
    ax.set(
        xlabel="post-processing",
        ylabel="top-1 accuracy (95% interval)",
        ylim=(0, 1.02),
        title="attribution accuracy by post-processing step",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def attention_figure(a_t: list, classes: list[str], timesteps: list[int], path: Path) -> None:
    plt = _plt()
    rows = [(c, v) for c, v in zip(classes, a_t) if v]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 2), 4))
    width = 0.8 / len(timesteps)
    for j, t in enumerate(timesteps):
        ax.bar(
            np.arange(len(rows)) + (j - (len(timesteps) - 1) / 2) * width,
            [v[j] for _, v in rows],
            width,
            label=f"t = {t}",
        )
    ax.set_xticks(range(len(rows)), [c for c, _ in rows], rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="mean attention weight a_t", ylim=(0, 1), title="temporal attention by generator (Eq. 6-7)")
    ax.legend(fontsize=8)
    _save(fig, path)


def reliability_figure(calibration: dict, path: Path) -> None:
    """Reliability diagram of the closed test (raw): accuracy against mean confidence per confidence
    bin, before and after calibration, each point sized by its bin's share of the images."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    t = calibration["temperature"]
    after = (
        f"{calibration['method'].replace('_', ' ')} (T = {t:.2f})"
        if np.ndim(t) == 0
        else f"{calibration['method'].replace('_', ' ')} (T from {min(t):.2f} to {max(t):.2f})"
    )
    for key, style, label in (("before", "o-", "uncalibrated"), ("after", "s-", after)):
        r = calibration["reliability"][key]
        count = np.asarray(r["count"], float)
        ok = count > 0
        conf, acc = np.asarray(r["confidence"], float)[ok], np.asarray(r["accuracy"], float)[ok]
        ece = float((count[ok] * np.abs(acc - conf)).sum() / max(count.sum(), 1))  # the ECE, from its own bins
        (line,) = ax.plot(conf, acc, style[1:], lw=1.2, label=f"{label}, ECE {ece:.3f}")
        ax.scatter(
            conf, acc, s=12 + 250 * count[ok] / max(count.sum(), 1), color=line.get_color(), marker=style[0], zorder=3
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="confidence (largest class probability)",
        ylabel="accuracy",
        title="reliability, closed test (raw)",
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)
