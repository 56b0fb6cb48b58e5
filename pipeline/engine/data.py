"""Stage two's data path: rows of a latent store, in memory or streamed, and per-batch features.

Rows are visited in windows of `shuffle_chunks` store chunks (chunk order and row order inside a
window both shuffled), the same order whether the latents are in memory or streamed, so the memory
budget never changes a result. Features are built on the training device per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from leakpipe.pipeline.engine.precision import cache_placement
from leakpipe.pipeline.math import diffusion
from leakpipe.pipeline.math.dct import dct_matrix

from leakpipe.pipeline.math import features
from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.config import Config


class LatentRows:
    """Selected rows (`rows`, store indices) of a latent store, with integer labels."""

    def __init__(self, store_path, rows: np.ndarray, labels: np.ndarray, budget_bytes: float):
        self.group = latent_store.open_store(store_path)
        self.rows, self.labels = np.asarray(rows, np.int64), np.asarray(labels, np.int64)
        self.chunk_rows = self.group["mean"].chunks[0]
        self.latent_shape = tuple(self.group["mean"].shape[1:])
        self.hashes = (
            self.group["source_hash"].get_orthogonal_selection((self.rows,))
            if len(self.rows)
            else np.zeros((0, 16), np.uint8)
        )
        need = 2 * len(self.rows) * int(np.prod(self.latent_shape)) * 4
        self.in_memory = need <= budget_bytes
        self._cache = self._read(np.arange(len(self.rows))) if self.in_memory else None
        self._placed = "host"  # see place()

    @property
    def placement(self) -> str:
        if not self.in_memory:
            return "latents streamed by chunk"
        return {"gpu": "latents on the GPU", "pinned": "latents in host memory, batches through pinned buffers"}.get(
            self._placed, "latents in host memory"
        )

    def place(self, device: torch.device, gpu_budget_bytes: float) -> None:
        """Where the in-memory latents live while training on `device` (precision.cache_placement):
        on the GPU, so that no batch crosses the bus, or in pinned host memory, gathered per batch
        straight into pinned buffers for asynchronous copies. Nothing changes on a CPU."""
        if not self.in_memory:
            return
        self._placed = cache_placement(sum(v.nbytes for v in self._cache.values()), device, gpu_budget_bytes)
        if self._placed == "gpu":
            self._cache = {k: torch.from_numpy(v).to(device) for k, v in self._cache.items()}
        elif self._placed == "pinned":
            self._cache = {k: torch.from_numpy(v) for k, v in self._cache.items()}

    def _take(self, key: str, pos: np.ndarray):
        """Cached rows at `pos`: numpy on a CPU run; a GPU tensor, or a pinned host tensor, once placed."""
        cache = self._cache[key]
        if self._placed == "host":
            return cache[pos]
        index = torch.from_numpy(pos)
        if self._placed == "gpu":
            return cache[to_device(index, cache.device)]
        out = torch.empty((len(pos), *cache.shape[1:]), dtype=cache.dtype, pin_memory=True)
        return torch.index_select(cache, 0, index, out=out)

    def __len__(self):
        return len(self.rows)

    def _read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at `positions`, each checked against its latent_hash as it is read (DamagedRows)."""
        idx = self.rows[positions]
        order = np.argsort(idx, kind="stable")
        data = latent_store.read_rows(self.group, idx[order])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return {k: v[back].astype(np.float32) for k, v in data.items()}

    def windows(self, seed: int | None, window_chunks: int) -> list[np.ndarray]:
        """Positions grouped in windows; seed None = store order in one pass (evaluation)."""
        positions = np.arange(len(self.rows))
        if seed is None:
            return [positions[k : k + 4096] for k in range(0, len(positions), 4096)]
        rng = np.random.default_rng(seed)
        chunk_of = self.rows // self.chunk_rows
        chunks = rng.permutation(np.unique(chunk_of))
        out = []
        for k in range(0, len(chunks), window_chunks):
            sel = positions[np.isin(chunk_of, chunks[k : k + window_chunks])]
            out.append(rng.permutation(sel))
        return out

    def n_batches(self, batch_size: int, seed: int | None, window_chunks: int = 32) -> int:
        """How many batches `batches` yields with these arguments."""
        return sum(-(-len(w) // batch_size) for w in self.windows(seed, window_chunks))

    def rows_at(self, pos: np.ndarray):
        """(mean, logvar) of the rows at positions `pos`, in that order (checked as read when streamed)."""
        if self.in_memory:
            return self._take("mean", pos), self._take("logvar", pos)
        data = self._read(np.asarray(pos))
        return data["mean"], data["logvar"]

    def batches(self, batch_size: int, seed: int | None, window_chunks: int = 32):
        """Yields (positions, mean, logvar, labels), window by window: numpy, except that latents
        placed for a GPU come as tensors (see place())."""
        for window in self.windows(seed, window_chunks):
            data = None if self.in_memory else self._read(np.sort(window))
            where = None if self.in_memory else {p: i for i, p in enumerate(np.sort(window))}
            for k in range(0, len(window), batch_size):
                pos = window[k : k + batch_size]
                if self.in_memory:
                    m, lv = self._take("mean", pos), self._take("logvar", pos)
                else:
                    local = np.array([where[p] for p in pos])
                    m, lv = data["mean"][local], data["logvar"][local]
                yield pos, m, lv, self.labels[pos]


def eval_noise(hashes: np.ndarray, eval_seed: int, shape: tuple) -> torch.Tensor:
    """Seeded noise per image, keyed by its content hash: the same image always gets the same eps,
    whatever its row, batch or split. (B, 16) uint8 -> (B, *shape)."""
    out = torch.empty((len(hashes), *shape))
    g = torch.Generator()
    for i, h in enumerate(hashes):
        g.manual_seed((int.from_bytes(bytes(h[:8]), "little") ^ eval_seed) & (2**63 - 1))
        out[i] = torch.randn(shape, generator=g)
    return out


def to_device(x, device: torch.device) -> torch.Tensor:
    """A batch (numpy, or a tensor from a placed cache) on `device`. On CUDA host memory is pinned
    first: a copy from pageable memory would make the host wait for every queued kernel."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if t.device != device and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


GRID_PIXELS = 8  # crops start on the JPEG block grid: every 8 image pixels (every z0 pixel of an SD latent)


def tile_offsets(side: int, crop: int, grid: int) -> list[int]:
    """Starts of the non-overlapping crop-sized tiles along one axis: as many as fit, centred, each
    on the grid."""
    n = max(1, side // crop)
    start = (side - n * crop) // 2 // grid * grid
    return [start + k * crop for k in range(n)]


def crop_views(x: torch.Tensor, offsets: torch.Tensor, crop: int, flips: torch.Tensor) -> torch.Tensor:
    """Per sample, the crop x crop window at `offsets` (B, 2: top, left) of x (B, ..., H, W), flipped
    where `flips` (B, 2: horizontal, vertical) says so."""
    out = torch.stack(
        [x[i, ..., int(t) : int(t) + crop, int(l) : int(l) + crop] for i, (t, l) in enumerate(offsets.tolist())]  # noqa: E741 (top, left)
    )
    out = torch.where(flips[:, 0].view(-1, *[1] * (out.dim() - 1)), out.flip(-1), out)
    return torch.where(flips[:, 1].view(-1, *[1] * (out.dim() - 1)), out.flip(-2), out)


def tiles(x: torch.Tensor, crop: int, grid: int) -> torch.Tensor:
    """x (B, ..., H, W) -> (B, K, ..., crop, crop): the tiles of `tile_offsets`, row by row."""
    rows, cols = tile_offsets(x.shape[-2], crop, grid), tile_offsets(x.shape[-1], crop, grid)
    return torch.stack([x[..., t : t + crop, l : l + crop] for t in rows for l in cols], dim=1)  # noqa: E741


@dataclass
class FeatureBuilder:
    """z0 moments -> standardised f_t on the device (Eq. 1-4 and the standardisation). With
    train.crop, training sees random crops of z0 (train.augment: flips too) and evaluation the tiles
    of z0, as (B, K, T, C, crop, crop)."""

    cfg: Config
    device: torch.device
    mean: torch.Tensor | None = None  # (T, 2C) feature statistics
    std: torch.Tensor | None = None
    alpha: torch.Tensor | None = None  # (T,) alpha_t and sigma_t; None: from diffusion.schedule
    sigma: torch.Tensor | None = None
    dct: tuple | None = None  # the DCT bases (rows, columns) of DCT_low; None: computed for each input

    def __post_init__(self):
        if self.alpha is None:
            abar = diffusion.alphas_cumprod(self.cfg.diffusion.schedule, self.cfg.diffusion.num_steps)
            self.alpha, self.sigma = diffusion.alpha_sigma(abar, self.cfg.diffusion.timesteps)
        self.alpha, self.sigma = self.alpha.float().to(self.device), self.sigma.float().to(self.device)
        if self.dct is not None:
            self.dct = tuple(b.float().to(self.device) for b in self.dct)

    def saved(self) -> dict[str, torch.Tensor]:
        """What a model file keeps of the feature path, so that a trained model is evaluated with the
        values it was trained with, whatever the code computes later: the statistics, alpha_t, sigma_t
        and the DCT bases."""
        out = {
            "feature_mean": self.mean,
            "feature_std": self.std,
            "feature_alpha": self.alpha,
            "feature_sigma": self.sigma,
        }
        return {**out, **({"feature_dct_rows": self.dct[0], "feature_dct_cols": self.dct[1]} if self.dct else {})}

    @classmethod
    def from_saved(cls, cfg: Config, device: torch.device, tensors: dict) -> "FeatureBuilder":
        """The feature path of a model file (see `saved`); files from before leakpipe saved alpha_t, sigma_t
        and the DCT bases compute them from the config, as the code that trained them did."""
        dct = (tensors["feature_dct_rows"], tensors["feature_dct_cols"]) if "feature_dct_rows" in tensors else None
        return cls(
            cfg,
            device,
            tensors["feature_mean"].to(device),
            tensors["feature_std"].to(device),
            tensors.get("feature_alpha"),
            tensors.get("feature_sigma"),
            dct,
        )

    def fix_dct(self, latent_shape: tuple) -> None:
        """Compute the DCT bases once for what the model sees (a crop, or z0 whole), to be saved with it."""
        if self.cfg.features.dct_map != "none" and self.dct is None:
            side = self.crop(latent_shape) or None
            h, w = (side, side) if side else latent_shape[-2:]
            self.dct = (dct_matrix(h, device=self.device), dct_matrix(w, device=self.device))

    @property
    def n_timesteps(self) -> int:
        return len(self.cfg.diffusion.timesteps)

    def noise_shape(self, latent_shape: tuple) -> tuple:
        """One eps per timestep, plus one for the posterior sample when latent.sample is on."""
        return (self.n_timesteps + int(self.cfg.latent.sample), *latent_shape)

    def crop(self, latent_shape: tuple) -> int:
        """The side of the training crops and evaluation tiles (0: z0 whole)."""
        c = self.cfg.train.crop
        return c if 0 < c < min(latent_shape[-2:]) else 0

    def eval_rows(self, batch_size: int, latent_shape: tuple) -> int:
        """Images per evaluation batch of `batch_size` backbone inputs: fewer under train.crop, whose
        every image is that many tiles."""
        crop = self.crop(latent_shape)
        if not crop:
            return batch_size
        n = len(tile_offsets(latent_shape[-2], crop, 1)) * len(tile_offsets(latent_shape[-1], crop, 1))
        return max(1, batch_size // n)

    def grid(self, latent_shape: tuple) -> int:
        """Crop offsets are multiples of this many z0 pixels: 8 image pixels."""
        per_pixel = max(1, self.cfg.preprocess.size // latent_shape[-1])  # image pixels per z0 pixel
        return max(1, GRID_PIXELS // per_pixel)

    def draw_views(self, n: int, latent_shape: tuple, gen: torch.Generator) -> torch.Tensor | None:
        """(n, 4) int: per sample the crop's top and left and the horizontal and vertical flip (0/1),
        drawn from `gen`; None (drawing nothing) without train.crop and train.augment."""
        crop, aug = self.crop(latent_shape), self.cfg.train.augment
        if not crop and not aug:
            return None
        h, w = latent_shape[-2:]
        grid = self.grid(latent_shape)
        out = torch.zeros((n, 4), dtype=torch.int64, device=gen.device)
        if crop:
            for k, side in enumerate((h, w)):
                out[:, k] = torch.randint(0, (side - crop) // grid + 1, (n,), generator=gen, device=gen.device) * grid
        for k, flip in enumerate(("hflip", "vflip")):
            if flip in aug:
                out[:, 2 + k] = torch.randint(0, 2, (n,), generator=gen, device=gen.device)
        return out

    def __call__(
        self,
        mean: np.ndarray,
        logvar: np.ndarray,
        eps: torch.Tensor,
        standardise: bool = True,
        views: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps (B, T [+1 if latent.sample], C, h, w): diffusion noise, then the posterior sample's.
        `views` (from draw_views): the training crops and flips; without, the tiles under train.crop."""
        m, lv = (to_device(x, self.device) for x in (mean, logvar))
        eps = eps.to(self.device, non_blocking=True)
        t = self.n_timesteps
        z0 = diffusion.latent_z0(
            m, lv, self.cfg.latent.scale, self.cfg.latent.scale_mode, eps[:, t] if self.cfg.latent.sample else None
        )
        if self.cfg.features.highpass == "residual":
            z0 = features.highpass_residual(z0)
        eps, crop, n = eps[:, :t], self.crop(m.shape[1:]), len(m)
        if not self.cfg.diffusion.noise:
            eps = torch.zeros_like(eps)
        if views is not None:
            side = crop or min(z0.shape[-2:])
            views = views.to(self.device)
            z0, eps = (crop_views(x, views[:, :2], side, views[:, 2:].bool()) for x in (z0, eps))
        elif crop:
            grid = self.grid(m.shape[1:])
            z0, eps = (tiles(x, crop, grid).flatten(0, 1) for x in (z0, eps))
        f = features.features(
            diffusion.diffuse(z0, eps, self.alpha, self.sigma),
            self.cfg.features.dct_k,
            self.cfg.features.dct_map,
            self.dct,
        )
        if standardise and self.cfg.features.standardize:
            f = features.standardise(f, self.mean, self.std)
        return f.view(n, -1, *f.shape[1:]) if views is None and crop else f

    def fit_statistics(self, data: LatentRows, batch_size: int) -> None:
        """Per-timestep mean and std of f_t over `data` (per channel, or per DCT coefficient with
        features.dct_stats = per_coefficient and per position of z_t with features.latent_stats =
        per_position), with its seeded eval noise (over the tiles with train.crop)."""
        stats = features.RunningStats()
        shape = self.noise_shape(data.latent_shape)
        for pos, m, lv, _ in data.batches(self.eval_rows(batch_size, data.latent_shape), seed=None):
            f = self(m, lv, eval_noise(data.hashes[pos], self.cfg.train.eval_seed, shape), standardise=False)
            stats.update(f.flatten(0, 1) if f.dim() == 6 else f)
        fc, c = self.cfg.features, data.latent_shape[0]
        per_coefficient = fc.dct_stats == "per_coefficient" and fc.dct_map != "none"
        per_position = fc.latent_stats == "per_position"
        result = stats.result(c if per_coefficient else 0, c if per_position else 0)
        self.mean, self.std = (x.to(self.device) for x in result)
