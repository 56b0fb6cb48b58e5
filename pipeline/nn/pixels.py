"""vae.source = pixels (the authors' "latent mode off"): an encoder that returns the image itself."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class PixelEncoder(torch.nn.Module):
    """`encode(x)` returns the preprocessed image (in [-1, 1]) as the posterior's mean, which stage two
    treats as z0, and a constant log-variance; the same interface as diffusers' AutoencoderKL."""

    def __init__(self, dtype: torch.dtype, logvar: float):
        super().__init__()
        self.logvar = logvar
        self.register_buffer("anchor", torch.zeros((), dtype=dtype))  # carries dtype and device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean = x.to(self.anchor.dtype)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=torch.full_like(mean, self.logvar)))
