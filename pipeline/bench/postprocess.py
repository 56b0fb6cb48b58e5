"""Post-processing operations for robustness tests (WILD's steps 1-3), seeded and recorded.

Step k applies between 1 and k distinct operations in random order, drawn from the operation families
OPS (or some of them). Every operation and its
parameters are written to the manifest's `ops` column (`jpeg(q=71);rotate(deg=-4.20)`), and
`apply_ops` replays that text exactly, so each image can be regenerated. Outputs are saved as PNG
so the codec artefacts of a JPEG/WebP step are kept bit-exactly.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

OPS = ("jpeg", "webp", "resize", "crop", "rotate", "blur", "brightness_contrast", "grayscale")


def _draw(name: str, rng: np.random.Generator) -> dict:
    """Random parameters of one operation (rounded so that the recorded text replays exactly)."""
    u = lambda lo, hi, nd=2: round(float(rng.uniform(lo, hi)), nd)  # noqa: E731
    return {
        "jpeg": lambda: {"q": int(rng.integers(60, 100))},
        "webp": lambda: {"q": int(rng.integers(60, 100))},
        "resize": lambda: {"scale": u(0.5, 1.5)},
        "crop": lambda: {"keep": u(0.7, 0.95), "x": u(0, 1), "y": u(0, 1)},
        "rotate": lambda: {"deg": u(-15, 15)},
        "blur": lambda: {"radius": u(0.3, 1.5)},
        "brightness_contrast": lambda: {"b": u(0.75, 1.25), "c": u(0.75, 1.25)},
        "grayscale": lambda: {},
    }[name]()


def families(text: str) -> tuple[str, ...]:
    """The operation families a comma-separated list names, in OPS's order ("" or "all": every one)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == ["all"]:
        return OPS
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return tuple(n for n in OPS if n in names)


def draw_ops(step: int, rng: np.random.Generator, among: tuple[str, ...] = OPS) -> str:
    """1 to `step` distinct operations of the families `among`, in random order, with their parameters."""
    n = int(rng.integers(1, step + 1))
    names = [among[i] for i in rng.permutation(len(among))[:n]]
    return ";".join(f"{name}({','.join(f'{k}={v}' for k, v in _draw(name, rng).items())})" for name in names)


def draw_variant(rng: np.random.Generator, steps, among: tuple[str, ...] = OPS) -> tuple[int, str]:
    """A training variant: its step, drawn uniformly from `steps`, and the operations of that step."""
    step = int(steps[int(rng.integers(len(steps)))])
    return step, draw_ops(step, rng, among)


def parse_ops(text: str) -> list[tuple[str, dict]]:
    ops = []
    for part in filter(None, text.split(";")):
        m = re.fullmatch(r"(\w+)\((.*)\)", part.strip())
        if not m or m.group(1) not in OPS:
            raise ValueError(f"unknown operation {part!r}; known: {', '.join(OPS)}")
        params = dict(kv.split("=") for kv in m.group(2).split(",") if kv)
        ops.append((m.group(1), {k: float(v) for k, v in params.items()}))
    return ops


def _codec(im: Image.Image, fmt: str, q: float) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, fmt, quality=int(q))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def apply_op(im: Image.Image, name: str, p: dict) -> Image.Image:
    w, h = im.size
    if name in ("jpeg", "webp"):
        return _codec(im, name.upper(), p["q"])
    if name == "resize":
        return im.resize((max(8, round(w * p["scale"])), max(8, round(h * p["scale"]))), Image.Resampling.BICUBIC)
    if name == "crop":
        cw, ch = max(8, round(w * p["keep"])), max(8, round(h * p["keep"]))
        left, top = round((w - cw) * p["x"]), round((h - ch) * p["y"])
        return im.crop((left, top, left + cw, top + ch))
    if name == "rotate":
        return im.rotate(p["deg"], resample=Image.Resampling.BICUBIC, expand=False)
    if name == "blur":
        return im.filter(ImageFilter.GaussianBlur(p["radius"]))
    if name == "brightness_contrast":
        return ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(p["b"])).enhance(p["c"])
    if name == "grayscale":
        return im.convert("L").convert("RGB")
    raise ValueError(name)


def apply_ops(im: Image.Image, ops: str) -> Image.Image:
    im = im.convert("RGB")
    for name, params in parse_ops(ops):
        im = apply_op(im, name, params)
    return im
