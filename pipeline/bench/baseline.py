"""A simple pixel baseline that calibrates the synthetic benchmark's difficulty.

Logistic regression on per-channel means and the low-frequency k x k DCT-II block of each channel
(image resized to `size`): it sees the colour response and the bias field but not the periodic
artefact or the noise, so it is well above chance and well below perfect by design.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

from leakpipe.pipeline.manifest import Manifest
from leakpipe.pipeline.math.probe import probe


def pixel_features(path, size: int = 64, k: int = 8) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), float) / 255
    coeffs = dctn(arr, axes=(0, 1), norm="ortho")[:k, :k, :]
    return np.concatenate([arr.mean(axis=(0, 1)), coeffs.ravel()])


def features(m: Manifest, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([pixel_features(m.abspath(i)) for i in rows])
    return x, np.array([m.rows[i]["label"] for i in rows])


def train_test_accuracy(train: Manifest, tests: dict[str, Manifest]) -> dict[str, float]:
    """Fit on train's `train` rows; top-1 accuracy on each test manifest's `test` rows."""
    x, y = features(train, [i for i, r in enumerate(train.rows) if r["partition"] == "train"])
    out = {}
    for name, m in tests.items():
        for variant in sorted({r["variant"] for r in m.rows}):
            rows = [i for i, r in enumerate(m.rows) if r["partition"] == "test" and r["variant"] == variant]
            if rows:
                xt, yt = features(m, rows)
                out[f"{name}:{variant}"] = float((probe(x, y, xt) == yt).mean())
    return out
