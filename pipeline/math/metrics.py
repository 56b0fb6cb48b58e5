"""Attribution and open-set metrics as pure numpy functions (Eq. 18-20).

Conventions: `positive` marks the class whose score should be high (for the open set: closed-set
samples, scored by their KDE log-density). An AUC is undefined without both positives and
negatives; it is then NaN (documented), never an exception, so one empty class cannot stop a report.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _check(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be equal 1-D shapes")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return scores, positive


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC = P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney with averaged ranks); NaN if a side is empty."""
    scores, positive = _check(scores, positive)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray):
    """(fpr, tpr, thresholds) at every distinct score, highest first, starting at (0, 0) with +inf.

    The same points as scikit-learn's `roc_curve(..., drop_intermediate=False)`; NaN rates for an
    empty side.
    """
    scores, positive = _check(scores, positive)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.zeros(0, int)
    tps, fps = np.cumsum(p)[last], np.cumsum(~p)[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0, tps] / (tps[-1] if len(tps) and tps[-1] else np.nan)
        fpr = np.r_[0, fps] / (fps[-1] if len(fps) and fps[-1] else np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def eer(scores: np.ndarray, positive: np.ndarray) -> float:
    """Eq. 19: the error rate where the false-positive rate equals the false-negative rate,
    linearly interpolated between the two ROC points that bracket the crossing."""
    fpr, tpr, _ = roc_curve(scores, positive)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    fnr = 1 - tpr
    diff = fnr - fpr  # decreasing from 1 to -1 along the curve
    k = int(np.argmax(diff <= 0))
    if k == 0 or diff[k] == 0:
        return float(fpr[k])
    t = diff[k - 1] / (diff[k - 1] - diff[k])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr_target: float = 0.95) -> float:
    """The smallest false-positive rate among thresholds that keep at least `tpr_target` true positives."""
    fpr, tpr, _ = roc_curve(scores, positive)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    return float(fpr[tpr >= tpr_target - 1e-12].min())


