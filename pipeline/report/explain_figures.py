"""The explanation figures of the report: the paper's Fig. 3 (features after each backbone stage),
Fig. 5 (top-1 per generator and post-processing step), and a prototype gallery (beyond the paper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leakpipe.pipeline.report.figures import DPI, _colours, _plt, _save, beyond_note, onto_axes, project_2d
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.math.prototypes import weighted_distances


def stage_maps_figure(stages: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path) -> None:
    """Fig. 3: a 2-D PCA of the pooled features after each backbone stage, of h_bar and of the gated
    h_bar * w, closed test images coloured by generator."""
    plt = _plt()
    names = list(stages)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colours = np.array(_colours(len(classes)))
    for c, cname in enumerate(classes):  # the legend's entries; the points are one scatter per map, below
        axes.flat[0].scatter([], [], s=6, color=colours[c], label=cname)
    for ax, name in zip(axes.flat, names):
        xy, xlim, ylim, beyond = onto_axes(project_2d(stages[name].astype(np.float64), "pca", 0))
        ax.scatter(xy[:, 0], xy[:, 1], s=6, color=colours[labels])
        ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[], xlabel=beyond_note(beyond))
        ax.xaxis.label.set_fontsize(7)
        ax.set_title(f"{name} ({stages[name].shape[1]} dims)", fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, markerscale=1.5, loc="best")
    fig.suptitle("closed test features after each backbone stage, pooled over timesteps by a_t (PCA)", fontsize=10)
    _save(fig, path)


def per_class_recall(closed: dict) -> tuple[list[str], np.ndarray]:
    """(variants, (classes, variants) top-1 of each generator's images) from the head's confusions."""
    variants = list(closed)
    recall = []
    for v in variants:
        cm = np.asarray(closed[v]["head"]["confusion"], float)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall.append(np.diag(cm) / cm.sum(1))
    return variants, np.stack(recall, axis=1)


def class_step_figure(closed: dict, classes: list[str], path: Path) -> None:
    """Fig. 5: top-1 of each generator's images (rows) at each post-processing step (columns)."""
    plt = _plt()
    variants, recall = per_class_recall(closed)
    fig, ax = plt.subplots(figsize=(1.8 + 0.9 * len(variants), 1.2 + 0.4 * len(classes)))
    im = ax.imshow(np.nan_to_num(recall, nan=0.0), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(classes)):
        for j in range(len(variants)):
            text = "n/a" if np.isnan(recall[i, j]) else f"{recall[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if recall[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(variants)), variants, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="post-processing step", title="top-1 per generator and step (head)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="top-1")
    _save(fig, path)


def nearest_to_prototypes(
    h_bar: np.ndarray, w: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, k: int
) -> np.ndarray:
    """(C, M, k) indices of the training rows of class c that prototype (c, m) wins (it is the
    nearest of the class's prototypes to them by d_cm, Eq. 9), nearest first; -1 where it wins fewer
    than k. A collapsed prototype wins none, so the gallery shows it empty instead of repeating the
    images of its neighbour."""

    n_c, n_m, _ = prototypes.shape
    out = np.full((n_c, n_m, k), -1, np.int64)
    for c in range(n_c):
        rows = np.nonzero(labels == c)[0]
        if not len(rows):
            continue
        d = weighted_distances(h_bar[rows].astype(np.float64), w[rows].astype(np.float64), prototypes[c])
        win = d.argmin(1)
        for m in range(n_m):
            mine = np.nonzero(win == m)[0]
            near = rows[mine[np.argsort(d[mine, m], kind="stable")][:k]]
            out[c, m, : len(near)] = near
    return out


THUMB = 64  # px, the gallery's thumbnails (report and exported attributor)


