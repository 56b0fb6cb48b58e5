"""Distances between an image and its round trip through an autoencoder, for the reconstruction
baseline (the idea of AEROBLADE, Ricker et al., CVPR 2024: an image a decoder made is reconstructed by
that autoencoder more closely than others are). AEROBLADE measures the distance with LPIPS, whose VGG
weights cannot be had here; these are the measured alternatives (benchmarks/reconstruction.py): the
residual's power per octave band of the spectrum (the per-layer distances of LPIPS read as scales), a
global SSIM per channel, and the distance of the two images' latents (the encoder as the perceptual
space), each relative to the image's (or latent's) own power. Each takes float arrays (C, H, W) in
[0, 1] (latents: (C, h, w)) and returns a 1-D vector.
"""

from __future__ import annotations

import numpy as np

BANDS = 5  # octave bands of the spectrum, from the Nyquist frequency down; the last holds the rest and DC


def octave_bands(h: int, w: int, n: int = BANDS) -> np.ndarray:
    """(h, w // 2 + 1) band index of each rfft2 frequency: 0 for radii in (1/4, 1/2] cycles per pixel
    (the finest octave), 1 for (1/8, 1/4], ..., n - 1 for everything below, DC included."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    octave = np.floor(-np.log2(np.maximum(r, 1e-12) / 0.5)).astype(int)  # 0 for r in (1/4, 1/2]
    return np.clip(octave, 0, n - 1)


def band_power(a: np.ndarray, n: int = BANDS) -> np.ndarray:
    """log of the mean spectral power of `a` (C, H, W) in each octave band, per channel: (C n,), channel-major."""
    power = np.abs(np.fft.rfft2(np.asarray(a, np.float64), norm="ortho")) ** 2
    h, w = a.shape[-2:]
    band = octave_bands(h, w, n)
    counts = np.bincount(band.ravel(), minlength=n)
    sums = np.stack([np.bincount(band.ravel(), p.ravel(), minlength=n) for p in power])
    return np.log(sums / np.maximum(counts, 1) + 1e-12).ravel()


def band_errors(x: np.ndarray, y: np.ndarray, n: int = BANDS) -> np.ndarray:
    """The residual x - y's power in each octave band relative to the image x's own (log ratio), per
    channel: (C n,). Relative, so that a textured image, which any autoencoder reconstructs less closely,
    does not read as another generator (measured in benchmarks/reconstruction.py)."""
    return band_power(np.asarray(x, np.float64) - y, n) - band_power(x, n)


SSIM_SIGMA = 1.5  # Wang et al. (2004)'s Gaussian window
SSIM_K = (0.01, 0.03)


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The mean structural similarity of x and y per channel (Wang et al. 2004, Gaussian window of std
    1.5 truncated at 3.5 std, data range 1), averaged away from the border the window overhangs, as
    scikit-image does: (C,)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    pad = int(3.5 * SSIM_SIGMA + 0.5)
    inner = (slice(pad, -pad),) * 2 if min(x.shape[-2:]) > 2 * pad else (slice(None),) * 2
    out = []
    for a, b in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):

        def blur(v):
            return gaussian_filter(v, SSIM_SIGMA, mode="reflect", truncate=3.5)

        mx, my = blur(a), blur(b)
        vx, vy, cov = blur(a * a) - mx * mx, blur(b * b) - my * my, blur(a * b) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s[inner].mean())
    return np.asarray(out)


def latent_distance(z: np.ndarray, z_again: np.ndarray) -> np.ndarray:
    """The mean squared distance between E(x) and E(D(E(x))) relative to E(x)'s mean square (log ratio),
    per latent channel: (C,)."""
    z = np.asarray(z, np.float64)
    d = z - np.asarray(z_again, np.float64)
    return np.log((d * d).mean(axis=(-2, -1)) + 1e-12) - np.log((z * z).mean(axis=(-2, -1)) + 1e-12)
