"""Binned Gaussian kernels: a large sample's kernels moved onto a few nodes by linear binning, so that
sums over the sample (the pilot density of OVL's adaptive KDE, each bootstrap resample's weighted
mixture) cost the nodes, not the rows.

Linear binning splits each kernel between the nodes that bracket it, in proportion to its distance
from each: its weight and its mean are kept exactly; what changes is second order in the node
spacing (a kernel of width s on nodes spaced d apart gains at most d^2 / 4 of variance). The spacing
is a fraction of the kernels' own widths, so the error is the same at any scale; tests/test_metrics.py
and benchmarks/scale.py measure it against the exact sums.
"""

from __future__ import annotations

import numpy as np

PER_BANDWIDTH = 32  # mesh points per bandwidth of a fixed-bandwidth KDE
MAX_MESH = 1 << 22  # a range wider than this many mesh points gets a coarser mesh (memory: 32 MiB)
STEP = 0.1  # node spacing of the adaptive kernels, in units of the kernel width
WIDTH_STEP = 0.05  # ratio of neighbouring node widths, as a log: nodes are 5% apart in width


def linear_bin(x: np.ndarray, lo: float, step: float, size: int) -> np.ndarray:
    """(size,) weights of the points x on the mesh lo + k step: each point split between its two nodes."""
    pos = np.clip((x - lo) / step, 0, size - 1)
    left = np.minimum(pos.astype(np.int64), size - 2)
    frac = pos - left
    return np.bincount(left, 1 - frac, size) + np.bincount(left + 1, frac, size)


def fixed_density(x: np.ndarray, h: float) -> np.ndarray:
    """mean_i N(x_j; x_i, h) at every point x_j, from the points binned on a mesh of spacing h / 32,
    convolved with the kernel by FFT and read back by linear interpolation."""
    from scipy.signal import fftconvolve

    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= h / PER_BANDWIDTH:  # the whole sample within one mesh step: one kernel's peak
        return np.full(len(x), 1 / (h * np.sqrt(2 * np.pi)))
    size = int(min(MAX_MESH, np.ceil((hi - lo) * PER_BANDWIDTH / h) + 1))
    step = (hi - lo) / (size - 1)
    reach = min(size - 1, int(np.ceil(9 * h / step)))  # beyond 9 bandwidths a kernel is below 3e-18 of its peak
    taps = np.arange(-reach, reach + 1)
    kernel = np.exp(-0.5 * (taps * step / h) ** 2) / (h * np.sqrt(2 * np.pi))
    dens = fftconvolve(linear_bin(x, lo, step, size), kernel, mode="same") / len(x)
    return np.maximum(np.interp(x, lo + step * np.arange(size), dens), 1e-300)


def kernel_nodes(centres: np.ndarray, widths: np.ndarray, step: float = STEP, width_step: float = WIDTH_STEP):
    """(node centres (m,), node widths (m,), spread (n, m) sparse): each kernel N(c_i, s_i) shared among
    up to four nodes, by linear binning in log width (the widths exp(j width_step) that bracket s_i)
    and, at each of those widths s, in position (the multiples of step x s that bracket c_i). A
    resample's node weights are `w @ spread`."""
    from scipy import sparse

    level = np.log(widths) / width_step
    j0 = np.floor(level).astype(np.int64)
    rows, cols, vals = [], [], []
    for j, wj in ((j0, 1 - (level - j0)), (j0 + 1, level - j0)):
        spacing = step * np.exp(j * width_step)
        pos = centres / spacing
        k0 = np.floor(pos).astype(np.int64)
        for k, wk in ((k0, 1 - (pos - k0)), (k0 + 1, pos - k0)):
            rows.append(np.arange(len(centres)))
            cols.append(np.stack([j, k], axis=1))
            vals.append(wj * wk)
    keys, index = np.unique(np.concatenate(cols), axis=0, return_inverse=True)
    node_w = np.exp(keys[:, 0] * width_step)
    node_c = keys[:, 1] * step * node_w
    spread = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), index.ravel())), shape=(len(centres), len(keys))
    )
    return node_c, node_w, spread