def prototype_thumbnails(near: np.ndarray, path_of, preprocess) -> list[list[list[np.ndarray]]]:
    """The gallery's pictures: per class and prototype, the THUMB px thumbnails of the training rows in
    `near` (nearest_to_prototypes' indices, -1 for none); `path_of(i)` is row i's image file. An image
    removed since it was encoded is drawn blank, not an error."""
    from dataclasses import replace

    from leakpipe.pipeline.engine.images import load_image

    thumb = replace(preprocess, size=THUMB)

    def picture(i):
        try:
            return load_image(path_of(int(i)), thumb)
        except (OSError, UserError):
            return np.full((THUMB, THUMB, 3), 255, np.uint8)

    return [[[picture(i) for i in ks if i >= 0] for ks in per_class] for per_class in near]


def gallery_figure(thumbs: list[list[list[np.ndarray]]], classes: list[str], path: Path) -> None:
    """The prototype gallery: per generator (rows) and prototype (column groups), the training images
    nearest to the prototype."""
    _save(gallery(thumbs, classes), path)


GAP = 14  # canvas px between thumbnails (white); a prototype's group is set off by twice that
EDGE = 2  # canvas px around the cells: room for the frames


def gallery_canvas(thumbs: list[list[list[np.ndarray]]], k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the gallery's picture: every thumbnail on one white uint8 canvas, each framed in black; (C, M,
    k, 2) x, y of each cell's top-left corner in canvas px; a cell's side). Thumbnail j of prototype m
    of class c sits in row c, column m * k + j, centred in its cell."""
    n_c, n_m = len(thumbs), len(thumbs[0])
    cell = max([THUMB] + [max(im.shape[:2]) for row in thumbs for ims in row for im in ims])
    j, m = np.arange(k), np.arange(n_m)
    x = EDGE + m[:, None] * (k * (cell + GAP) + GAP) + j[None] * (cell + GAP)
    y = EDGE + np.arange(n_c) * (cell + GAP)
    at = np.stack(np.broadcast_arrays(x[None], y[:, None, None]), axis=-1)
    canvas = np.full((int(y[-1]) + cell + EDGE, int(x[-1, -1]) + cell + EDGE, 3), 255, np.uint8)
    for c, row in enumerate(thumbs):
        for m_, images in enumerate(row):
            for j_, im in enumerate(images[:k]):
                h, w = im.shape[:2]
                x0, y0 = at[c, m_, j_] + [(cell - w) // 2, (cell - h) // 2]
                canvas[y0 - 1 : y0 + h + 1, x0 - 1 : x0 + w + 1] = 0  # the frame, one px outside
                canvas[y0 : y0 + h, x0 : x0 + w] = im[..., :3]
    return canvas, at, cell


def gallery(thumbs: list[list[list[np.ndarray]]], classes: list[str]):
    """The gallery's figure: one Axes showing one picture of every thumbnail (an Axes per thumbnail
    made it the slowest figure of the report), the generator names, prototype headings and empty
    prototypes' notes drawn as text where their rows and cells are."""
    plt = _plt()
    k = max(1, max(len(t) for row in thumbs for t in row))
    canvas, at, cell = gallery_canvas(thumbs, k)
    height, width = canvas.shape[0] / DPI, canvas.shape[1] / DPI  # written pixel for pixel
    left, top = 1.2, 0.6  # inches for the names and the headings; savefig's tight box trims the rest
    fig = plt.figure(figsize=(width + left, height + top))
    ax = fig.add_axes((left / (width + left), 0, width / (width + left), height / (height + top)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for c, row in enumerate(thumbs):
        ax.text(at[c, 0, 0, 0] - 8, at[c, 0, 0, 1] + cell / 2, classes[c], fontsize=7, ha="right", va="center")
        for m, images in enumerate(row):
            x, y = at[c, m, 0]
            if c == 0:
                ax.text(x - 1, y - 8, f"prototype {m}", fontsize=7, ha="left", va="bottom")
            if not images:  # a prototype that is nearest to none of its class's images
                text = "wins no\ntraining\nimage"
                ax.text(x + cell / 2, y + cell / 2, text, fontsize=6, ha="center", va="center", color="0.4")
    fig.suptitle(
        f"training images each prototype wins, nearest first (d_cm of Eq. 9; up to {k} per prototype)", fontsize=9
    )
    return fig
