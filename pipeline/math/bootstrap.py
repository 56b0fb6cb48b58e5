"""Percentile bootstrap of attribution and open-set metrics, vectorised over resamples.

A resample is a weight vector: how many times each row (or each group of rows: all images of one
prompt) was drawn. The scores never change between resamples, so one sort serves all of them and
every metric is a weighted sum: no Python loop over resamples. Each function returns (B,) values,
one per resample; `interval` turns them into a 95% percentile interval.
"""
from __future__ import annotations

import numpy as np


def weights(n_rows: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(B, n) draw counts: rows drawn with replacement, or whole groups when `groups` is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=n_boot).astype(np.float64)
    _, member = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = member.max() + 1
    drawn = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    return drawn[:, member].astype(np.float64)


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


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def top1(correct: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted fraction of correct rows."""
    return _ratio(w @ correct.astype(np.float64), w.sum(axis=1))


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """Mean recall over the classes drawn in each resample."""
    recalls = np.stack([_ratio(w @ ((labels == c) & (predicted == c)).astype(np.float64),
                               w @ (labels == c).astype(np.float64)) for c in range(n_classes)], axis=1)
    return _nanmean_rows(recalls)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means over the defined entries; NaN for a row with none."""
    n = np.isfinite(x).sum(axis=1)
    return _ratio(np.where(np.isfinite(x), x, 0).sum(axis=1), n.astype(np.float64))


def _sorted_groups(scores: np.ndarray):
    """(order by descending score, start of each group of tied scores in that order)."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1] if len(s) else np.zeros(0, int)
    return order, starts


def _group_sums(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(x, starts, axis=1) if x.shape[1] else x


def roc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (B, K + 1), at every distinct score from the highest, starting at (0, 0)."""
    order, starts = _sorted_groups(np.asarray(scores, np.float64))
    p = np.asarray(positive, bool)[order]
    wp, wn = w[:, order] * p, w[:, order] * ~p
    tps = np.cumsum(_group_sums(wp, starts), axis=1)
    fps = np.cumsum(_group_sums(wn, starts), axis=1)
    zeros = np.zeros((len(w), 1))
    return (np.c_[zeros, _ratio(fps, fps[:, -1:])], np.c_[zeros, _ratio(tps, tps[:, -1:])])


def auroc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC (ties count half), NaN where a side was not drawn."""
    order, starts = _sorted_groups(np.asarray(scores, np.float64))
    p = np.asarray(positive, bool)[order]
    gp, gn = _group_sums(w[:, order] * p, starts), _group_sums(w[:, order] * ~p, starts)
    neg_above = np.cumsum(gn, axis=1) - gn  # negatives scoring strictly higher than the group
    wins = (gp * (gn.sum(axis=1, keepdims=True) - neg_above - gn) + 0.5 * gp * gn).sum(axis=1)
    return _ratio(wins, gp.sum(axis=1) * gn.sum(axis=1))


def eer(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Where FPR = FNR, interpolated between the two ROC points that bracket it (as metrics.eer)."""
    fpr, tpr = roc(scores, positive, w)
    diff = (1 - tpr) - fpr
    k = np.argmax(diff <= 0, axis=1)
    rows = np.arange(len(w))
    prev = np.maximum(k - 1, 0)
    d0, d1 = diff[rows, prev], diff[rows, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(d0 != d1, d0 / (d0 - d1), 0.0)
    out = np.where((k == 0) | (d1 == 0), fpr[rows, k], fpr[rows, prev] + t * (fpr[rows, k] - fpr[rows, prev]))
    return np.where(np.isnan(fpr).any(axis=1) | np.isnan(tpr).any(axis=1), np.nan, out)


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, w: np.ndarray, target: float = 0.95) -> np.ndarray:
    """The smallest FPR among thresholds that keep at least `target` of the positives."""
    fpr, tpr = roc(scores, positive, w)
    return np.where(tpr >= target - 1e-12, fpr, np.inf).min(axis=1)


def per_class_auc(probs: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, C): each class's one-vs-rest AUROC per resample, NaN where the class was not drawn."""
    return np.stack([auroc(probs[:, c], labels == c, w) for c in range(probs.shape[1])], axis=1)


def macro_auc(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, per_class: np.ndarray | None = None) -> np.ndarray:
    """Mean one-vs-rest AUROC over the classes drawn in each resample (Eq. 18); `per_class`: that
    function's result, when already computed."""
    return _nanmean_rows(per_class_auc(probs, labels, w) if per_class is None else per_class)


def ovl(a: np.ndarray, b: np.ndarray, w: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """Eq. 20 per resample: `metrics.ovl` with each density's kernels weighted by the draw counts
    (w: (B, len(a) + len(b)), a's rows first). The kernels' centres move with the resample but their
    widths stay those of the full sample (the bootstrap of the density given its bandwidth), so every
    resample is one matrix product on the same grid."""
    from leakpipe.pipeline.math.metrics import ovl_grid

    if len(a) < 2 or len(b) < 2:
        return np.full(len(w), np.nan)
    kdes, grid = ovl_grid(a, b)
    step = max(1, block // max(len(a), len(b)))
    low = np.empty((len(w), len(grid)))
    for s in range(0, len(grid), step):
        f = [_weighted_mixture(grid[s:s + step], c, h, part)
             for (c, h), part in zip(kdes, (w[:, :len(a)], w[:, len(a):]))]
        low[:, s:s + step] = np.minimum(*f)
    return np.clip(np.trapezoid(low, grid, axis=1), 0.0, 1.0)


def _weighted_mixture(at: np.ndarray, centres: np.ndarray, widths: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, len(at)): sum_i w_bi N(at; centres_i, widths_i) / sum_i w_bi."""
    z = (at[None] - centres[:, None]) / widths[:, None]
    kernels = np.exp(-0.5 * z * z) / (widths[:, None] * np.sqrt(2 * np.pi))
    return _ratio(w @ kernels, w.sum(axis=1, keepdims=True))
