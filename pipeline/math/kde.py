"""Gaussian kernel density estimation in torch (Eq. 16-17), float64 and chunked.

scikit-learn's KernelDensity is not used: it returns wrong log-densities at small bandwidths in high
dimension (scikit-learn issue #25799; 447 nats off at h = 1 in 512-D measured here), and it is slow.
Memory is bounded at any N: queries and references are processed in blocks and the log-sum-exp is
accumulated across reference blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from leakpipe.pipeline.math.rows import by_blocks

DTYPES = {"float64": torch.float64, "float32": torch.float32}
QUERY_BLOCKS = 64  # query blocks converted to the KDE's dtype at once (64 x 1024 x D values), whatever the rows


def log_density(queries: torch.Tensor, reference: torch.Tensor, bandwidth: float, block: int = 1024) -> torch.Tensor:
    """Eq. 16-17: log p(x) = logsumexp_i(-|x - x_i|^2 / 2h^2) - log N - (D/2) log(2 pi h^2)."""
    return log_densities(queries, reference, [bandwidth], block)[0]


def log_densities(queries: torch.Tensor, reference: torch.Tensor, bandwidths, block: int = 1024) -> list:
    """`log_density` at each of `bandwidths`, from one pass over the distances (cross-validation
    scores a grid of bandwidths on the same pairs of rows)."""
    n, d = reference.shape
    ref_sq = (reference * reference).sum(1)
    out = [torch.empty(len(queries), dtype=queries.dtype, device=queries.device) for _ in bandwidths]
    for q0 in range(0, len(queries), block):
        q = queries[q0 : q0 + block]
        q_sq = (q * q).sum(1, keepdim=True)
        acc = [torch.full((len(q),), -math.inf, dtype=q.dtype, device=q.device) for _ in bandwidths]
        for r0 in range(0, n, block):
            # |q - r|^2 = |q|^2 + |r|^2 - 2 q.r, fused, in place: one (block x block) buffer
            dist = torch.addmm(ref_sq[r0 : r0 + block], q, reference[r0 : r0 + block].T, alpha=-2)
            dist.add_(q_sq).clamp_min_(0)
            for j, h in enumerate(bandwidths):
                scaled = dist.mul_(-0.5 / h**2) if len(bandwidths) == 1 else dist.mul(-0.5 / h**2)
                acc[j] = torch.logaddexp(acc[j], torch.logsumexp(scaled, dim=1))
        for j in range(len(bandwidths)):
            out[j][q0 : q0 + block] = acc[j]
    return [o - math.log(n) - 0.5 * d * math.log(2 * math.pi * h**2) for o, h in zip(out, bandwidths)]


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """k of n row indices, sorted, drawn without replacement by a generator of its own (seeded from
    `seed`, apart from the folds' permutation)."""
    return np.sort(np.random.default_rng([seed, 0x6B6465]).choice(n, size=k, replace=False))


def default_grid(x: torch.Tensor, factors) -> list[float]:
    """Bandwidths as multiples of the data's scale (root of the mean per-dimension variance)."""
    scale = float(x.var(0).mean().sqrt()) or 1.0
    return [scale * f for f in factors]


def cv_log_likelihood(x: torch.Tensor, grid: list[float], folds: int, seed: int, block: int) -> np.ndarray:
    """Mean held-out log-likelihood of each bandwidth over `folds` seeded folds (rows: folds)."""
    folds = max(2, min(folds, len(x)))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(x))).to(x.device)
    parts = torch.tensor_split(perm, folds)
    out = np.zeros((folds, len(grid)))
    for k, held in enumerate(parts):
        keep = torch.cat([p for j, p in enumerate(parts) if j != k])
        out[k] = [float(v.mean()) for v in log_densities(x[held], x[keep], grid, block)]
    return out


