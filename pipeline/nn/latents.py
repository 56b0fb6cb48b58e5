"""Each autoencoder family's latents in one convention: `encode(x)` of an image in [-1, 1] returns
`.latent_dist.mean` and `.latent_dist.logvar` as diffusers' AutoencoderKL does, with the family's shift
(or FLUX.2's normalisation) already applied, so that z0 = mean * latent.scale with the family's scaling
factor; `decode(z)` takes such latents back to an image in [-1, 1].

The wrappers hold a diffusers model and numbers; they know nothing of leakpipe's config.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

# the log-variance a deterministic encoder (TAESD, AutoencoderTiny) stores: latent.sample then draws
# the mean itself (std 3e-7), as vae.source = pixels does
DETERMINISTIC_LOGVAR = -30.0


def posterior(mean: torch.Tensor, logvar: torch.Tensor) -> SimpleNamespace:
    """What AutoencoderKL.encode returns, from a mean and a log-variance."""
    return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=logvar))


class Shifted(torch.nn.Module):
    """An AutoencoderKL whose family removes a shift before scaling (SD3 0.0609, FLUX.1 0.1159):
    z0 = (E(x) - shift) * scaling_factor, the latents its diffusion model sees."""

    def __init__(self, vae, shift: float):
        super().__init__()
        self.vae, self.shift = vae, float(shift)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        post = self.vae.encode(x).latent_dist
        return posterior(post.mean - self.shift, post.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z + self.shift).sample


def patch_statistics(mean: torch.Tensor, var: torch.Tensor, channels: int, patch: tuple[int, int], eps: float):
    """FLUX.2's batch-norm statistics, one per channel of its 2 x 2 patchified latents, laid out on the
    unpatchified grid: (channels, ph, pw) means and standard deviations, entry (c, i, j) for the latent
    positions (ph y + i, pw x + j) of channel c (the order of Flux2Pipeline._patchify_latents)."""
    ph, pw = patch
    return mean.view(channels, ph, pw), torch.sqrt(var.view(channels, ph, pw) + eps)


class Flux2Normalised(torch.nn.Module):
    """diffusers' AutoencoderKLFlux2 with the normalisation the FLUX.2 pipeline applies to its latents:
    (E(x) - running_mean) / sqrt(running_var + eps) per channel of the 2 x 2 patchified latent; kept on
    the unpatchified 32-channel grid at 1/8 of the side (the same values, in their places)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        mu, sd = patch_statistics(
            vae.bn.running_mean, vae.bn.running_var, cfg.latent_channels, tuple(cfg.patch_size), cfg.batch_norm_eps
        )
        self.register_buffer("mu", mu.clone(), persistent=False)
        self.register_buffer("sd", sd.clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _tiled(self, stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        h, w = like.shape[-2:]
        ph, pw = stat.shape[-2:]
        return stat.repeat(1, -(-h // ph), -(-w // pw))[:, :h, :w].to(like.dtype)  # an odd side: its last row

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        post = self.vae.encode(x).latent_dist
        mu, sd = self._tiled(self.mu, post.mean), self._tiled(self.sd, post.mean)
        return posterior((post.mean - mu) / sd, post.logvar - 2 * torch.log(sd))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z * self._tiled(self.sd, z) + self._tiled(self.mu, z)).sample


class TinyAdapter(Shifted):
    """diffusers' AutoencoderTiny (TAESD in diffusers' format): deterministic latents, already in the
    generator's diffusion space (its scaling_factor 1); its shift_factor (0 in every TAESD) removed.
    Its decoder (DecoderTiny) returns [-1, 1], as Shifted.decode expects."""

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        z = self.vae.encode(x).latents - self.shift  # diffusers' EncoderTiny maps [-1, 1] to TAESD's [0, 1]
        return posterior(z, torch.full_like(z, DETERMINISTIC_LOGVAR))
