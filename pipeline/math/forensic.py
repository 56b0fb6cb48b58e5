"""Classical forensic features of one image at its native resolution, for the pixel baseline.

They read the traces codecs and resamplers leave, not the content: statistics of the 8 x 8 block DCT
of the luminance on the JPEG grid from the image origin (quantisation shows as coefficients near
multiples of a step, and as zeros), noise residuals of fixed high-pass filters (the SRM family of
Fridrich and Kodovsky, 2012) with their co-occurrences, the azimuthally averaged power spectrum
(resampling moves and removes high frequencies), blockiness at the 8-pixel grid, and the colour
means. Every function takes float arrays in 0..255 and returns a 1-D feature vector.
"""

from __future__ import annotations

import numpy as np

BLOCK = 8
QUANT_STEPS = np.arange(2, 11)  # quantisation steps whose lattice `block_dct` looks for
QUANT_FREQUENCIES = 20  # lowest zig-zag AC frequencies examined for quantisation


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (JPEG's Y) of an (H, W, 3) array."""
    return rgb @ np.array([0.299, 0.587, 0.114])


def dct_basis(n: int = BLOCK) -> np.ndarray:
    """The orthonormal DCT-II matrix (JPEG's transform) of size n."""
    k, i = np.arange(n)[:, None], np.arange(n)[None]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    c[0] /= np.sqrt(2)
    return c


def zigzag(n: int = BLOCK) -> list[tuple[int, int]]:
    """JPEG's zig-zag order of the (u, v) frequencies of an n x n block."""
    return sorted(
        ((u, v) for u in range(n) for v in range(n)), key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else p[1])
    )


def blocks(y: np.ndarray) -> np.ndarray:
    """(nb, 8, 8) DCT coefficients of the 8 x 8 blocks of y (level-shifted by 128, as JPEG codes them),
    on the grid from the origin; y's sides must be multiples of 8."""
    h, w = y.shape
    b = (y - 128.0).reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK, BLOCK)
    c = dct_basis()
    return c @ b @ c.T


def block_dct(y: np.ndarray) -> np.ndarray:
    """Per AC frequency: log standard deviation and the share of coefficients below 0.5 in magnitude;
    per low AC frequency and step q: |mean exp(2 pi i c / q)|, which is near 1 when the coefficients
    sit on multiples of q (a JPEG quantiser's step) and near 0 otherwise."""
    coeffs = blocks(y).reshape(-1, BLOCK * BLOCK)
    order = [u * BLOCK + v for u, v in zigzag()][1:]  # AC frequencies, lowest first
    ac = coeffs[:, order]
    stats = [np.log(ac.std(0) + 1e-3), (np.abs(ac) < 0.5).mean(0)]
    low = ac[:, :QUANT_FREQUENCIES]
    phase = np.exp(2j * np.pi * low[:, :, None] / QUANT_STEPS[None, None])
    return np.concatenate([*stats, np.abs(phase.mean(0)).ravel()])


# Fixed high-pass filters of the SRM family: first and second order differences, Ker-Bohme's 3 x 3
# ("KB") and the 5 x 5 "KV" kernel, each predicting a pixel from its neighbours.
RESIDUAL_KERNELS = {
    "d1h": np.array([[1.0, -1.0]]),
    "d1v": np.array([[1.0], [-1.0]]),
    "d2h": np.array([[1.0, -2.0, 1.0]]),
    "d2v": np.array([[1.0], [-2.0], [1.0]]),
    "kb": np.array([[-1.0, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4,
    "kv": np.array(
        [[-1.0, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]]
    )
    / 12,
}
TRUNCATE = 2  # residuals are rounded and truncated to -T..T, as in the SRM


def filtered(y: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 'valid' correlation of y with a small kernel, by shifted sums."""
    kh, kw = kernel.shape
    h, w = y.shape[0] - kh + 1, y.shape[1] - kw + 1
    out = np.zeros((h, w))
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j]:
                out += kernel[i, j] * y[i : i + h, j : j + w]
    return out


def residuals(y: np.ndarray) -> np.ndarray:
    """Per filter: std, mean |r|, kurtosis and the histogram of the truncated residual; for the
    first-order and KB residuals, the co-occurrences of horizontally adjacent truncated values."""
    out = []
    n_bins = 2 * TRUNCATE + 1
    for name, kernel in RESIDUAL_KERNELS.items():
        r = filtered(y, kernel).astype(np.float32)
        c = r - r.mean()
        c2 = c * c
        var = float(c2.mean()) + 1e-12
        q = np.rint(np.clip(r, -TRUNCATE, TRUNCATE)).astype(np.intp) + TRUNCATE
        out += [0.5 * np.log(var), np.log(float(np.abs(r).mean()) + 1e-9), float((c2 * c2).mean()) / var**2 / 100]
        out += list(np.bincount(q.ravel(), minlength=n_bins) / q.size)
        if name in ("d1h", "kb"):
            pairs = q[:, :-1] * n_bins + q[:, 1:]
            out += list(np.bincount(pairs.ravel(), minlength=n_bins**2) / pairs.size)
    return np.asarray(out)


def radial_spectrum(x: np.ndarray, bins: int = 32) -> np.ndarray:
    """The azimuthally averaged log power spectrum of x (mean removed, Hann-windowed), in `bins`
    radial bins from 0 to the Nyquist frequency, minus its mean (scale-free)."""
    h, w = x.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fftshift(np.fft.fft2((x - x.mean()) * win))) ** 2
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    radius = np.sqrt(fx**2 + fy**2) / 0.5
    which = np.minimum((radius * bins).astype(int), bins)  # the corners beyond Nyquist share the last bin
    sums = np.bincount(which.ravel(), power.ravel(), bins + 1)[:bins]
    counts = np.bincount(which.ravel(), minlength=bins + 1)[:bins]
    spectrum = np.log(sums / np.maximum(counts, 1) + 1e-12)
    return spectrum - spectrum.mean()


def blockiness(y: np.ndarray) -> np.ndarray:
    """Mean |second difference| across the 8-pixel block boundaries over that inside blocks, along
    each axis (about 1 without a JPEG grid, above 1 with one; its log, 0 for a side too short to cross a
    boundary: under 10 pixels)."""
    out = []
    for axis in (0, 1):
        d = np.abs(np.diff(y, n=2, axis=axis)).mean(axis=1 - axis)  # position k: pixels k, k+1, k+2
        at = (np.arange(len(d)) % BLOCK) == BLOCK - 2  # the middle pixel is the last of a block
        out.append(np.log((d[at].mean() + 1e-6) / (d[~at].mean() + 1e-6)) if at.any() and (~at).any() else 0.0)
    return np.asarray(out)


def features(rgb: np.ndarray) -> np.ndarray:
    """Every feature of an (H, W, 3) array in 0..255 whose sides are multiples of 8."""
    rgb = np.asarray(rgb, np.float64)
    y = luminance(rgb)
    return np.concatenate(
        [
            block_dct(y),
            residuals(y),
            radial_spectrum(y),
            radial_spectrum(filtered(y, RESIDUAL_KERNELS["kb"])),
            blockiness(y),
            rgb.mean((0, 1)) / 255,
            rgb.std((0, 1)) / 255,
        ]
    )
