"""Attribution and open-set metrics (Eq. 18-20), each written once, as a function of draw weights.

Every metric takes `w` (B, n): how many times each of n rows (or each row of a resampled group) was
drawn in each of B resamples, and returns its B values. The point estimate is the metric with unit
weights (`point`); a bootstrap is the same function on resampled weights (math/bootstrap.py), so the
two can never disagree. The scores never change between resamples, so one sort serves all of them
and every metric is a weighted sum: no Python loop over resamples.

Conventions: `positive` marks the class whose score should be high (for the open set: closed-set
samples, scored by their KDE log-density). An AUC is undefined without both positives and
negatives; it is then NaN (documented), never an exception, so one empty class cannot stop a report.
"""

from __future__ import annotations

import numpy as np

from leakpipe.pipeline.math import binning


def unit(n: int) -> np.ndarray:
    """The weights of the sample itself: every row drawn once, (1, n)."""
    return np.ones((1, n))


def point(fn, *args, n: int | None = None, **kwargs):
    """The point estimate of a weighted metric: `fn(*args, w=unit weights)`, as a float (or an array
    for a per-class metric). The rows are those of the first argument, or `n` (OVL's two samples)."""
    n = len(np.asarray(args[0])) if n is None else n
    out = fn(*args, w=unit(n), **kwargs)[0]
    return float(out) if np.ndim(out) == 0 else np.asarray(out)


