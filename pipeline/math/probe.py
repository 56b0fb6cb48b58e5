"""The linear probe every baseline is: a logistic regression on standardised features."""

from __future__ import annotations

import numpy as np


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float = 0.5) -> np.ndarray:
    """Predicted test labels of a logistic regression (inverse regularisation `c`) fitted on the
    standardised training features."""
    from sklearn.linear_model import LogisticRegression  # heavy: only when a baseline is fitted
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    return clf.fit(train_x, train_y).predict(test_x)
