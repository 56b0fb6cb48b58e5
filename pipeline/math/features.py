"""f_t = concat[z_t / sigma_t, DCT_low(z_t / sigma_t)] and its per-timestep standardisation."""
from __future__ import annotations

import torch

from leakpipe.pipeline.math.dct import dct_low


def features(zt_over_sigma: torch.Tensor, k: int, dct_map: str) -> torch.Tensor:
    """(B, T, C, h, w) -> f_t of shape (B, T, 2C, h, w) (Eq. 4)."""
    return torch.cat([zt_over_sigma, dct_low(zt_over_sigma, k, dct_map)], dim=2)


def standardise(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-timestep, per-channel standardisation: mean and std of shape (T, 2C)."""
    return (f - mean[None, :, :, None, None]) / std[None, :, :, None, None]


class RunningStats:
    """Per-(timestep, channel) mean and std over many batches, accumulated in float64."""

    def __init__(self):
        self.n = 0
        self.s1 = self.s2 = None

    def update(self, f: torch.Tensor) -> None:
        f = f.detach().double()
        per = f.shape[0] * f.shape[-1] * f.shape[-2]
        s1, s2 = f.sum(dim=(0, 3, 4)), (f * f).sum(dim=(0, 3, 4))
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += per

    def result(self, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().clamp_min(floor).float()
