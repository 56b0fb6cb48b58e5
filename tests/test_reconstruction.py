"""The decoder-rendered synthetic family and the reconstruction baseline's distances: against
references, and a rendered set byte for byte the same from the same arguments (the baseline in the
report, with its interval, through `leakpipe score`: tests/test_score.py)."""

import hashlib

import numpy as np
from PIL import Image

from leakpipe.pipeline.math import reconstruction as recon
from tests.conftest import cli


def test_band_errors_split_the_residual_by_octave():
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 32, 40)), rng.random((3, 32, 40))
    e = recon.band_power(x - y).reshape(3, recon.BANDS)
    np.testing.assert_allclose(recon.band_errors(x, y), recon.band_power(x - y) - recon.band_power(x))
    band = recon.octave_bands(32, 40)
    counts = np.bincount(band.ravel(), minlength=recon.BANDS)
    # Parseval over rfft2's half plane: each band's mean power times its count adds up to the residual's
    # energy, with the columns that rfft2 stores once (DC, and Nyquist for an even side) counted once
    full = np.abs(np.fft.fft2(x - y, norm="ortho")) ** 2
    half = np.abs(np.fft.rfft2(x - y, norm="ortho")) ** 2
    np.testing.assert_allclose((np.exp(e) * counts).sum(1), half.sum((1, 2)), rtol=1e-9)
    assert half.sum() < full.sum() and band[0, 0] == recon.BANDS - 1 and band[16, 20] == 0
    # a residual of one frequency lands in its octave alone
    yy, xx = np.mgrid[0:32, 0:40]
    wave = np.cos(2 * np.pi * 5 * xx / 40)[None] * np.ones((3, 1, 1))  # 1/8 cycle per pixel: band 2, (1/16, 1/8]
    only = recon.band_power(wave).reshape(3, -1)
    assert recon.octave_bands(32, 40)[0, 5] == 2 and (only.argmax(1) == 2).all()
    assert (only[:, 2] - np.delete(only, 2, axis=1).max(1) > 10).all()  # the others hold nothing


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    x = rng.random((3, 48, 40))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    want = [
        structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for a, b in zip(x, y)
    ]
    np.testing.assert_allclose(recon.ssim(x, y), want, atol=1e-6)
    np.testing.assert_allclose(recon.ssim(x, x), 1.0)


def synth(ws, out, *extra):
    r = cli(
        ws, "synth", "--family", "decoder", "--out", str(out), "--closed", "2", "--open", "1",
        "--per-generator", "8", "--size", "32", "--steps", "1", *extra,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.png")}


def test_a_decoder_rendered_set_is_deterministic(tmp_path):
    from leakpipe.pipeline.bench import rendered

    a, b = synth(tmp_path / "w1", tmp_path / "a"), synth(tmp_path / "w2", tmp_path / "b")
    assert a == b and sum(not k.startswith("closed-pp/") for k in a) == 3 * 8 and "closed-pp/step1/closed" in str(a)
    one, other = (
        np.asarray(Image.open(tmp_path / "a" / "closed" / g / "00003.png"), float) for g in ("closed00", "closed01")
    )
    assert np.corrcoef(one.ravel(), other.ravel())[0, 1] > 0.8 and np.abs(one - other).mean() > 0.5  # same content
    c = synth(tmp_path / "w3", tmp_path / "c", "--seed", "1")
    assert all(a[k] != c[k] for k in set(a) & set(c) if k.startswith("closed/"))
    assert rendered.make_leak("closed00", 0, 32, noise=False).noise == 0 < rendered.make_leak("closed00", 0, 32).noise
    odd = cli(tmp_path / "w4", "synth", "--family", "decoder", "--size", "36", "--closed", "2", "--open", "0")
    assert odd.exit_code != 0 and "multiple of 8" in odd.output


def test_through_the_workspaces_own_encoder_the_baseline_takes_z0_from_stage_one(tmp_path, monkeypatch):
    """Where score.reconstruction names the workspace's encoder (the demo: TAEF2) and stage one read the very
    pixels the baseline reads, E(x) is stage one's cached z0: one encode an image (E(D(E(x)))), not two, and
    the features of encoding again, up to float rounding (a batch of other images). Another encoder, a float16
    store or other pixels: none."""
    from leakpipe.pipeline.config import Config, PreprocessConfig, StoreConfig, VaeConfig
    from leakpipe.pipeline.report import baselines, scoring
    from leakpipe.stages import score as score_stage

    demo = ["demo", "--closed", "2", "--open", "2", "--per-generator", "10", "--size", "64", "--epochs", "1"]
    assert cli(tmp_path, *demo).exit_code == 0
    encoded, features = [], []
    real_load, real_matrix = score_stage.load_autoencoder, baselines.reconstruction_matrix

    def load(src):
        ae = real_load(src)
        encode = ae.encode
        ae.encode = lambda x: encoded.append(len(x)) or encode(x)
        return ae

    monkeypatch.setattr(score_stage, "load_autoencoder", load)
    monkeypatch.setattr(baselines, "reconstruction_matrix", lambda *a: features.append(real_matrix(*a)) or features[-1])
    assert cli(tmp_path, "score", "--set", "score.bootstrap=20").exit_code == 0
    images = sum(len(f) for f in features)
    assert images > 0 and sum(encoded) == images  # the round trip's second encode alone
    reused, encoded[:], cached = features[:], [], scoring._cached_encoding
    features.clear()
    monkeypatch.setattr(scoring, "_cached_encoding", lambda *a: None)
    assert cli(tmp_path, "score", "--set", "score.bootstrap=21").exit_code == 0
    assert sum(encoded) == 2 * images and len(reused) == len(features) == 2  # train and test
    for a, b in zip(reused, features):  # features up to about 10: 1e-5 apart where stage one's batches differ
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

    paths, z0 = [str(p) for p in sorted((tmp_path / "data").rglob("*.png"))[:2]], np.arange(2.0)[:, None]
    taef2 = Config(vae=VaeConfig(source="builtin:taef2"), preprocess=PreprocessConfig(size=64))
    for other in (
        Config(vae=VaeConfig(source="builtin:taesd"), preprocess=taef2.preprocess),
        Config(vae=taef2.vae, preprocess=taef2.preprocess, store=StoreConfig(dtype="float16")),
    ):
        assert cached(other, "builtin:taef2", paths, z0) is None
    x = np.asarray(Image.open(paths[1]).convert("RGB"))
    assert cached(taef2, "builtin:taef2", paths, z0)(1, x) == [1.0]
    resized = Config(vae=taef2.vae, preprocess=PreprocessConfig(size=32))  # stage one read other pixels
    assert cached(resized, "builtin:taef2", paths, z0)(1, x) is None
    # a file stage one resized or cropped is not decoded a second time to find that out
    from leakpipe.pipeline.engine import images

    decoded, load = [], images.load_image
    monkeypatch.setattr(scoring, "load_image", lambda *a: decoded.append(a[0]) or load(*a))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 72, 3), np.uint8)).save(wide)
    native = images.load_native(wide, 64, 10**8)  # 64 x 64: the baseline's crop at a 64-px side
    assert cached(taef2, "builtin:taef2", [str(wide)], z0)(0, native) is None and decoded == []
    assert cached(taef2, "builtin:taef2", paths, z0)(1, x) == [1.0] and decoded == [paths[1]]