@dataclass
class GaussianKDE:
    """fit(x) picks the bandwidth by k-fold cross-validated likelihood unless one is given;
    score_samples(q) returns log-densities as float64 numpy."""

    bandwidth: float | None = None
    grid_factors: tuple = ()  # bandwidths as multiples of the data's scale (score.kde_grid) when bandwidth is None
    folds: int = 5
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"
    block: int = 1024  # rows per block: memory is block^2 x 8 bytes (8 MiB), whatever N
    # at most this many reference rows (0: all): above it, a seeded subsample. Fitting costs
    # folds x grid x (4/5) N^2 / 5 kernel evaluations and scoring M queries M x N, so the cap bounds
    # the time, and the reference's memory (N x D x 8 bytes), of a million-row training set.
    max_reference: int = 0
    cv: dict = field(default_factory=dict)  # grid, mean held-out log-likelihood, chosen bandwidth
    reference: dict = field(default_factory=dict)  # rows given, rows used, the cap, the seed

    def fit(self, x) -> "GaussianKDE":
        """x: an array, or EmbeddingRows (only the reference rows are made)."""
        x = x if isinstance(x, EmbeddingRows) else np.asarray(x)
        self.reference = {
            "rows": int(len(x)),
            "used": int(len(x)),
            "max_reference": self.max_reference,
            "seed": self.seed,
        }
        used: slice | np.ndarray = slice(None)
        if 0 < self.max_reference < len(x):
            used = subsample(len(x), self.max_reference, self.seed)
            self.reference["used"] = self.max_reference
        self.reference_ = torch.as_tensor(np.asarray(x[used]), dtype=DTYPES[self.dtype], device=self.device)
        if len(self.reference_) < 2:
            raise ValueError(f"a KDE needs at least 2 reference samples, got {len(self.reference_)}")
        if self.bandwidth is None:
            if not self.grid_factors:
                raise ValueError("a KDE needs a bandwidth or a grid of bandwidth factors (score.kde_grid)")
            grid = default_grid(self.reference_, self.grid_factors)
            ll = cv_log_likelihood(self.reference_, grid, self.folds, self.seed, self.block).mean(0)
            self.bandwidth_ = grid[int(np.nanargmax(ll))]
            self.cv = {
                "grid": grid,
                "mean_heldout_loglik": ll.tolist(),
                "folds": self.folds,
                "bandwidth": self.bandwidth_,
                "at_grid_edge": int(np.nanargmax(ll)) in (0, len(grid) - 1),
            }
        else:
            self.bandwidth_ = float(self.bandwidth)
        return self

    def score_samples(self, q) -> np.ndarray:
        """Log-densities of the rows of q (an array, or EmbeddingRows), QUERY_BLOCKS blocks of rows at a
        time: the blocks `log_density` makes of all of them, so the same numbers."""
        q = q if isinstance(q, EmbeddingRows) else np.asarray(q)
        return by_blocks(self._log_density, q, self.block * QUERY_BLOCKS)

    def _log_density(self, q) -> np.ndarray:
        q = torch.as_tensor(np.asarray(q), dtype=self.reference_.dtype, device=self.device)
        return log_density(q, self.reference_, self.bandwidth_, self.block).cpu().double().numpy()


def embedding(h_bar: np.ndarray, w: np.ndarray | None, kind: str) -> np.ndarray:
    """What the open-set KDE reads (Eq. 16-17): h_bar (kind "h_bar", gating off) or h_bar * w ("gated")."""
    return h_bar * w if kind == "gated" else h_bar


class EmbeddingRows:
    """`embedding(h_bar, w, kind)` of the rows asked for (`rows[i:j]`, `rows[index]`), in float64, made
    only then: a KDE or a comparator reads a million rows without a float64 copy of them all."""

    def __init__(self, h_bar: np.ndarray, w: np.ndarray | None, kind: str):
        self.h_bar, self.w, self.kind = h_bar, w, kind  # w: None where kind is "h_bar"

    def __len__(self) -> int:
        return len(self.h_bar)

    def __getitem__(self, rows) -> np.ndarray:
        return embedding(self.h_bar[rows].astype(np.float64), None if self.w is None else self.w[rows], self.kind)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)
