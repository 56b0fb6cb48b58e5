"""Noise schedules and forward diffusion (paper Eq. 1-3), as pure tensor functions."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "scaled_linear")


def betas(schedule: str, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """beta_1..beta_T in float64: cosine = diffusers' squaredcos_cap_v2; linear and scaled_linear
    with SD's (0.00085, 0.012) endpoints (the authors' code uses linear, SD 2.1 scaled_linear)."""
    if schedule == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor(
            [min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)], dtype=torch.float64
        )
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def alphas_cumprod(schedule: str, num_steps: int = 1000) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), indexed like diffusers (t = 0 is one noising step)."""
    return torch.cumprod(1 - betas(schedule, num_steps), dim=0)


def alpha_sigma(abar: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) for each timestep (Eq. 2)."""
    a = abar[torch.as_tensor(list(timesteps))]
    return a.sqrt(), (1 - a).sqrt()


def latent_z0(
    mean: torch.Tensor, logvar: torch.Tensor | None, scale: float, mode: str, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """z0 from the stored posterior (Eq. 1): the mean (or a sample), times s ('multiply', the
    authors' code) or divided by s ('divide', Eq. 1 as printed)."""
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
    return z * scale if mode == "multiply" else z / scale


def diffuse(z0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_t / sigma_t with z_t = alpha_t z0 + sigma_t eps (Eq. 3), for all t at once.

    z0 (B, C, h, w), eps (B, T, C, h, w), alpha and sigma (T,) -> (B, T, C, h, w).
    """
    a = alpha.to(z0.dtype).view(1, -1, 1, 1, 1)
    s = sigma.to(z0.dtype).view(1, -1, 1, 1, 1)
    return (a * z0.unsqueeze(1) + s * eps) / s