def _check(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be equal 1-D shapes")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return scores, positive


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


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


def fraction(flags: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted fraction of flagged rows (NaN where no row was drawn)."""
    return _ratio(w @ np.asarray(flags).astype(np.float64), w.sum(axis=1))


def top1(correct: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted fraction of correct rows."""
    return fraction(correct, w)


def coverage(sets: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted fraction of rows whose prediction set (n, C boolean) holds their true class."""
    return fraction(sets[np.arange(len(labels)), labels], w)


def set_size(sets: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean number of classes in a prediction set."""
    return _ratio(w @ sets.sum(axis=1).astype(np.float64), w.sum(axis=1))


def per_class_coverage(sets: np.ndarray, labels: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """(B, C): each class's coverage among its own rows (class-conditional), NaN where none was drawn."""
    hit = sets[np.arange(len(labels)), labels].astype(np.float64)
    return np.stack(
        [_ratio(w @ (hit * (labels == c)), w @ (labels == c).astype(np.float64)) for c in range(n_classes)], axis=1
    )


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray, n_classes: int, w: np.ndarray) -> np.ndarray:
    """Mean recall over the classes drawn in each resample."""
    recalls = np.stack(
        [
            _ratio(w @ ((labels == c) & (predicted == c)).astype(np.float64), w @ (labels == c).astype(np.float64))
            for c in range(n_classes)
        ],
        axis=1,
    )
    return _nanmean_rows(recalls)


def roc_counts(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false, true positives): the drawn weight above each threshold, (K + 1, B), one row per distinct
    score from the highest (after a row of zeros), one column per resample: what `roc`, `eer` and
    `fpr_at_tpr` read. Rows first, so that each row's resamples are contiguous (blocks.py draws
    them so) and the running sums run over whole rows."""
    scores, positive = _check(scores, positive)
    order, starts = _sorted_groups(scores)
    last = np.r_[starts[1:] - 1, len(scores) - 1] if len(scores) else starts  # the last row of each group
    drawn = w.T[order]
    fps, tps = np.zeros((len(last) + 1, len(w))), np.zeros((len(last) + 1, len(w)))
    tied = len(last) < len(scores)
    hits = np.multiply(drawn, positive[order][:, None], out=None if tied else tps[1:])
    np.cumsum(hits, axis=0, out=hits)
    np.cumsum(drawn, axis=0, out=drawn)
    np.subtract(drawn, hits, out=drawn)  # counts: exact, as every draw weight is a whole number
    if tied:
        fps[1:], tps[1:] = drawn[last], hits[last]
    else:
        fps[1:] = drawn
    return fps, tps


def _rates(counts: np.ndarray) -> np.ndarray:
    """Each column over its last entry (the total), NaN for a column whose total is 0."""
    total = counts[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = counts / np.where(total > 0, total, 1)
    out[:, total <= 0] = np.nan
    out[0] = 0.0
    return out


def roc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (B, K + 1), at every distinct score from the highest, starting at (0, 0)."""
    fps, tps = roc_counts(scores, positive, w)
    return _rates(fps).T, _rates(tps).T


def auroc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC (ties count half), NaN where a side was not drawn.

    Each positive row wins the drawn weight of the negatives scoring below it, and half of those tied
    with it: the running sum of the negatives' weights in score order, read where each positive falls
    (one sort of the scores serves every resample: O(B n))."""
    scores, positive = _check(scores, positive)
    neg, pos = np.flatnonzero(~positive), np.flatnonzero(positive)
    neg = neg[np.argsort(scores[neg], kind="mergesort")]
    below = np.searchsorted(scores[neg], scores[pos], "left")  # negatives strictly below each positive
    tied_to = np.searchsorted(scores[neg], scores[pos], "right")
    wt = w.T  # rows first: see roc_counts
    c = np.zeros((len(neg) + 1, len(w)))
    np.cumsum(wt[neg], axis=0, out=c[1:])
    under = c[below]
    if (tied_to != below).any():
        under += 0.5 * (c[tied_to] - under)
    wp = wt[pos]
    wins = np.einsum("ij,ij->j", wp, under)
    return _ratio(wins, wp.sum(axis=0) * c[-1])


def open_auroc(closed: np.ndarray, opened: np.ndarray) -> float:
    """AUROC of known (closed, the positives: higher log-density) against unseen scores (Eq. 18), the point estimate."""
    return point(auroc, np.r_[closed, opened], np.r_[np.ones(len(closed), bool), np.zeros(len(opened), bool)])


def eer(scores: np.ndarray, positive: np.ndarray, w: np.ndarray, counts=None) -> np.ndarray:
    """Where FPR = FNR, interpolated between the two ROC points that bracket it (as metrics.eer).
    `counts`: roc_counts(scores, positive, w), when already computed."""
    fps, tps = counts or roc_counts(scores, positive, w)
    fpr, tpr = _rates(fps), _rates(tps)
    diff = (1 - tpr) - fpr
    k = np.argmax(diff <= 0, axis=0)
    cols = np.arange(len(w))
    prev = np.maximum(k - 1, 0)
    d0, d1 = diff[prev, cols], diff[k, cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(d0 != d1, d0 / (d0 - d1), 0.0)
    out = np.where((k == 0) | (d1 == 0), fpr[k, cols], fpr[prev, cols] + t * (fpr[k, cols] - fpr[prev, cols]))
    return np.where((fps[-1] <= 0) | (tps[-1] <= 0), np.nan, out)


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, w: np.ndarray, target: float = 0.95, counts=None):
    """The smallest FPR among thresholds that keep at least `target` of the positives (the first such
    threshold: the FPR only grows). `counts`: roc_counts(scores, positive, w), when already computed."""
    fps, tps = counts or roc_counts(scores, positive, w)
    keeps = _rates(tps) >= target - 1e-12
    k = np.argmax(keeps, axis=0)
    return np.where(keeps.any(axis=0), _rates(fps)[k, np.arange(len(w))], np.inf)


def per_class_auc(probs: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, C): each class's one-vs-rest AUROC per resample, NaN where the class was not drawn."""
    return np.stack([auroc(probs[:, c], labels == c, w) for c in range(probs.shape[1])], axis=1)


def macro_auc(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, per_class: np.ndarray | None = None) -> np.ndarray:
    """Mean one-vs-rest AUROC over the classes drawn in each resample (Eq. 18); `per_class`: that
    function's result, when already computed."""
    return _nanmean_rows(per_class_auc(probs, labels, w) if per_class is None else per_class)


def top_k(scores: np.ndarray, labels: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Weighted fraction of rows whose label is among their k highest scores."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top1((best == labels[:, None]).any(axis=1), w)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, bins: int = 15) -> np.ndarray:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share of
    the drawn rows, with confidence the largest class probability."""
    return ece_of(calibration_terms(probs, labels, bins), w)


def calibration_terms(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> np.ndarray:
    """(n, 3 x the bins in use): each row's confidence bin as one-hot columns, then those times its
    correctness, then times its confidence, so that one matrix product with the weights gives every bin's
    weight, hits and confidence (built once for all the blocks of resamples of the same rows)."""
    conf, right = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    member = (which[:, None] == np.unique(which)[None]).astype(np.float64)
    return np.hstack([member, member * right[:, None], member * conf[:, None]])


def ece_of(terms: np.ndarray, w: np.ndarray) -> np.ndarray:
    """expected_calibration_error from the rows' calibration_terms and the weights (B, n)."""
    n, hits, confs = np.split(w @ terms, 3, axis=1)
    total = w.sum(axis=1)
    out = np.zeros(len(w))
    for b in range(n.shape[1]):
        gap = np.abs(_ratio(hits[:, b], n[:, b]) - _ratio(confs[:, b], n[:, b]))
        out += np.where(n[:, b] > 0, gap, 0.0) * _ratio(n[:, b], total)
    return np.where(total > 0, out, np.nan)


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
        loo = np.exp(-0.5 * d2 / h**2).sum(axis=1) / ((len(xs) - 1) * h)
        logs = np.sort(np.log(np.maximum(loo, 1e-300)))
        ll = logs[len(logs) // 20 :].mean()
        if ll > best_ll:
            best, best_ll = h, ll
    return float(best)


def _mixture(at: np.ndarray, centres: np.ndarray, widths: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """mean_i N(at; centres_i, widths_i), evaluated in blocks (memory ~ block floats)."""
    out = np.zeros(len(at))
    step = max(1, block // max(len(centres), 1))
    for s in range(0, len(at), step):
        z = (at[s : s + step, None] - centres[None]) / widths[None]
        out[s : s + step] = (np.exp(-0.5 * z * z) / widths[None]).mean(axis=1)
    return out / np.sqrt(2 * np.pi)


EXACT_ROWS = 2000  # OVL of a sample up to this size sums every kernel; above, binned kernels (math/binning.py)


def _binned(n: int, binned: bool | None) -> bool:
    return n > EXACT_ROWS if binned is None else binned


def adaptive_kde(x: np.ndarray, binned: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centres, widths) of Abramson's adaptive Gaussian KDE: a fixed-bandwidth pilot f, then width
    h * (f(x_i) / g)^(-1/2) per point (g: geometric mean of f at the points), so a narrow mode next
    to a wide one, or a heavy tail, keeps its own scale. The pilot of a sample above EXACT_ROWS (or
    with `binned`) is summed from binned kernels (math/binning.py)."""
    h = _pilot_bandwidth(x)
    pilot = binning.fixed_density(x, h) if _binned(len(x), binned) else _mixture(x, x, np.full(len(x), h))
    lam = np.sqrt(np.exp(np.log(pilot).mean()) / pilot)
    return x, h * lam


def ovl_grid(a: np.ndarray, b: np.ndarray, grid_points: int = 2048, binned: bool | None = None):
    """(adaptive KDEs of a and b, integration grid) of `ovl`: a grid uniform over both samples and
    refined around every kernel, so narrow modes are resolved however wide the range."""
    kdes = [adaptive_kde(np.asarray(x, np.float64), binned) for x in (a, b)]
    lo = min(float((c - 5 * w).min()) for c, w in kdes)
    hi = max(float((c + 5 * w).max()) for c, w in kdes)
    local = [
        c[:: max(1, len(c) // 400), None] + w[:: max(1, len(c) // 400), None] * np.linspace(-4, 4, 9)[None]
        for c, w in kdes
    ]
    return kdes, np.unique(np.concatenate([np.linspace(lo, hi, grid_points), *(x.ravel() for x in local)]))


def ovl_kernels(a: np.ndarray, b: np.ndarray, binned: bool | None = None):
    """([(centres, widths, spread) of a's and b's kernels], grid): what `ovl` sums on its grid. A sample
    above EXACT_ROWS (or every one, with `binned`; none with binned=False) gets binned kernels: nodes,
    and `spread`, each row's share of each node (None: the kernels are the rows' own), unless binning
    would not halve the kernels to sum."""
    kdes, grid = ovl_grid(a, b, binned=binned)
    out = []
    for c, h in kdes:
        nodes = binning.kernel_nodes(c, h) if _binned(len(c), binned) else None
        keep = nodes is not None and (binned or len(nodes[0]) < len(c) // 2)
        out.append(nodes if keep else (c, h, None))
    return out, grid


def ovl(a: np.ndarray, b: np.ndarray, w: np.ndarray, kernels=None, block: int = 1 << 22) -> np.ndarray:
    """Eq. 20 per resample: `metrics.ovl` with each density's kernels weighted by the draw counts
    (w: (B, len(a) + len(b)), a's rows first). The kernels' centres move with the resample but their
    widths stay those of the full sample (the bootstrap of the density given its bandwidth), so every
    resample is one matrix product on the same grid. `kernels`: `ovl_kernels(a, b)`, when computed."""
    if len(a) < 2 or len(b) < 2:
        return np.full(len(w), np.nan)
    (ka, kb), grid = kernels or ovl_kernels(a, b)
    parts = [_node_weights(w[:, : len(a)], ka[2]), _node_weights(w[:, len(a) :], kb[2])]
    step = max(1, block // max(len(ka[0]), len(kb[0])))
    low = np.empty((len(w), len(grid)))
    for s in range(0, len(grid), step):
        f = [_weighted_mixture(grid[s : s + step], c, h, part) for (c, h, _), part in zip((ka, kb), parts)]
        low[:, s : s + step] = np.minimum(*f)
    return np.clip(np.trapezoid(low, grid, axis=1), 0.0, 1.0)


def _node_weights(w: np.ndarray, spread) -> np.ndarray:
    """(B, nodes): the rows' draw counts moved onto their kernels' nodes (the rows themselves: no spread)."""
    return w if spread is None else np.asarray(spread.T @ w.T).T


def _weighted_mixture(at: np.ndarray, centres: np.ndarray, widths: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, len(at)): sum_i w_bi N(at; centres_i, widths_i) / sum_i w_bi."""
    z = (at[None] - centres[:, None]) / widths[:, None]
    kernels = np.exp(-0.5 * z * z) / (widths[:, None] * np.sqrt(2 * np.pi))
    return _ratio(w @ kernels, w.sum(axis=1, keepdims=True))


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


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
