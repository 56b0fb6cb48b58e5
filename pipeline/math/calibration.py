"""Calibrating the head's posterior: temperature scaling fitted on held-out rows by the negative
log-likelihood, and the reliability diagram's bins.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
p = softmax(logits / T), one T > 0 for every class, fitted by minimising the NLL on validation rows.
It divides every logit of a row by the same number, so it never changes the predicted class (nor any
row's ranking of the classes). The per-class variant (the authors' `--calibration-mode perclass_temp`)
divides column k by its own T_k: more parameters, and it can change the predicted class.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from leakpipe.pipeline.math import metrics

LOG_T_BOUNDS = (float(np.log(1e-3)), float(np.log(1e3)))  # the authors' clamp of T: [1e-3, 1e3]
# The prior log T ~ N(0, PRIOR_SD^2) of every temperature (the head as trained is right within a factor
# e at one sd). Without it the NLL has no minimum when the validation rows are all classified right
# (it falls to 0 as T -> 0): the fit runs to the bound and the posterior says 1.000 to every image.
# On the demo, fitted on 50 random halves of its 80 validation images, that gave a test NLL of 9.4
# on average (39 at worst) against 0.41 uncalibrated; with the prior, see README "How to read the numbers".
PRIOR_SD = 1.0


def scaled_posterior(logits: np.ndarray, temperature) -> np.ndarray:
    """softmax(logits / T) row by row, T a number (global) or one per class (C,)."""
    z = np.asarray(logits, np.float64) / np.asarray(temperature, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature=1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = np.asarray(logits, np.float64) / np.asarray(temperature, np.float64)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(z)), labels]).mean()) if len(z) else float("nan")


def _prior(s: np.ndarray, n: int) -> float:
    """The prior's share of the per-row objective: (log T)^2 / (2 PRIOR_SD^2 n), summed over the T's."""
    return float(np.sum(np.square(s))) / (2 * PRIOR_SD**2 * n)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The global T minimising the NLL (Guo et al. 2017, Sec. 4.2) plus the prior on log T (MAP; the
    prior's weight is that of one row, so it decides only where the data do not), searched on log T
    within LOG_T_BOUNDS (bounded Brent); 1.0 without rows."""
    if len(labels) == 0:
        return 1.0
    n = len(labels)
    res = minimize_scalar(
        lambda s: nll(logits, labels, np.exp(s)) + _prior(s, n),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(res.x))


def fit_class_temperature(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One T_k per class minimising the NLL of softmax(logits / T) plus the prior on each log T_k (the
    authors' per-class temperature, without a prior; they take 200 Adam steps, this the optimum by
    L-BFGS-B on log T with the exact gradient)."""
    logits = np.asarray(logits, np.float64)
    n, c = logits.shape
    if n == 0:
        return np.ones(c)
    onehot = np.eye(c)[labels]

    def objective(s: np.ndarray):
        z = logits / np.exp(s)
        p = scaled_posterior(z, 1.0)
        # d NLL / d log T_k = mean_i (p_ik - y_ik) * (-z_ik)
        return nll(z, labels) + _prior(s, n), -((p - onehot) * z).mean(axis=0) + s / (PRIOR_SD**2 * n)

    res = minimize(objective, np.zeros(c), jac=True, method="L-BFGS-B", bounds=[LOG_T_BOUNDS] * c)
    return np.exp(res.x)


def fit(method: str, logits: np.ndarray, labels: np.ndarray):
    """The temperature of `method`: temperature (a number), class_temperature (one per class) or
    none (1.0)."""
    if method == "temperature":
        return fit_temperature(logits, labels)
    if method == "class_temperature":
        return fit_class_temperature(logits, labels)
    if method == "none":
        return 1.0
    raise ValueError(f"unknown calibration method {method!r}")


CV_FOLDS = 5  # folds of the cross-validated ECE that decides whether calibrating helps


def cross_validated_ece(logits: np.ndarray, labels: np.ndarray, method: str, seed: int = 0) -> tuple[float, float]:
    """(ECE of the posterior as trained, ECE of `method` fitted on the other folds and applied to each held-
    out fold), over the same rows: whether calibrating helps images it was not fitted on. NaN for both
    with fewer than two rows a fold."""
    n = len(labels)
    if n < 2 * CV_FOLDS:
        return float("nan"), float("nan")
    logits = np.asarray(logits, np.float64)
    fold = np.random.default_rng([seed, 41]).permutation(n) % CV_FOLDS
    after = np.empty_like(logits)
    for k in range(CV_FOLDS):
        out = fold == k
        after[out] = scaled_posterior(logits[out], fit(method, logits[~out], labels[~out]))
    ece = lambda p: metrics.point(metrics.expected_calibration_error, p, labels)  # noqa: E731
    return ece(scaled_posterior(logits, 1.0)), ece(after)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """The reliability diagram's data on equal-width confidence bins (those of the ECE): per bin the
    row count, mean confidence (largest class probability) and accuracy (None where a bin is empty:
    metrics.json stays comparable with itself, as NaN never equals NaN)."""
    conf, right = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=bins) / count
        accuracy = np.bincount(which, right, minlength=bins) / count
    listed = lambda x: [None if np.isnan(v) else float(v) for v in x]  # noqa: E731
    return {
        "bins": bins,
        "count": count.astype(int).tolist(),
        "confidence": listed(mean_conf),
        "accuracy": listed(accuracy),
    }
