"""Saved embeddings of one split under one trained model: `runs/<run>/embeddings/<split>.zarr`.

Arrays, row-aligned with the split's manifest (rows that are not valid in the latent cache, such as
unreadable images, have valid = false and zeros elsewhere):
    h_bar (N, D), w (N, D), a_t (N, T), logits (N, C), pi (N, C) = softmax(logits),
    d_min (N, C) smallest prototype distance per class, pi_cm (N, C, M) prototype responsibilities
    (Eq. 15), r (N, D) per-feature contributions to the winning prototype's distance (Eq. 14),
    valid (N,) bool
Attributes: classes, timesteps, model and latent fingerprints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from leakpipe.pipeline.store.atomic import atomic_path

ARRAYS = ("h_bar", "w", "a_t", "logits", "pi", "d_min", "pi_cm", "r")


def write(path: Path, n_rows: int, valid_rows: np.ndarray, outputs: dict[str, np.ndarray], attrs: dict) -> None:
    """Write to a temporary group, then rename: readers never see a half-written store."""
    with atomic_path(path, folder=True) as tmp:
        _write_group(zarr.open_group(str(tmp), mode="w"), n_rows, valid_rows, outputs, attrs)


def _write_group(group, n_rows: int, valid_rows: np.ndarray, outputs: dict[str, np.ndarray], attrs: dict) -> None:
    logits = outputs["logits"]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True)) if len(logits) else logits
    full = {**outputs, "pi": shifted / shifted.sum(axis=1, keepdims=True) if len(logits) else logits}
    for name in ARRAYS:
        arr = full[name]
        data = np.zeros((n_rows, *arr.shape[1:]), np.float32)
        data[valid_rows] = arr
        group.create_array(name, data=data, chunks=(min(4096, max(n_rows, 1)), *arr.shape[1:]))
    valid = np.zeros(n_rows, bool)
    valid[valid_rows] = True
    group.create_array("valid", data=valid, chunks=(min(4096, max(n_rows, 1)),))
    group.attrs.update(attrs)


def read(path: Path) -> dict:
    """All arrays as numpy, plus `attrs`."""
    group = zarr.open_group(str(path), mode="r")
    out = {name: group[name][:] for name in (*ARRAYS, "valid")}
    out["attrs"] = dict(group.attrs)
    return out
