"""Pixels mode as users meet it: `--profile pixels` (the recipe measured on real codec chains) through
encode -> train -> score on a tiny workspace whose images are partly smaller than preprocess.size and
than the training crop; the profile refused under a config file naming another encoder; the training
note on latent.scale said to its end."""

import io
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from leakpipe.pipeline.config import PreprocessConfig
from leakpipe.pipeline.engine.images import load_image, to_model_range
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from tests.conftest import cli

SIZES = [(40, 48), (20, 24), (12, 10), (32, 32)]  # (h, w): larger, smaller than size 32, smaller than crop 16
TOML = """[preprocess]
size = 32
[encode]
num_workers = 0
[store]
chunk_rows = 4
[model]
embed_dim = 16
prototypes_per_class = 2
stem = "imagenet"
[train]
crop = 16
epochs = 2
batch_size = 8
[score]
bootstrap = 200
reconstruction = []
"""


def write_codec_classes(root, n=8):
    """Two classes of the same noise content: saved losslessly, or through JPEG at quality 40 first."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for label in ("png", "jpeg40"):
            im = Image.fromarray(arr)
            if label == "jpeg40":
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=40)
                im = Image.open(buf)
            (root / label).mkdir(parents=True, exist_ok=True)
            im.save(root / label / f"{i:03d}.png")


def ok(ws, *args):
    r = cli(ws, *args)
    assert r.exit_code == 0, f"leakpipe {' '.join(args)}:\n{r.output}"
    return r.output


def test_pixels_profile_end_to_end_with_images_smaller_than_the_crop(tmp_path, tiny_vae):
    write_codec_classes(tmp_path / "data")
    toml = tmp_path / "leakpipe.toml"
    toml.write_text(f'[vae]\nsource = "{tiny_vae}"\n' + TOML)
    ok(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    refused = cli(tmp_path, "encode", "--split", "closed", "--profile", "pixels")
    assert refused.exit_code != 0 and f"--profile pixels sets vae.source = pixels, but {toml}" in refused.output
    toml.write_text(TOML)
    out = ok(tmp_path, "encode", "--split", "closed", "--profile", "pixels")
    assert "16 of 16 rows to encode with pixels" in out and " 0 failed" in out
    ws = Workspace(tmp_path)
    cfg = ws.config(profile="pixels")
    lat = graph(ws, cfg).plan("encode", "closed").data
    m = read_manifest(ws.manifest("closed"))
    row = next(i for i, r in enumerate(m.rows) if Image.open(m.abspath(i)).size == (10, 12))
    z0 = latent_store.read_rows(latent_store.open_store(lat.store), np.array([row]))["mean"][0]
    original = np.asarray(Image.open(m.abspath(row)).convert("RGB"))
    filled = load_image(m.abspath(row), cfg.preprocess)
    assert filled.shape == (32, 32, 3) and np.array_equal(filled[:12, :10], original)  # the original at the top left
    assert np.array_equal(filled[12:24, :10], original[::-1]) and np.array_equal(filled[:12, 10:20], original[:, ::-1])
    np.testing.assert_allclose(z0, to_model_range(torch.from_numpy(filled)[None]).numpy()[0], atol=1e-6)
    ok(tmp_path, "train", "--profile", "pixels")
    result = runs.pointed(ws, "default")
    run_cfg = json.loads((result / "config.json").read_text())
    assert run_cfg["train"]["crop"] == 16 and run_cfg["features"]["highpass"] == "residual"
    assert run_cfg["diffusion"] == {**run_cfg["diffusion"], "timesteps": [0], "noise": False}
    ok(tmp_path, "score", "--profile", "pixels")
    metrics = json.loads((result / "metrics.json").read_text())
    assert metrics["baselines"]["z0_is_pixels"] and "ci" in metrics["closed"]["raw"]["head"]


def test_mirror_fill_only_where_a_side_is_short():
    from leakpipe.pipeline.engine.images import resize_crop

    im = Image.fromarray(np.arange(5 * 40 * 3, dtype=np.uint8).reshape(5, 40, 3))
    out = np.asarray(resize_crop(im, PreprocessConfig(size=16, resize="none")))
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out[:5], np.asarray(im)[:, 12:28])  # the long side centre-cropped as before


def test_latent_scale_note_ends_its_sentence():
    from leakpipe.pipeline.config import Config
    from leakpipe.pipeline.engine.fit import latent_scale_note

    cfg = Config()
    # f_t's first channel: z_t / sigma_t with std 1.5 at t = 0; sigma_t = 0.5, alpha_t = 1: z0 std 0.56
    build = SimpleNamespace(
        mean=torch.zeros(1, 2), std=torch.tensor([[1.5, 1.0]]), alpha=torch.ones(1), sigma=torch.tensor([0.5])
    )
    note = latent_scale_note(cfg, build, 1)
    assert note.endswith(").") and "would give its z0 unit variance" in note
    assert "--set latent.scale=0.326" in note  # 0.18215 / 0.559
    quiet = latent_scale_note(Config(diffusion=replace(cfg.diffusion, noise=False)), build, 1)
    assert quiet.endswith("no noise is added (diffusion.noise = false)") and "the noise at" not in quiet
