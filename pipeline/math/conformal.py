"""Split-conformal prediction sets and conformal p-values.

Split conformal (Vovk et al. 2005; Lei et al. 2018; Angelopoulos & Bates, "A Gentle Introduction to
Conformal Prediction", 2021): a nonconformity score s(x, y) is computed on n calibration rows; q is
the ceil((n + 1)(1 - alpha))-th smallest of them, and the set of x is {y : s(x, y) <= q}. If the
calibration rows and a new row are exchangeable, the new row's true class is in its set with
probability at least 1 - alpha, and (scores without ties) at most 1 - alpha + 1 / (n + 1). With
n < 1 / alpha - 1 there is no such order statistic: q is infinite and every set holds every class.

Scores: LAC (Sadinle, Lei & Wasserman 2019), s = 1 - p_y, gives the smallest sets on average; APS
(Romano, Sesia & Candes 2020), s = the posterior mass of the classes ranked above y plus u * p_y,
adapts the set to how spread the posterior is. Mondrian (class-conditional) conformal takes one q
per class from the calibration rows of that class, so each class's coverage holds on its own.
"""

from __future__ import annotations

import numpy as np

SCORES = ("lac", "aps")


def lac_scores(probs: np.ndarray) -> np.ndarray:
    """LAC nonconformity of every (row, class): 1 - p_k (Sadinle et al. 2019)."""
    return 1.0 - np.asarray(probs, np.float64)


def aps_scores(probs: np.ndarray, u: np.ndarray | float = 1.0) -> np.ndarray:
    """APS nonconformity of every (row, class): the mass of the classes ranked above k (by descending
    probability) plus u * p_k (Romano et al. 2020, Eq. 5); u = 1 is the deterministic score, u drawn
    uniformly on [0, 1] per row the randomised one."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    above = np.empty_like(probs)
    np.put_along_axis(above, order, np.cumsum(ranked, axis=1) - ranked, axis=1)
    return above + np.reshape(u, (-1, 1)) * probs


def class_scores(probs: np.ndarray, score: str, u: np.ndarray | float = 1.0) -> np.ndarray:
    """(n, C) nonconformity of every class for every row under `score` (lac | aps)."""
    if score == "lac":
        return lac_scores(probs)
    if score == "aps":
        return aps_scores(probs, u)
    raise ValueError(f"unknown conformity score {score!r}; choose one of {', '.join(SCORES)}")


def quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest of the n calibration
    scores, +inf when that rank exceeds n (too few rows for level 1 - alpha)."""
    scores = np.sort(np.asarray(scores, np.float64))
    k = int(np.ceil((len(scores) + 1) * (1 - alpha) - 1e-12))
    return float(scores[k - 1]) if 1 <= k <= len(scores) else (float("inf") if k > len(scores) else -float("inf"))


def thresholds(
    cal_scores: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float, mondrian: bool = False
) -> np.ndarray:
    """(C,) the threshold each class is held to: the same split-conformal quantile of the calibration
    rows' true-class scores for all, or (Mondrian) each class's quantile of its own rows' scores."""
    true = np.asarray(cal_scores, np.float64)[np.arange(len(labels)), labels]
    if not mondrian:
        return np.full(n_classes, quantile(true, alpha))
    return np.array([quantile(true[labels == c], alpha) for c in range(n_classes)])


def prediction_sets(scores: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, C) boolean: class k is in row i's set iff its nonconformity is at most class k's threshold."""
    return np.asarray(scores) <= np.asarray(q)[None, :]


def p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values of `scores` against the calibration scores, low meaning unusual (a KDE
    log-density): (1 + #{calibration <= s}) / (n + 1). Valid under exchangeability:
    P(p <= alpha) <= alpha for a row drawn like the calibration rows."""
    cal = np.sort(np.asarray(calibration, np.float64))
    below = np.searchsorted(cal, np.asarray(scores, np.float64), side="right")
    return (1.0 + below) / (len(cal) + 1.0)


def cut(calibration: np.ndarray, alpha: float) -> float:
    """The score below which p_values(calibration, s) <= alpha: the floor(alpha (n + 1))-th smallest
    calibration score (-inf when that is the 0-th: no score can then be flagged)."""
    cal = np.sort(np.asarray(calibration, np.float64))
    k = int(np.floor(alpha * (len(cal) + 1) + 1e-12))
    return float(cal[min(k, len(cal)) - 1]) if k >= 1 else -float("inf")
