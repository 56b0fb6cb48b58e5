"""The Mahalanobis comparator of Eq. 13: per-class diagonal Gaussians on training embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def class_moments(h: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and (biased) variance of h, shapes (C, D); a class without rows raises."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"classes {np.nonzero(counts == 0)[0].tolist()} have no training embeddings")
    mu = np.stack([h[labels == c].mean(0) for c in range(n_classes)])
    var = np.stack([h[labels == c].var(0) for c in range(n_classes)])
    return mu, var


def mahalanobis_scores(h: np.ndarray, mu: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """Eq. 13: s_c = -sum_i (h_i - mu_c,i)^2 / (sigma_c,i^2 + eps), shape (N, C); higher is closer."""
    diff = h[:, None, :] - mu[None]
    return -(diff * diff / (var[None] + eps)).sum(-1)


@dataclass
class Mahalanobis:
    """fit(h, labels) on training embeddings; score(h) -> (N, C) class scores.

    eps = floor x the mean per-dimension variance of all training embeddings: a floor relative to the
    embedding scale, so a near-constant dimension of one class cannot dominate the distance and the
    same setting works for any D and any normalisation.
    """

    n_classes: int
    floor: float = 1e-3

    def fit(self, h: np.ndarray, labels: np.ndarray) -> "Mahalanobis":
        h = np.asarray(h, np.float64)
        self.mu_, self.var_ = class_moments(h, np.asarray(labels), self.n_classes)
        self.eps_ = self.floor * float(h.var(0).mean()) or self.floor
        return self

    def score(self, h: np.ndarray) -> np.ndarray:
        return mahalanobis_scores(np.asarray(h, np.float64), self.mu_, self.var_, self.eps_)
