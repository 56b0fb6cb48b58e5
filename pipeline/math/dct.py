"""The orthonormal 2-D DCT-II as matrix products, and the low-frequency map of Eq. 4."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DCT_MAPS = ("coeffs", "lowpass")


def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """C with C[k, i] = c_k cos(pi (2i + 1) k / 2n), c_0 = sqrt(1/n), c_k = sqrt(2/n): C C^T = I."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c.to(dtype=dtype, device=device)


def _bases(x: torch.Tensor, basis: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    if basis is not None:
        return tuple(b.to(x.dtype) for b in basis)
    return dct_matrix(x.shape[-2], x.dtype, x.device), dct_matrix(x.shape[-1], x.dtype, x.device)


def dct2(x: torch.Tensor, basis: tuple | None = None) -> torch.Tensor:
    """Orthonormal DCT-II over the last two axes (= scipy.fft.dctn(x, axes=(-2, -1), norm='ortho')),
    with the given (rows, columns) matrices or dct_matrix of x's sides."""
    ch, cw = _bases(x, basis)
    return ch @ x @ cw.T


def idct2(coeffs: torch.Tensor, basis: tuple | None = None) -> torch.Tensor:
    """Inverse of dct2."""
    ch, cw = _bases(coeffs, basis)
    return ch.T @ coeffs @ cw


def dct_low(x: torch.Tensor, k: int, mode: str = "coeffs", basis: tuple | None = None) -> torch.Tensor:
    """DCT_low (Eq. 4): the top-left k x k block of dct2(x), mapped back to x's spatial size.

    coeffs: the block itself, upsampled by nearest neighbour; lowpass: idct2 of the block zero-padded
    (a spatially aligned low-pass image).
    """
    h, w = x.shape[-2:]
    block = dct2(x, basis)[..., :k, :k]
    if mode == "coeffs":
        flat = block.reshape(-1, 1, k, k)
        return F.interpolate(flat, size=(h, w), mode="nearest").reshape(*x.shape)
    if mode == "lowpass":
        return idct2(F.pad(block, (0, w - k, 0, h - k)), basis)
    raise ValueError(f"unknown dct_map {mode!r}; expected one of {', '.join(DCT_MAPS)}")
