"""A synthetic, WILD-shaped benchmark: generators that differ only by a seeded fingerprint.

Each generator has four fingerprint components (SPEC section 7), all scaled by 1/difficulty:
- a low-frequency bias field (the "signal leak"): a few random cosines of 0-3 cycles per image;
- a periodic upsampling artefact: a zero-mean tile of period 2, 4 or 8 pixels, repeated;
- a colour response curve: per-channel gamma and gain;
- a noise level: i.i.d. Gaussian noise.
They are blended into shared content drawn independently of the generator: crops of the photos
that ship with scikit-learn (flips, scale, colour jitter) and procedural scenes (head-and-shoulders
shapes, gradients, textures), so content never identifies the generator.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Fingerprint amplitudes at difficulty 1, in [0, 1] pixel units (calibrated: see tests/test_synth.py)
BIAS_AMPLITUDE = 0.03
PERIODIC_AMPLITUDE = 0.008
GAMMA_SPREAD = 0.08
GAIN_SPREAD = 0.03
NOISE_RANGE = (0.004, 0.02)


@dataclass(frozen=True)
class Fingerprint:
    name: str
    freqs: np.ndarray  # (K, 2) cycles per image along x, y
    phases: np.ndarray  # (K, 3)
    amps: np.ndarray  # (K, 3)
    tile: np.ndarray  # (P, P, 3) zero-mean periodic artefact
    gamma: np.ndarray  # (3,)
    gain: np.ndarray  # (3,)
    noise: float


def rng_for(*keys) -> np.random.Generator:
    """A generator seeded by any mix of ints and strings (strings through crc32)."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys])


def make_fingerprint(name: str, seed: int, difficulty: float = 1.0) -> Fingerprint:
    rng = rng_for(seed, "fingerprint", name)
    scale = 1.0 / difficulty
    k = 4
    period = int(rng.choice([2, 4, 8]))
    tile = rng.normal(size=(period, period, 3))
    tile -= tile.mean(axis=(0, 1))
    tile *= PERIODIC_AMPLITUDE * scale / (tile.std() + 1e-12)
    return Fingerprint(
        name=name,
        freqs=rng.integers(0, 4, size=(k, 2)).astype(float),
        phases=rng.uniform(0, 2 * np.pi, size=(k, 3)),
        amps=rng.normal(size=(k, 3)) * BIAS_AMPLITUDE * scale / np.sqrt(k),
        tile=tile,
        gamma=np.exp(rng.normal(size=3) * GAMMA_SPREAD * scale),
        gain=1.0 + rng.normal(size=3) * GAIN_SPREAD * scale,
        noise=float(rng.uniform(*NOISE_RANGE)) * scale,
    )


def apply_fingerprint(content: np.ndarray, fp: Fingerprint, rng: np.random.Generator) -> np.ndarray:
    """content (H, W, 3) in [0, 1] -> the generator's image, uint8."""
    h, w, _ = content.shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    y, x = y / h, x / w
    img = fp.gain * np.power(np.clip(content, 0, 1), fp.gamma)
    for (fx, fy), ph, amp in zip(fp.freqs, fp.phases, fp.amps):
        img = img + amp * np.cos(2 * np.pi * (fx * x + fy * y)[..., None] + ph)
    p = fp.tile.shape[0]
    img = img + np.tile(fp.tile, (h // p + 1, w // p + 1, 1))[:h, :w]
    img = img + rng.normal(scale=fp.noise, size=img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo_content(rng: np.random.Generator, size: int) -> np.ndarray:
    photo = _photos()[rng.integers(len(_photos()))]
    h, w, _ = photo.shape
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    arr = np.asarray(crop, dtype=float) / 255
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    gray = arr.mean(axis=2, keepdims=True)
    sat = rng.uniform(0.6, 1.3)
    arr = gray + sat * (arr - gray)
    return arr * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-0.08, 0.08)


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    small = rng.random((cells, cells, 3))
    return (
        np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=float)
        / 255
    )


def procedural_content(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(float) / size
    c0, c1 = rng.random(3), rng.random(3)
    a = rng.uniform(-1, 1, 2)
    t = np.clip(0.5 + a[0] * (x - 0.5) + a[1] * (y - 0.5), 0, 1)[..., None]
    img = c0 + (c1 - c0) * t
    kind = rng.integers(3)
    if kind == 0:  # head and shoulders
        cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.45)
        r = rng.uniform(0.12, 0.2)
        head = ((x - cx) / r) ** 2 + ((y - cy) / (1.3 * r)) ** 2 < 1
        body = ((x - cx) / (2.6 * r)) ** 2 + ((y - 1.05) / (2.8 * r)) ** 2 < 1
        img[body] = rng.random(3)
        img[head] = rng.uniform(0.3, 0.9) * np.array([1.0, 0.8, 0.7])
        img = img * (0.85 + 0.15 * _smooth_noise(rng, size, 6))
    elif kind == 1:  # texture
        f = rng.uniform(3, 20, size=(3, 2))
        tex = sum(np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6)) for fx, fy in f) / 6
        img = img + tex[..., None] * rng.uniform(0.05, 0.3) + 0.2 * (_smooth_noise(rng, size, 16) - 0.5)
    else:  # shapes
        for _ in range(rng.integers(3, 9)):
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.25)
            if rng.random() < 0.5:
                img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.random(3)
            else:
                img[(abs(x - cx) < r) & (abs(y - cy) < r * rng.uniform(0.3, 1))] = rng.random(3)
    return img


def synth_image(fp: Fingerprint, seed: int, index: int, size: int) -> np.ndarray:
    """The `index`-th image of generator `fp`: content seeded independently of the generator."""
    content_rng = rng_for(seed, "content", fp.name, index)
    content = (photo_content if content_rng.random() < 0.5 else procedural_content)(content_rng, size)
    return apply_fingerprint(content, fp, rng_for(seed, "noise", fp.name, index))
