"""k-means (Lloyd's algorithm with k-means++ seeding), for placing a class's prototypes on the modes of
its embeddings."""

from __future__ import annotations

import numpy as np


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 100) -> np.ndarray:
    """(k, D) centres of the rows of x (N, D): k-means++ seeding (each next centre drawn with
    probability proportional to its squared distance from the nearest chosen one), then Lloyd's
    iterations until no assignment changes. With fewer distinct rows than k, centres repeat."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else centres[-1])
    centres = np.asarray(centres)
    assign = None
    for _ in range(iters):
        new = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():  # an empty cluster keeps its centre
                centres[j] = x[assign == j].mean(0)
    return centres


def class_centres(h: np.ndarray, labels: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """(C, k, D): the k-means centres of each class's rows of h, each class seeded by (seed, class)."""
    return np.stack([kmeans(h[labels == c], k, seed * 1009 + c) for c in range(n_classes)])
