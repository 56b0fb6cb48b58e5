"""Equations 1-4 against references: diffusers' DDPMScheduler and scipy's DCT."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.fft import dctn, idctn

from leakpipe.pipeline.math import dct

from leakpipe.pipeline.math import diffusion

from leakpipe.pipeline.math import features

DIFFUSERS_NAMES = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_schedules_match_diffusers(schedule):
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[schedule], beta_start=0.00085, beta_end=0.012
    )
    ours = diffusion.alphas_cumprod(schedule)
    # diffusers keeps betas in float32 and multiplies them up in float32; we stay in float64
    np.testing.assert_allclose(diffusion.betas(schedule).numpy(), ref.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.numpy(), torch.cumprod(1 - ref.betas.double(), 0).numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours.numpy(), ref.alphas_cumprod.double().numpy(), atol=2e-6)
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    ts = [0, 5, 10]
    alpha, sigma = diffusion.alpha_sigma(ours, ts)
    got = diffusion.diffuse(z0, eps, alpha, sigma)
    for j, t in enumerate(ts):
        want = ref.add_noise(z0, eps[:, j], torch.tensor([t, t]))  # z_t; ours is z_t / sigma_t
        torch.testing.assert_close(got[:, j] * sigma[j].float(), want, rtol=1e-5, atol=1e-5)


def test_scale_modes():
    m = torch.ones(1, 4, 2, 2)
    assert diffusion.latent_z0(m, None, 0.18215, "multiply")[0, 0, 0, 0] == pytest.approx(0.18215)
    assert diffusion.latent_z0(m, None, 0.18215, "divide")[0, 0, 0, 0] == pytest.approx(1 / 0.18215)
    lv = torch.full_like(m, -20.0)
    sampled = diffusion.latent_z0(m, lv, 1.0, "multiply", noise=torch.randn_like(m))
    torch.testing.assert_close(sampled, m, atol=1e-3, rtol=0)


def test_dct_matches_scipy_and_round_trips():
    x = torch.randn(3, 4, 32, 24, dtype=torch.float64)
    ref = dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(dct.dct2(x).numpy(), ref, atol=1e-10)
    xf = x.float()
    assert (dct.dct2(xf) - torch.from_numpy(ref).float()).abs().max() < 1e-5
    assert (dct.idct2(dct.dct2(xf)) - xf).abs().max() < 1e-5
    c = dct.dct_matrix(16, torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(16, dtype=torch.float64))


def test_dct_low_maps():
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    block = dctn(x.numpy(), axes=(-2, -1), norm="ortho")[..., :8, :8]
    coeffs = dct.dct_low(x, 8, "coeffs")
    assert coeffs.shape == x.shape
    np.testing.assert_allclose(coeffs[..., ::4, ::4].numpy(), block, atol=1e-10)
    low = dct.dct_low(x, 8, "lowpass")
    padded = np.zeros_like(x.numpy())
    padded[..., :8, :8] = block
    np.testing.assert_allclose(low.numpy(), idctn(padded, axes=(-2, -1), norm="ortho"), atol=1e-10)
    with pytest.raises(ValueError, match="unknown dct_map"):
        dct.dct_low(x, 8, "nope")


def test_features_and_standardisation():
    z = torch.randn(5, 3, 4, 16, 16) * 3 + 1
    f = features.features(z, 8, "coeffs")
    assert f.shape == (5, 3, 8, 16, 16)
    torch.testing.assert_close(f[:, :, :4], z)
    stats = features.RunningStats()
    for part in f.split(2):
        stats.update(part)
    mean, std = stats.result()
    assert mean.shape == std.shape == (3, 8)
    s = features.standardise(f, mean, std)
    torch.testing.assert_close(s.mean(dim=(0, 3, 4)), torch.zeros(3, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.std(dim=(0, 3, 4), unbiased=False), torch.ones(3, 8), atol=1e-3, rtol=0)


def test_z0_spread_is_the_same_from_per_channel_and_per_position_statistics():
    """features.z0_spread reads z0's std back from f_t's statistics at t = 0 (z_t / sigma_t = alpha z0 /
    sigma + eps): per position, a channel's variance is its positions' mean variance plus the variance of
    their means, so both kinds of statistics give the std of z0 the data has."""
    torch.manual_seed(0)
    alpha, sigma = torch.tensor([0.99]), torch.tensor([0.05])
    z0 = torch.randn(4000, 4, 8, 8) * 0.7 + torch.linspace(-1, 1, 64).view(1, 1, 8, 8)  # a mean per position
    f = features.features((alpha * z0 + sigma * torch.randn_like(z0))[:, None] / sigma, 4, "coeffs")
    stats = features.RunningStats()
    stats.update(f)
    want = float(z0.permute(1, 0, 2, 3).flatten(1).std(dim=1).mean())
    for kind in ((0, 0), (0, 4), (4, 4)):
        mean, std = stats.result(*kind)
        assert features.z0_spread(mean, std, 4, alpha, sigma) == pytest.approx(want, rel=0.02), kind
