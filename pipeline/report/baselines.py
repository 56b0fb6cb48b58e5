"""Baselines beside the model, on the same split: the chance level, a classical pixel baseline, and a
linear probe on the cached z0 (which tells whether stage one kept the signal at all).

Both baselines are logistic regressions on standardised features; the pixel features are those of
`bench/baseline.py` (per-channel means and the low-frequency 8 x 8 DCT block of each channel). The
comparison with the model is paired: the same bootstrap resamples of the same test images.
"""
from __future__ import annotations

import numpy as np

from leakpipe.pipeline.math import bootstrap


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Predicted test labels of a logistic regression fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    return clf.fit(train_x, train_y).predict(test_x)


def scored(correct: np.ndarray, w: np.ndarray | None) -> dict:
    out = {"top1": float(correct.mean()) if len(correct) else float("nan")}
    if w is not None:
        out["ci"] = {"top1": bootstrap.interval(bootstrap.top1(correct, w))}
    return out


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray, w: np.ndarray) -> dict:
    """top-1 of a minus top-1 of b on the same resamples of the same images (bootstrap.paired)."""
    return bootstrap.paired(a_correct.mean() - b_correct.mean(),
                            bootstrap.top1(a_correct, w) - bootstrap.top1(b_correct, w))


def notes(b: dict) -> list[str]:
    """Plain words for a model significantly below the pixel baseline, or a z0 probe at chance."""
    out = []
    d = b.get("head_minus_pixel")
    if d and d["ci"][1] < 0:
        out.append(f"The model's top-1 is significantly below the pixel baseline's on the same test images "
                   f"(difference {d['difference']:+.3f}, 95% interval {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}): "
                   "a simple classifier on block-DCT and colour statistics attributes these images better.")
    z = b.get("z0_probe", {})
    lo, hi = z.get("ci", {}).get("top1", [np.nan, np.nan])
    if lo <= b["chance"] <= hi:
        out.append(f"A linear probe on the cached z0 is at chance (top-1 {z['top1']:.3f}, interval {lo:.3f} to "
                   f"{hi:.3f}; chance {b['chance']:.3f}): stage one may have lost the generator signal before "
                   "the model saw it (try another encoder, or `vae.source` of the real SD2.1 VAE).")
    return out
