"""The percentile bootstrap: resamples as draw weights, in blocks of bounded memory, and intervals.

A resample is a weight vector: how many times each row (or each group of rows: all images of one
prompt) was drawn. The metrics of math/metrics.py take such weights, so a bootstrap is each metric
on blocks of resampled weights (`blocks`), and `interval` turns the values into a 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_CELLS = 1 << 24  # resamples x rows held at once: 128 MiB of float64 weights, whatever the size


def weights(n_rows: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(B, n) draw counts: rows drawn with replacement, or whole groups when `groups` is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=n_boot).astype(np.float64)
    _, member = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = member.max() + 1
    drawn = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    return drawn[:, member].astype(np.float64)


def blocks(n_rows: int, n_boot: int, seed: int, groups: np.ndarray | None = None, cells: int = BLOCK_CELLS):
    """The resamples of `weights(n_rows, n_boot, seed, groups)`, the same ones in the same order, as
    consecutive blocks of at most `cells` weights (B_block, n_rows), so that memory stays bounded."""
    rng = np.random.default_rng(seed)
    size = max(1, cells // max(n_rows, 1))
    if groups is not None:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = member.max() + 1
    for start in range(0, n_boot, size):
        b = min(size, n_boot - start)
        if groups is None:
            yield rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=b).astype(np.float64)
        else:
            yield rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=b)[:, member].astype(np.float64)


def resampled(fn, n_rows: int, n_boot: int, seed: int, groups=None, cells: int = BLOCK_CELLS) -> np.ndarray:
    """`fn(w)` over every block of resamples, concatenated: the (B, ...) bootstrap values of a metric."""
    return np.concatenate([fn(w) for w in blocks(n_rows, n_boot, seed, groups, cells)])


@dataclass(frozen=True)
class Resamples:
    """Which resamples: how many, their seed, and the rows' groups (whole groups are drawn)."""

    n_boot: int
    seed: int = 0
    groups: np.ndarray | None = None

    def of(self, fn, n_rows: int) -> np.ndarray:
        """The (B, ...) values of `fn(w)` over these resamples of `n_rows` rows."""
        return resampled(fn, n_rows, self.n_boot, self.seed, self.groups)


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """[low, high] percentile interval, ignoring resamples where the metric is undefined (NaN)."""
    ok = values[np.isfinite(values)]
    if len(ok) == 0:
        return [float("nan"), float("nan")]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(ok, tail)), float(np.percentile(ok, 100 - tail))]


def basic_interval(estimate: float, values: np.ndarray, level: float = 0.95) -> list[float]:
    """The basic (reflected) bootstrap interval [2 estimate - high, 2 estimate - low]: for an estimator
    whose resamples are biased in the same direction as the estimate itself (OVL from kernel densities),
    it corrects that bias where the percentile interval doubles it."""
    lo, hi = interval(values, level)
    return [float(2 * estimate - hi), float(2 * estimate - lo)]


def paired(difference: float, resampled: np.ndarray) -> dict:
    """A paired comparison of two scorers on the same resamples: the observed difference, the 95%
    interval of the resampled differences, and a two-sided p (twice the smaller tail beyond zero)."""
    d = resampled[np.isfinite(resampled)]
    p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))) if len(d) else float("nan")
    return {"difference": float(difference), "ci": interval(d), "p": p}
