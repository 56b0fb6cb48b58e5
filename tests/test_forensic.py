"""The forensic pixel baseline: its features read codec and resampling traces at native resolution,
so it tells apart images that differ only in how they were processed, where the old 64-px baseline
(low-frequency DCT of a resized copy: content) cannot."""

import io

import numpy as np
import pytest
from PIL import Image

from leakpipe.pipeline import manifest as mf
from leakpipe.pipeline.bench.baseline import pixel_features
from leakpipe.pipeline.bench.codecs import write_codec_set
from leakpipe.pipeline.engine.images import load_native
from leakpipe.pipeline.math import forensic
from leakpipe.pipeline.report.baselines import forensic_matrix, probe


def test_zigzag_and_basis_are_jpegs():
    assert forensic.zigzag()[:10] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
    c = forensic.dct_basis()
    np.testing.assert_allclose(c @ c.T, np.eye(8), atol=1e-12)
    from scipy.fft import dctn

    y = np.random.default_rng(0).uniform(0, 255, (16, 24))
    want = dctn(y[8:16, 8:16] - 128, norm="ortho")
    np.testing.assert_allclose(forensic.blocks(y)[1 * 3 + 1], want, atol=1e-9)  # block (1, 1), row-major


def _jpeg(arr: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_quantisation_and_grid_show_in_the_features():
    rng = np.random.default_rng(1)
    smooth = np.asarray(
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((128, 128), Image.BICUBIC)
    )
    smooth = np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
    raw, coded = (forensic.luminance(x.astype(float)) for x in (smooth, _jpeg(smooth, 50)))
    assert forensic.blockiness(coded).min() > forensic.blockiness(raw).max() + 0.1  # the 8-px grid shows
    n_stats = 2 * 63
    lattice = lambda y: forensic.block_dct(y)[n_stats:].reshape(forensic.QUANT_FREQUENCIES, -1)  # noqa: E731
    assert lattice(coded).mean() > lattice(raw).mean() + 0.1  # coefficients sit on quantiser steps
    # moving the grid by 4 pixels hides it: the crop must start on the grid from the origin
    assert forensic.blockiness(coded[4:-4, 4:-4]).max() < forensic.blockiness(coded).min()
    # an 8 x 8 image has no boundary to compare: every feature finite, its blockiness 0 (no grid seen)
    assert np.isfinite(forensic.features(smooth[:8, :8].astype(float))).all()
    assert np.array_equal(forensic.blockiness(raw[:8, :8]), [0.0, 0.0])


def test_native_crop_is_on_the_grid_and_never_resized(tmp_path):
    arr = np.random.default_rng(2).integers(0, 255, (700, 1001, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    got = load_native(tmp_path / "a.png", 512, 10**8)
    assert got.shape == (512, 512, 3)
    top, left = (700 - 512) // 2 // 8 * 8, (1001 - 512) // 2 // 8 * 8
    assert top % 8 == 0 and left % 8 == 0 and np.array_equal(got, arr[top : top + 512, left : left + 512])
    Image.fromarray(arr[:100, :61]).save(tmp_path / "b.png")
    assert load_native(tmp_path / "b.png", 512, 10**8).shape == (96, 56, 3)


@pytest.fixture(scope="module")
def codec_set(tmp_path_factory):
    """4 classes that differ only in processing (PNG, JPEG 90, JPEG 70, bicubic down-up), the same 24
    photo crops of 128 px in each, split by crop."""
    root = tmp_path_factory.mktemp("codecs")
    write_codec_set(
        root / "data", root / "m", n=24, size=128, seed=0, chains=("png", "jpeg90", "jpeg70", "down-up-bicubic")
    )
    return mf.read_manifest(root / "m" / "closed.csv")


def test_forensic_baseline_sees_codecs_where_the_64px_one_does_not(codec_set):
    """Measured: forensic 0.929 (26 of 28 test images), the 64-px baseline 0.250 (chance 0.25). The
    bounds sit well clear of both: above 0.7 is far from chance, below 0.45 is near it."""
    m = codec_set
    part, labels = np.array(m.column("partition")), np.array(m.column("label"))
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    groups = np.array(m.column("group"))
    assert not set(groups[part == "train"]) & set(groups[part == "test"])  # a crop sits in one partition
    paths = [m.abspath(i) for i in range(len(m))]
    tr, te = part == "train", part == "test"
    x = forensic_matrix(paths, 512, 10**8)
    low = np.stack([pixel_features(p) for p in paths])
    acc = {name: float((probe(f[tr], y[tr], f[te]) == y[te]).mean()) for name, f in (("forensic", x), ("64px", low))}
    print("measured", acc, int(te.sum()))
    assert acc["forensic"] >= 0.7, acc
    assert acc["64px"] <= 0.45, acc  # chance is 0.25
