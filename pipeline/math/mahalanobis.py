"""The Mahalanobis comparator on embeddings: per-class diagonal Gaussians (Eq. 13), pooled with one
shared, Ledoit-Wolf-shrunk covariance (Lee et al., NeurIPS 2018) by a weight."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakpipe.pipeline.math.rows import by_blocks

SCORE_CELLS = 1 << 22  # rows x classes x dimensions scored at once (their temporaries: 32 MiB each), whatever N


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


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit and Wolf (2004)'s shrinkage of the covariance of centred rows x (n, D) towards m I, m the mean
    variance, by the weight that minimises the expected squared error: (1 - s) S + s m I."""
    n, d = x.shape
    s = x.T @ x / n
    m = np.trace(s) / d
    dist = ((s - m * np.eye(d)) ** 2).sum() / d
    norms = by_blocks(lambda b: (b * b).sum(1), x, 1 << 14)  # each row's own sum: no (n, D) square of x
    spread = (norms**2).sum() / n - (s * s).sum()  # sum_k ||x_k x_k^T - S||_F^2 / n
    shrink = min(spread / (n * d), dist) / dist if dist > 0 else 1.0
    return (1 - shrink) * s + shrink * m * np.eye(d)


def deviations(h: np.ndarray, mu: np.ndarray, labels: np.ndarray, rows: int = 1 << 14) -> np.ndarray:
    """h - mu[labels]: each row's deviation from its class mean, a block of rows at a time (no (N, D)
    array of the rows' means beside it)."""
    out = np.empty_like(h)
    for s in range(0, len(h), rows):
        np.subtract(h[s : s + rows], mu[labels[s : s + rows]], out=out[s : s + rows])
    return out


def shared_scores(h: np.ndarray, mu: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """s_c = -(h - mu_c)^T P (h - mu_c) for one precision P shared by all classes (Lee et al. 2018, Eq. 2),
    expanded so that no (N, C, D) array is formed; shape (N, C), higher is closer."""
    hp = h @ precision
    return -((hp * h).sum(1)[:, None] - 2 * hp @ mu.T + ((mu @ precision) * mu).sum(1)[None])


def pooled_scores(h: np.ndarray, mu: np.ndarray, precisions: np.ndarray) -> np.ndarray:
    """s_c = -(h - mu_c)^T P_c (h - mu_c) for one precision per class (C, D, D); shape (N, C)."""
    out = np.empty((len(h), len(mu)))
    for c, (m, p) in enumerate(zip(mu, precisions)):
        d = h - m
        out[:, c] = -((d @ p) * d).sum(1)
    return out


@dataclass
class Mahalanobis:
    """fit(h, labels) on reference embeddings; score(h) -> (N, C) class scores.

    Each class's covariance is (1 - shared) diag(sigma_c^2 + eps) + shared Sigma, a regularised
    discriminant analysis (Friedman, JASA 1989) between Eq. 13 (shared = 0: a diagonal Gaussian per
    class) and one covariance for every class (shared = 1: Lee et al., NeurIPS 2018). Sigma is the
    covariance of every row's deviation from its class mean, Ledoit-Wolf shrunk (D may exceed the rows of
    a class); eps = floor x the mean per-dimension variance of all rows, so a near-constant dimension of
    one class cannot dominate the distance, for any D and normalisation.
    """

    n_classes: int
    floor: float = 1e-3
    shared: float = 0.0

    def fit(self, h: np.ndarray, labels: np.ndarray) -> "Mahalanobis":
        h, labels = np.asarray(h, np.float64), np.asarray(labels)
        self.mu_, self.var_ = class_moments(h, labels, self.n_classes)
        self.eps_ = self.floor * float(h.var(0).mean()) or self.floor
        if self.shared == 1:  # one precision for every class, inverted once here
            self.precisions_ = np.linalg.pinv(ledoit_wolf(deviations(h, self.mu_, labels)), hermitian=True)[None]
        elif self.shared > 0:
            cov = ledoit_wolf(deviations(h, self.mu_, labels))
            pooled = self.shared * cov + (1 - self.shared) * _diagonals(self.var_ + self.eps_)
            self.precisions_ = np.linalg.inv(pooled)
        return self

    def score(self, h) -> np.ndarray:
        """(N, C) class scores of the rows of h: an array, or rows sliced on demand (kde.EmbeddingRows),
        a block of rows at a time (each row's score is its own: the same as all at once)."""
        rows = max(1024, SCORE_CELLS // (len(self.mu_) * self.mu_.shape[1]))
        return by_blocks(self._score, h, rows)

    def _score(self, h) -> np.ndarray:
        h = np.asarray(h, np.float64)
        if self.shared == 0:
            return mahalanobis_scores(h, self.mu_, self.var_, self.eps_)
        if self.shared == 1:
            return shared_scores(h, self.mu_, self.precisions_[0])
        return pooled_scores(h, self.mu_, self.precisions_)


def _diagonals(var: np.ndarray) -> np.ndarray:
    """(C, D) variances as (C, D, D) diagonal matrices."""
    return var[:, :, None] * np.eye(var.shape[1])[None]
