"""The percentile bootstrap: resamples as draw weights, in blocks of bounded memory, and intervals.

A resample is a weight vector: how many times each row (or each group of rows: all images of one
prompt) was drawn. The metrics of math/metrics.py take such weights, so a bootstrap is each metric
on blocks of resampled weights (`blocks`), and `interval` turns the values into a 95% interval.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
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


def _draw(n_rows: int, n_boot: int, seed: int, groups, cells: int):
    rng = np.random.default_rng(seed)
    size = max(1, cells // max(n_rows, 1))
    if groups is not None:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = member.max() + 1
    for start in range(0, n_boot, size):
        b = min(size, n_boot - start)
        if groups is None:
            drawn = rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=b)
        else:
            drawn = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=b)[:, member]
        yield drawn.astype(np.float64, order="F")


KEPT_BYTES = 1 << 30  # drawn counts kept for the next metric on the same rows (at 1 byte a count, mostly)
_kept: OrderedDict = OrderedDict()  # (n_rows, n_boot, seed, cells, groups' digest) -> [compact blocks]


def _compact(w: np.ndarray) -> np.ndarray:
    """The draw counts in the smallest unsigned type that holds them (a count is rarely above 255)."""
    top = w.max(initial=0)
    return w.astype(np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32)


def blocks(n_rows: int, n_boot: int, seed: int, groups: np.ndarray | None = None, cells: int = BLOCK_CELLS):
    """The resamples of `weights(n_rows, n_boot, seed, groups)`, the same ones in the same order, as
    consecutive blocks of at most `cells` weights (B_block, n_rows), so that memory stays bounded.
    Each block is laid out rows first (Fortran order): a row's resamples are contiguous, so the
    metrics that sort rows (AUROC, ROC) gather and sum whole rows.

    Scoring asks for the same resamples many times (every scorer, variant and setting on the same test
    rows), and drawing them costs more than most metrics: the last draws, up to KEPT_BYTES of counts,
    are kept and handed out again."""
    digest = None if groups is None else hashlib.blake2b(np.asarray(groups).astype(str).tobytes()).hexdigest()
    key = (n_rows, n_boot, seed, cells, digest)
    if key in _kept:
        _kept.move_to_end(key)
        yield from (b.astype(np.float64) for b in _kept[key])
        return
    # kept only if they fit (a count takes a byte, mostly), after room is made for them: the kept counts,
    # old and new, never exceed KEPT_BYTES, whatever the rows
    kept: list | None = [] if n_rows * n_boot <= KEPT_BYTES else None
    if kept is not None:
        _evict(KEPT_BYTES - n_rows * n_boot)
    for w in _draw(n_rows, n_boot, seed, groups, cells):
        if kept is not None:
            kept.append(_compact(w))
            kept = kept if _nbytes(kept) <= KEPT_BYTES else None  # counts above 255: wider than planned
        yield w
    if kept is not None:
        _kept[key] = kept
        _evict(KEPT_BYTES)


def _nbytes(blocks_: list) -> int:
    return sum(b.nbytes for b in blocks_)


def _evict(room: int) -> None:
    """Forgets the oldest kept draws until they take at most `room` bytes."""
    while _kept and sum(_nbytes(b) for b in _kept.values()) > room:
        _kept.popitem(last=False)


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
