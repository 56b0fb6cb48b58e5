import io

import numpy as np
import pytest
from PIL import Image

from leakpipe.pipeline.config import PreprocessConfig
from leakpipe.pipeline.engine.images import BadImage, load_image

CFG = PreprocessConfig(size=16)


def save(tmp_path, im, name, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_resize_shorter_side_then_center_crop(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :16] = 255  # a white band that the centre crop must cut away
    out = load_image(save(tmp_path, Image.fromarray(arr), "w.png"), CFG)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.max() < 20


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (32, 16), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 16, 16))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: red ends up on top
    p = save(tmp_path, im, "o.jpg", exif=exif, quality=95)
    out = load_image(p, PreprocessConfig(size=16, resize="none"))
    # after transpose the image is 16x32; the centre crop keeps rows 8..24 -> red in the upper half
    assert out[:8, :, 0].mean() > 200 and out[8:, :, 0].mean() < 60


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert (load_image(save(tmp_path, im, "a.png"), CFG) == 255).all()
    la = Image.new("LA", (16, 16), (0, 128))
    out = load_image(save(tmp_path, la, "la.png"), CFG)
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_palette_cmyk_gray_and_16bit(tmp_path):
    pal = Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(load_image(save(tmp_path, pal, "p.png"), CFG)[0, 0]) == (10, 200, 30)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    assert tuple(load_image(save(tmp_path, cmyk, "c.jpg", quality=100), CFG)[4, 4])[0] > 240
    gray = Image.new("L", (16, 16), 77)
    assert (load_image(save(tmp_path, gray, "g.png"), CFG) == 77).all()
    sixteen = Image.fromarray(np.full((16, 16), 257 * 100, np.uint16))
    assert (load_image(save(tmp_path, sixteen, "s.png"), CFG) == 100).all()


def test_animated_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    out = load_image(p, CFG)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:300]), "truncated"),
    ],
)
def test_bad_files_say_why(tmp_path, make, reason):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(BadImage, match=reason):
        load_image(p, CFG)


def test_decompression_bomb_guard(tmp_path):
    p = save(tmp_path, Image.new("L", (200, 200)), "big.png")
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(p, PreprocessConfig(size=16, max_pixels=100 * 100))


def _png_bytes():
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