def _pilot_bandwidth(x: np.ndarray, max_points: int = 1000) -> float:
    """The fixed bandwidth with the best leave-one-out log-likelihood over a log grid (on up to
    `max_points` evenly spaced order statistics): unlike Silverman's rule it narrows for a sharp mode
    inside a wide mixture. The worst 5% of points are left out of the objective, or isolated
    heavy-tail points would force a wide bandwidth on everything."""
    xs = np.sort(x)[np.linspace(0, len(x) - 1, min(len(x), max_points)).astype(int)]
    scale = xs.std() if xs.std() > 0 else max(abs(xs[0]), 1.0) * 1e-6
    d2 = (xs[:, None] - xs[None]) ** 2
    np.fill_diagonal(d2, np.inf)
    best, best_ll = scale, -np.inf
    for h in scale * np.logspace(-3, 0.5, 22):
        loo = np.exp(-0.5 * d2 / h ** 2).sum(axis=1) / ((len(xs) - 1) * h)
        logs = np.sort(np.log(np.maximum(loo, 1e-300)))
        ll = logs[len(logs) // 20:].mean()
        if ll > best_ll:
            best, best_ll = h, ll
    return float(best)


def _mixture(at: np.ndarray, centres: np.ndarray, widths: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """mean_i N(at; centres_i, widths_i), evaluated in blocks (memory ~ block floats)."""
    out = np.zeros(len(at))
    step = max(1, block // max(len(centres), 1))
    for s in range(0, len(at), step):
        z = (at[s:s + step, None] - centres[None]) / widths[None]
        out[s:s + step] = (np.exp(-0.5 * z * z) / widths[None]).mean(axis=1)
    return out / np.sqrt(2 * np.pi)


def adaptive_kde(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centres, widths) of Abramson's adaptive Gaussian KDE: a fixed-bandwidth pilot f, then width
    h * (f(x_i) / g)^(-1/2) per point (g: geometric mean of f at the points), so a narrow mode next
    to a wide one, or a heavy tail, keeps its own scale."""
    h = _pilot_bandwidth(x)
    pilot = _mixture(x, x, np.full(len(x), h))
    lam = np.sqrt(np.exp(np.log(pilot).mean()) / pilot)
    return x, h * lam


def ovl_grid(a: np.ndarray, b: np.ndarray, grid_points: int = 2048):
    """(adaptive KDEs of a and b, integration grid) of `ovl`: a grid uniform over both samples and
    refined around every kernel, so narrow modes are resolved however wide the range."""
    kdes = [adaptive_kde(np.asarray(x, np.float64)) for x in (a, b)]
    lo = min(float((c - 5 * w).min()) for c, w in kdes)
    hi = max(float((c + 5 * w).max()) for c, w in kdes)
    local = [c[::max(1, len(c) // 400), None] + w[::max(1, len(c) // 400), None] * np.linspace(-4, 4, 9)[None]
             for c, w in kdes]
    return kdes, np.unique(np.concatenate([np.linspace(lo, hi, grid_points), *(x.ravel() for x in local)]))


def ovl(a: np.ndarray, b: np.ndarray, grid_points: int = 2048) -> float:
    """Eq. 20: the overlap integral of min(f_a, f_b) of two 1-D score densities; 1 = identical,
    0 = disjoint; NaN if either has < 2 values. Each density is an adaptive KDE (`adaptive_kde`),
    integrated by the trapezoid rule on `ovl_grid`."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    kdes, grid = ovl_grid(a, b, grid_points)
    fa, fb = (_mixture(grid, c, w) for c, w in kdes)
    return float(np.clip(np.trapezoid(np.minimum(fa, fb), grid), 0.0, 1.0))


def oscr(closed_scores: np.ndarray, closed_correct: np.ndarray, open_scores: np.ndarray):
    """The open-set classification rate curve: at each threshold (every distinct score, highest first),
    the fraction of closed samples accepted *and* correctly attributed (CCR) against the fraction of
    open samples accepted (FPR). Returns (fpr, ccr, area under the curve over FPR 0..1); NaN if a side
    is empty. A perfect attributor and detector has area 1; the curve ends at (1, top-1)."""
    scores = np.r_[closed_scores, open_scores].astype(np.float64)
    good = np.r_[np.asarray(closed_correct, bool), np.zeros(len(open_scores), bool)]
    is_open = np.r_[np.zeros(len(closed_scores), bool), np.ones(len(open_scores), bool)]
    if not len(closed_scores) or not len(open_scores):
        return np.zeros(0), np.zeros(0), float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    fpr = np.r_[0, np.cumsum(is_open[order])[last] / len(open_scores)]
    ccr = np.r_[0, np.cumsum(good[order])[last] / len(closed_scores)]
    return fpr, ccr, float(np.trapezoid(ccr, fpr))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax: the class posterior pi from logits.

    One-vs-rest AUCs of a softmax head are computed on pi, not on logits: a logit column ranks samples
    mostly by how far each is from *every* prototype, which says little about its class (on the demo:
    top-1 0.78 with a logit macro AUC of 0.62).
    """
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def per_class_auc(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """One-vs-rest AUC of column c against label == c, for every class (NaN if c is absent)."""
    return np.array([roc_auc(scores[:, c], labels == c) for c in range(n_classes)])


def macro_auc(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Eq. 18: the mean one-vs-rest AUC over the classes present in `labels`."""
    aucs = per_class_auc(scores, labels, n_classes)
    present = ~np.isnan(aucs)
    if not present.any():
        raise ValueError("macro AUC needs at least two classes among the labels")
    return float(aucs[present].mean())


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose highest score is their label (NaN for no rows)."""
    return float((scores.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among their k highest scores (NaN for no rows)."""
    if not len(labels):
        return float("nan")
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((best == labels[:, None]).any(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share of
    rows, with confidence the largest class probability (NaN for no rows)."""
    if not len(labels):
        return float("nan")
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += abs((pred[sel] == labels[sel]).mean() - conf[sel].mean()) * sel.mean()
    return float(total)


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present: top-1 that every generator weighs equally."""
    recalls = [np.mean(predicted[labels == c] == c) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def closed_set(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Every closed-set number for one scorer: top-1, per-class and macro AUC, confusion matrix.

    A test set with fewer than two classes has no one-vs-rest AUC: macro AUC is then NaN.
    """
    aucs = per_class_auc(scores, labels, n_classes) if len(labels) else np.full(n_classes, np.nan)
    present = ~np.isnan(aucs)
    return {"n": int(len(labels)), "top1": top1(scores, labels),
            "top5": top_k(scores, labels, 5) if n_classes > 5 else None,  # with 5 classes or fewer it is 1
            "balanced_accuracy": balanced_accuracy(scores.argmax(1), labels, n_classes) if len(labels) else float("nan"),
            "macro_auc": float(aucs[present].mean()) if present.any() else float("nan"),
            "per_class_auc": aucs.tolist(),
            "confusion": confusion_matrix(scores.argmax(1), labels, n_classes).tolist() if len(labels)
            else np.zeros((n_classes, n_classes), int).tolist()}


def open_set(closed_scores: np.ndarray, open_scores: np.ndarray) -> dict:
    """AUROC, EER, OVL and FPR at 95% TPR of closed (positive) against open samples."""
    scores = np.r_[closed_scores, open_scores]
    positive = np.r_[np.ones(len(closed_scores), bool), np.zeros(len(open_scores), bool)]
    return {"n_closed": int(len(closed_scores)), "n_open": int(len(open_scores)),
            "auroc": roc_auc(scores, positive), "eer": eer(scores, positive),
            "ovl": ovl(closed_scores, open_scores), "fpr_at_95tpr": fpr_at_tpr(scores, positive, 0.95)}
