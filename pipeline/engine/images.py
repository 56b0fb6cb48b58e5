"""Image decoding and preprocessing (SPEC section 3.1), in numpy so decode workers need no torch.

Conversions, in order:
- the first frame of animated images (GIF, APNG, WebP, multi-page TIFF);
- EXIF orientation applied (`ImageOps.exif_transpose`);
- alpha (RGBA, LA, PA, palette with transparency) composited on white;
- palette (P) expanded to RGB; CMYK converted with Pillow's plain formula (no ICC profile);
- 16-bit and 32-bit integer grayscale (I;16, I) scaled by 1/257 to 8 bits; float (F) clipped to 0..255;
- grayscale (L, 1) replicated to three channels;
- resize so the shorter side is `size` (bicubic with antialiasing), then a centred size x size crop;
  with resize = none, a side shorter than `size` is first filled by mirrored tiling (`mirror_fill`).
The result is uint8 HWC RGB; `to_model_range` maps it to [-1, 1] on the compute device.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from leakpipe.pipeline.config import PreprocessConfig
from leakpipe.pipeline.errors import UserError


class BadImage(UserError):
    """An input file that cannot be used; the message says why (path added by the caller)."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    if Path(path).stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb guard: {exc} Raise preprocess.max_pixels if you trust this file.") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb guard: {w}x{h} = {w * h} pixels exceeds preprocess.max_pixels={max_pixels}")
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"truncated or corrupt image data ({exc})") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, per the module docstring."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def mirror_fill(im: Image.Image, size: int) -> Image.Image:
    """An image with a side shorter than `size` (resize = none) tiled with mirrored copies of itself to at
    least size x size, the original at the top left. Mirroring, not zeros or periodic copies: the seams
    carry no step, so a high-pass residual reads the image's own statistics everywhere (padding would
    add flat areas whose share tells the image's size), and the original keeps its 8-px grid from the
    origin."""
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    pad = ((0, max(0, size - h)), (0, max(0, size - w))) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="symmetric"))


def resize_crop(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    size = cfg.size
    if cfg.resize == "shorter":
        w, h = im.size
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        if new != im.size:
            im = im.resize(new, Image.Resampling.BICUBIC, reducing_gap=None)
    w, h = im.size
    if cfg.crop == "center":
        if w < size or h < size:
            im = mirror_fill(im, size)
            w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif (w, h) != (size, size):
        raise BadImage(f"image is {w}x{h}; with crop=none it must be exactly {size}x{size}")
    return im


def load_image(path: Path | str, cfg: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess one file to uint8 HWC RGB of shape (size, size, 3); raises BadImage."""
    try:
        im = _open(Path(path), cfg.max_pixels)
        im = ImageOps.exif_transpose(im)
        return np.array(resize_crop(to_rgb(im), cfg), dtype=np.uint8)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except PermissionError:
        raise BadImage("permission denied: the file cannot be read by this user") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None


def load_native(path: Path | str, max_side: int, max_pixels: int) -> np.ndarray:
    """The decoded image at its native resolution for forensic features: uint8 (h, w, 3) RGB, centre-
    cropped to at most `max_side` per side with both sides multiples of 8 and the crop starting on the
    8-pixel grid from the image origin (the JPEG block grid), never resized. EXIF orientation is not
    applied: rotating would move that grid. Raises BadImage (also for images under 8 x 8 pixels)."""
    try:
        im = _open(Path(path), max_pixels)
        arr = np.asarray(to_rgb(im), dtype=np.uint8)
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None
    h, w = arr.shape[:2]
    side_h, side_w = (min(n, max_side) // 8 * 8 for n in (h, w))
    if not side_h or not side_w:
        raise BadImage(f"image is {w}x{h}; forensic features need at least 8 x 8 pixels")
    top, left = (h - side_h) // 2 // 8 * 8, (w - side_w) // 2 // 8 * 8
    return arr[top : top + side_h, left : left + side_w]


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to `preprocess.max_pixels` (never lower it), so that
    raising that setting lets Pillow decode such an image; leakpipe's own guard still refuses anything
    above the setting."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def header_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; (0, 0) if Pillow cannot open it (load_image
    then says what is wrong with it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.size
    except Exception:  # noqa: BLE001 -- load_image says what is wrong with it
        return 0, 0


def check_size(path: Path | str, cfg: PreprocessConfig) -> None:
    """Refuse an image whose *resized* size exceeds `preprocess.max_pixels`: resizing the shorter side of
    a thin image to `size` makes a huge one (1 x 10000 px would become 2,560,000 x 256, 3 GB), however
    small the file. Reads the header only; a file Pillow cannot open is left to load_image to report."""
    w, h = header_size(path)
    if cfg.resize != "shorter" or min(w, h) < 1 or w * h > cfg.max_pixels:
        return  # too large as it is: load_image refuses it (the decompression-bomb guard)
    scale = cfg.size / min(w, h)
    nw, nh = max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale))
    if nw * nh > cfg.max_pixels:
        raise BadImage(
            f"image is {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}:1): resizing its shorter side "
            f"to preprocess.size={cfg.size} would make it {nw}x{nh} = {nw * nh:,} pixels, more than "
            f"preprocess.max_pixels={cfg.max_pixels:,}; crop it nearer to square first, or raise "
            "preprocess.max_pixels if the memory is there"
        )


_LOSSY_MODES = {
    "I;16": "16-bit greyscale scaled to 8 bits",
    "I;16B": "16-bit greyscale scaled to 8 bits",
    "I;16L": "16-bit greyscale scaled to 8 bits",
    "I;16N": "16-bit greyscale scaled to 8 bits",
    "I": "32-bit integer greyscale scaled to 8 bits",
    "F": "floating-point greyscale clipped to 0..255 and rounded to 8 bits",
    "CMYK": "CMYK converted to RGB without its colour profile",
}


def conversions(path: Path | str) -> list[str]:
    """What preprocessing changes of the file beyond resizing, in words, from its header: the bits it
    drops (16-bit and float images become 8-bit RGB), alpha composited on white, the first frame of
    several. For `attribute` and the app to state with each result; [] for an 8-bit RGB or grey image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                mode, frames, alpha = im.mode, getattr(im, "n_frames", 1), "transparency" in im.info
    except Exception:  # noqa: BLE001 -- load_image says what is wrong with it
        return []
    out = [f"{mode}: {_LOSSY_MODES[mode]}"] if mode in _LOSSY_MODES else []
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or alpha:
        out.append("transparency composited on white")
    if frames > 1:
        out.append(f"the first of {frames} frames")
    return out


def read_image(path: Path | str, cfg: PreprocessConfig) -> np.ndarray:
    """load_image behind the size guards (check_size, and Pillow's limit raised to preprocess.max_pixels):
    what encode, attribute and the app call for every input image."""
    allow_pixels(cfg.max_pixels)
    check_size(path, cfg)
    return load_image(path, cfg)


def to_model_range(batch_uint8):
    """(B, H, W, 3) uint8 tensor -> (B, 3, H, W) float in [-1, 1] (SPEC 3.1)."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
