"""The tiny autoencoders of madebyollin/taesd (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) in plain torch.

The layout of the original weight files, with their parameter names, so that a state dict loads
strictly: 64-channel residual blocks of 3 x 3 convolutions, three stride-2 stages (latents at 1/8 of the
side), and in TAEF2 a "mid-block pool" in the three lowest-resolution blocks of each side (a 1 x 1
convolution to 256 channels, GroupNorm of 4 groups, ReLU, a 1 x 1 convolution back, added to the block's
input). diffusers' AutoencoderTiny has no such pool, so it cannot load TAEF2.

The family's conventions (madebyollin/taesd's README): images in [0, 1], latents already in the
generator's diffusion space (scale 1, no shift). `TinyAutoencoder` takes and gives leakpipe's [-1, 1].
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from leakpipe.pipeline.nn.latents import DETERMINISTIC_LOGVAR, posterior

WIDTH = 64  # channels of every block
STAGES = 3  # stride-2 stages: latents at 1/8 of the side
BLOCKS = 3  # residual blocks per stage (the encoder's first and the decoder's last level have one)


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """The decoder's soft clamp of its input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then ReLU; with `pool`, TAEF2's mid-block pool first."""

    def __init__(self, n: int = WIDTH, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.fuse = nn.ReLU()
        self.pool = None
        if pool:  # a global view of the block's input: GroupNorm statistics over the whole map
            wide = 4 * n
            self.pool = nn.Sequential(
                nn.Conv2d(n, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(), nn.Conv2d(wide, n, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def _level(pool: bool) -> list[nn.Module]:
    return [Block(pool=pool) for _ in range(BLOCKS)]


def encoder(latent_channels: int, pool: bool = False) -> nn.Sequential:
    """Image in [0, 1] (N, 3, H, W) -> latents (N, latent_channels, H/8, W/8); parameters named 0 ... 14."""
    layers: list[nn.Module] = [_conv(3, WIDTH), Block()]
    for stage in range(STAGES):
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), *_level(pool and stage == STAGES - 1)]
    return nn.Sequential(*layers, _conv(WIDTH, latent_channels))


def decoder(latent_channels: int, pool: bool = False) -> nn.Sequential:
    """Latents (N, latent_channels, h, w) -> image in about [0, 1] (N, 3, 8h, 8w); parameters named 1 ... 19."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
    for stage in range(STAGES):
        layers += [*_level(pool and stage == 0), nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(), _conv(WIDTH, 3))


class TinyAutoencoder(nn.Module):
    """A TAESD-format encoder and/or decoder in leakpipe's conventions: `encode` takes an image in
    [-1, 1] and returns AutoencoderKL's posterior (the latents as its mean, a log-variance so low that
    sampling returns them); `decode` returns an image in [-1, 1]."""

    def __init__(self, latent_channels: int, pool: bool, with_encoder: bool = True, with_decoder: bool = True):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = encoder(latent_channels, pool) if with_encoder else None
        self.decoder = decoder(latent_channels, pool) if with_decoder else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        if self.encoder is None:
            raise ValueError("this tiny autoencoder was loaded without its encoder")
        z = self.encoder((x + 1) / 2)
        return posterior(z, torch.full_like(z, DETERMINISTIC_LOGVAR))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("this tiny autoencoder was loaded without its decoder")
        return self.decoder(z) * 2 - 1
