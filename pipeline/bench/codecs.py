"""Real photos through real codecs and resamplers: a data set whose classes differ only in how an image
was processed, never in what it shows.

Every class ("processing chain") holds the same crops of the photos that ship with scikit-learn and,
when it is installed, scikit-image: one crop per group, seen by every chain, so content carries no
information about the class and a split by group keeps each crop in one partition. The images are
stored as PNG, so the file format does not give the chain away; the traces are in the pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from leakpipe.pipeline import manifest as mf
from leakpipe.pipeline.bench.synth import rng_for

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "ihc")


def photos() -> list[np.ndarray]:
    """The RGB photos at hand: scikit-learn's two, and scikit-image's colour photos when installed."""
    from sklearn.datasets import load_sample_images

    out = list(load_sample_images().images)
    try:
        from skimage import data
    except ImportError:
        return out
    for name in SKIMAGE_PHOTOS:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # a photo this version does not ship (it would need a download)
            continue
        if arr.ndim == 3 and arr.shape[2] == 3:
            out.append(arr.astype(np.uint8))
    return out


def _codec(im: Image.Image, fmt: str, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, fmt, quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _down_up(im: Image.Image, scale: float) -> Image.Image:
    w, h = im.size
    small = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _up_crop(im: Image.Image, scale: float) -> Image.Image:
    w, h = im.size
    big = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (big.width - w) // 2, (big.height - h) // 2
    return big.crop((left, top, left + w, top + h))


CHAINS = {
    "png": lambda im: im,
    "jpeg90": lambda im: _codec(im, "JPEG", 90),
    "jpeg70": lambda im: _codec(im, "JPEG", 70),
    "webp80": lambda im: _codec(im, "WEBP", 80),
    "down-up-bicubic": lambda im: _down_up(im, 0.5),
    "up-bilinear": lambda im: _up_crop(im, 1.5),
}


def crops(n: int, size: int, seed: int) -> list[np.ndarray]:
    """n seeded size x size crops of the photos, at their native resolution (never resized)."""
    pool = [p for p in photos() if min(p.shape[:2]) >= size]
    out = []
    for i in range(n):
        rng = rng_for(seed, "codec-crop", i)
        photo = pool[int(rng.integers(len(pool)))]
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        out.append(photo[top : top + size, left : left + size])
    return out


def write_codec_set(
    out: Path,
    manifests: Path,
    n: int = 90,
    size: int = 256,
    seed: int = 0,
    chains: tuple[str, ...] = tuple(CHAINS),
    name: str = "closed",
) -> int:
    """n crops through every chain as out/<chain>/<crop>.png, and the manifest `name` split by crop
    (group) 50/20/30. Returns the number of images."""
    out = Path(out)
    for i, crop in enumerate(crops(n, size, seed)):
        im = Image.fromarray(crop)
        for chain in chains:
            path = out / chain / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            CHAINS[chain](im).save(path, "PNG", compress_level=1)
    tree = mf.scan_tree(out)
    groups = {p: Path(p).stem for files in tree.values() for p in files}
    rows, _ = mf.build_rows(tree, mf.partition_by_ratio(tree, seed=seed, groups=groups), groups=groups)
    mf.write_manifest(mf.manifest_path(manifests, name), out, rows, (*mf.REQUIRED, "group"))
    return len(rows)
