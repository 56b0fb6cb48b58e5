"""f_t = concat[z_t / sigma_t, DCT_low(z_t / sigma_t)] and its per-timestep standardisation."""

from __future__ import annotations

import torch

from leakpipe.pipeline.math.dct import dct_low


def features(zt_over_sigma: torch.Tensor, k: int, dct_map: str, basis: tuple | None = None) -> torch.Tensor:
    """Eq. 4: (B, T, C, h, w) -> f_t of shape (B, T, 2C, h, w); with dct_map "none", z_t / sigma_t alone.
    `basis`: the DCT matrices (rows, columns) to use, as saved with a model."""
    if dct_map == "none":
        return zt_over_sigma
    return torch.cat([zt_over_sigma, dct_low(zt_over_sigma, k, dct_map, basis)], dim=2)


# Ker and Bohme's 3 x 3 predictor residual (the "KB" kernel of the SRM family): a pixel minus its
# prediction from its eight neighbours, so smooth content cancels and noise-level traces remain
KB_KERNEL = ((-1.0, 2.0, -1.0), (2.0, -4.0, 2.0), (-1.0, 2.0, -1.0))


def highpass_residual(z: torch.Tensor) -> torch.Tensor:
    """The KB residual of every channel of z (B, C, h, w), the same size (reflected borders)."""
    import torch.nn.functional as F

    k = torch.tensor(KB_KERNEL, dtype=z.dtype, device=z.device) / 4
    c = z.shape[1]
    return F.conv2d(F.pad(z, (1, 1, 1, 1), mode="reflect"), k.expand(c, 1, 3, 3), groups=c)


def standardise(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-timestep standardisation: mean and std of shape (T, 2C) (per channel) or (T, 2C, h, w)."""
    if mean.dim() == 2:
        mean, std = mean[:, :, None, None], std[:, :, None, None]
    return (f - mean[None]) / std[None]


def z0_spread(mean: torch.Tensor, std: torch.Tensor, channels: int, alpha: torch.Tensor, sigma: torch.Tensor) -> float:
    """The std of z0 that f_t's statistics imply at the first timestep (Eq. 2-4): with z_t = alpha_t z0 +
    sigma_t eps, s^2 = alpha_t^2 var(z0) / sigma_t^2 + 1 for s the std of z_t / sigma_t (its first
    `channels` channels of `mean` and `std`, shape (T, 2C), or (T, 2C, h, w) per position: a channel's
    variance is then the mean of its positions' variances plus the variance of their means)."""
    m, v = mean[0, :channels].double(), std[0, :channels].double() ** 2
    if m.dim() == 3:
        v = v.mean(dim=(1, 2)) + m.var(dim=(1, 2), unbiased=False)
    s = v.sqrt().mean()
    return float(sigma[0].double() * (s * s - 1).clamp_min(0).sqrt() / alpha[0].double())


class RunningStats:
    """Mean and std of f_t over many batches per (timestep, channel, position), in float64."""

    def __init__(self):
        self.n = 0
        self.s1 = self.s2 = None

    def update(self, f: torch.Tensor) -> None:
        f = f.detach().double()
        s1, s2 = f.sum(dim=0), (f * f).sum(dim=0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += f.shape[0]

    def result(
        self, dct_channels: int = 0, latent_channels: int = 0, floor: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std): per (timestep, channel), shape (T, 2C); with `dct_channels` > 0 the last that many
        channels (the DCT map), and with `latent_channels` > 0 the first that many (z_t / sigma_t), keep
        one per position (per coefficient), and the shape is (T, 2C, h, w)."""
        s1, s2 = self.s1 / self.n, self.s2 / self.n
        mean, sq = s1.mean(dim=(2, 3)), s2.mean(dim=(2, 3))
        std = (sq - mean * mean).clamp_min(0).sqrt().clamp_min(floor)
        if not dct_channels and not latent_channels:
            return mean.float(), std.float()
        full_mean = mean[:, :, None, None].expand_as(s1).clone()
        full_std = std[:, :, None, None].expand_as(s1).clone()
        c = s1.shape[1]
        for part in (slice(c - dct_channels, c) if dct_channels else None, slice(0, latent_channels)):
            if part is not None:
                full_mean[:, part] = s1[:, part]
                full_std[:, part] = (s2 - s1 * s1)[:, part].clamp_min(0).sqrt().clamp_min(floor)
        return full_mean.float(), full_std.float()
