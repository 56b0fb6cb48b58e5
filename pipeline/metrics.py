"""Attribution metrics as pure numpy functions (Eq. 18-20)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney, ties averaged).

    NaN when there are no positives or no negatives (documented: the AUC is undefined there).
    """
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    return float((scores.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
