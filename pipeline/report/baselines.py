"""Baselines beside the model, on the same split: the chance level, a forensic pixel baseline, and a
linear probe on the cached z0 (which tells whether stage one kept the signal at all).

Both baselines are logistic regressions on standardised features. The pixel baseline's features are
the classical forensic ones of `math/forensic.py` (block-DCT statistics on the JPEG grid, noise
residuals, the power spectrum, colour means), computed from each original file at its native
resolution (a centre crop of at most score.baseline_max_side, never resized), so it reads codec and
resampling traces rather than content. Comparisons are paired: the same bootstrap resamples of the
same test images.
"""

from __future__ import annotations

import numpy as np

from leakpipe.pipeline.math import bootstrap, metrics
from leakpipe.pipeline.math.probe import probe  # noqa: F401  (the baselines' classifier)
from leakpipe.pipeline.math.forensic import features


def forensic_matrix(paths: list, max_side: int, max_pixels: int) -> np.ndarray:
    """(N, F) forensic features of the files, each read at its native resolution."""
    from leakpipe.pipeline.engine.images import load_native

    return np.stack([features(load_native(p, max_side, max_pixels)) for p in paths])


def scored(correct: np.ndarray, rs: bootstrap.Resamples | None) -> dict:
    """top-1 of a baseline's correct/incorrect rows, with its interval over the resamples `rs`."""
    out: dict = {"top1": float(correct.mean()) if len(correct) else float("nan")}
    if rs is not None:
        out["ci"] = {"top1": bootstrap.interval(rs.of(lambda w: metrics.top1(correct, w), len(correct)))}
    return out


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray, rs: bootstrap.Resamples) -> dict:
    """top-1 of a minus top-1 of b on the same resamples of the same images (bootstrap.paired)."""
    diff = rs.of(lambda w: metrics.top1(a_correct, w) - metrics.top1(b_correct, w), len(a_correct))
    return bootstrap.paired(a_correct.mean() - b_correct.mean(), diff)


def _below(d: dict | None) -> bool:
    """A paired difference whose whole 95% interval is below 0."""
    return bool(d) and d["ci"][1] < 0


def notes(b: dict) -> list[str]:
    """Plain words for a model significantly below the forensic baseline, a z0 probe at chance, and
    traces the forensic baseline finds in the files that neither the model nor the z0 probe sees."""
    out = []
    d = b.get("head_minus_forensic")
    if _below(d):
        out.append(
            f"The model's top-1 is significantly below the forensic pixel baseline's on the same test images "
            f"(difference {d['difference']:+.3f}, 95% interval {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}): "
            "a logistic regression on codec, noise-residual and spectral statistics of the original files "
            "attributes these images better."
        )
    chance, pixels = b["chance"], b.get("z0_is_pixels", False)
    z = b.get("z0_probe", {})
    lo, hi = z.get("ci", {}).get("top1", [np.nan, np.nan])
    if lo <= chance <= hi:
        out.append(
            f"A linear probe on the cached z0 is at chance (top-1 {z['top1']:.3f}, interval {lo:.3f} to "
            f"{hi:.3f}; chance {chance:.3f}): "
            + (
                "here z0 is the image itself (vae.source = pixels), whose traces are not linear in the pixel values."
                if pixels
                else "stage one may have lost the generator signal before the model saw "
                "it (try another encoder, or `vae.source` of the real SD2.1 VAE)."
            )
        )
    f = b.get("forensic", {})
    f_lo = f.get("ci", {}).get("top1", [np.nan])[0]
    if f_lo > chance and _below(b.get("z0_probe_minus_forensic")) and _below(d):
        seen = (
            f"The forensic pixel baseline finds traces in the files (top-1 {f['top1']:.3f}, interval from "
            f"{f_lo:.3f}; chance {chance:.3f}) that neither the model ({b['head']['top1']:.3f}) nor the z0 probe "
            f"({z['top1']:.3f}) sees: "
        )
        out.append(
            seen
            + (
                "the model, on the pixels themselves, does not learn them from this training set (more "
                "images or epochs, `features.highpass = residual`, `diffusion.noise = false`)."
                if pixels
                else "the signal is there, but stage one's encoder does not keep it. Try `vae.source = pixels` "
                "with `train.crop` (the model on the pixels themselves), or another encoder."
            )
        )
    return out
