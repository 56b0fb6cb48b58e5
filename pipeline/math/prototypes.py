"""How distinct a class's prototypes are: do they stand for different modes of its images, or have
they collapsed onto one (paper Eq. 9-10 define the distances and the soft minimum)?"""

from __future__ import annotations

import numpy as np


def weighted_distances(h_bar: np.ndarray, w: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Eq. 9 for one class: d_m = sum_i w_i (h_bar_i - p_m,i)^2. h_bar, w (N, D); prototypes (M, D) -> (N, M)."""
    diff = h_bar[:, None, :] - prototypes[None]
    return (w[:, None, :] * diff * diff).sum(-1)


def winners(h_bar: np.ndarray, w: np.ndarray, labels: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N,) index of the prototype of each image's own class that is nearest to it by d_cm."""
    out = np.zeros(len(labels), np.int64)
    for c in range(len(prototypes)):
        sel = labels == c
        if sel.any():
            out[sel] = weighted_distances(h_bar[sel], w[sel], prototypes[c]).argmin(1)
    return out


def usage(h_bar: np.ndarray, w: np.ndarray, labels: np.ndarray, prototypes: np.ndarray) -> dict:
    """Per class: how many of its M prototypes win at least one of its (training) images, and their
    separation, the mean squared distance between two of its prototypes over the mean squared
    distance of its images from their mean, both weighted by the class's mean gate w (about 1: the
    prototypes are as far apart as the images are spread; near 0: collapsed onto one point)."""
    h_bar, w = np.asarray(h_bar, np.float64), np.asarray(w, np.float64)
    win, (n_c, n_m, _) = winners(h_bar, w, labels, prototypes), prototypes.shape
    per_class = []
    for c in range(n_c):
        sel = labels == c
        if not sel.any():
            per_class.append({"n": 0, "winning": 0, "separation": float("nan")})
            continue
        wbar, p = w[sel].mean(0), prototypes[c].astype(np.float64)
        pairs = [float((wbar * (p[a] - p[b]) ** 2).sum()) for a in range(n_m) for b in range(a + 1, n_m)]
        spread = float((wbar * (h_bar[sel] - h_bar[sel].mean(0)) ** 2).sum(1).mean())
        per_class.append(
            {
                "n": int(sel.sum()),
                "winning": int(len(np.unique(win[sel]))),
                "separation": float(np.mean(pairs) / spread) if pairs and spread > 0 else float("nan"),
            }
        )
    seps = [r["separation"] for r in per_class if np.isfinite(r["separation"])]
    return {
        "per_class": per_class,
        "per_class_count": n_m,
        "winning_fraction": float(np.mean([r["winning"] / n_m for r in per_class if r["n"]])),
        "median_separation": float(np.median(seps)) if seps else float("nan"),
    }
