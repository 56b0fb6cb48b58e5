"""Training on post-processed variants (train.variants): which image each variant copies, and the rows
an epoch trains on, drawn per image from the original or one of its variants.

A latent cache cannot augment on the fly without running the encoder again, so `leakpipe postprocess
--variants K` writes K post-processed copies of each train and val image and `encode` caches them like
any split. A variant keeps its image's label and partition (checked here: a copy in another partition
than its source would train on a test image, or select on a training one), and the leakage audit
treats it as its image.
"""

from __future__ import annotations

import numpy as np
import torch

from leakpipe.pipeline.engine.data import LatentRows
from leakpipe.pipeline.manifest import Manifest, ManifestError
from leakpipe.pipeline.store import latent_store


class DamagedVariants(latent_store.DamagedRows):
    """Rows of the variants' store (not train.split's) whose bytes fail their checksum."""


def sources(base: Manifest, variants: Manifest) -> np.ndarray:
    """(n,) the row of `base` that each row of `variants` copies (its source column, BASE:PATH); an
    error naming every row whose source is no row of `base`, or whose label or partition differs."""
    index, prefix = {p: i for i, p in enumerate(base.column("path"))}, f"{base.name}:"
    labels, parts = base.column("label"), base.column("partition")
    given = variants.column("source") if variants.has_column("source") else [""] * len(variants)
    out, problems = np.full(len(variants), -1, np.int64), []
    for j, (src, label, part) in enumerate(zip(given, variants.column("label"), variants.column("partition"))):
        i = index.get(src[len(prefix) :]) if src.startswith(prefix) else None
        if i is None:
            problems.append(
                f"line {variants.line(j)}: source {src!r} is no row of {base.source} (expected {prefix}PATH)"
            )
        elif (label, part) != (labels[i], parts[i]):
            problems.append(
                f"line {variants.line(j)}: a copy of {src} ({labels[i]}, partition {parts[i] or 'none'}) is labelled "
                f"{label}, partition {part or 'none'}; a variant keeps its image's label and partition"
            )
        else:
            out[j] = i
    if problems:
        problems.append(
            f"write the variants again from the manifest: `leakpipe postprocess --split {base.name} --variants K`"
        )
        raise ManifestError(str(variants.source), problems)
    return out


class VariantRows:
    """The training rows of `base` (a LatentRows), each replaced in an epoch, with probability p, by one
    of its variants (rows of `variants`; `of[j]` is the position in `base` of variant j's image), drawn
    from the epoch's seed. Evaluation (seed None) reads the originals; everything else is `base`'s."""

    def __init__(self, base: LatentRows, variants: LatentRows, of: np.ndarray, p: float):
        self.base, self.variants, self.p = base, variants, p
        self.count = np.bincount(of, minlength=len(base))
        self.order = np.argsort(of, kind="stable")  # variants grouped by image, images in order
        self.first = np.cumsum(self.count) - self.count
        # precise BatchNorm statistics average over what training sees: one fixed draw of the mixture
        self.bn_draw = self.draw(np.random.default_rng([0, 0xB4]))

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    @property
    def placement(self) -> str:
        return (
            f"{self.base.placement}; {len(self.variants)} post-processed variants of "
            f"{int((self.count > 0).sum())} images, drawn with probability {self.p:g}"
        )

    def place(self, device: torch.device, gpu_budget_bytes: float) -> None:
        self.base.place(device, gpu_budget_bytes / 2)
        self.variants.place(device, gpu_budget_bytes / 2)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """(n,) per image, the variant it is replaced by (a position in `variants`), -1 for the original."""
        u, k = rng.random(len(self.base)), rng.random(len(self.base))
        i = np.flatnonzero((self.count > 0) & (u < self.p))
        out = np.full(len(self.base), -1, np.int64)
        out[i] = self.order[self.first[i] + (k[i] * self.count[i]).astype(np.int64)]  # uniform among its variants
        return out

    def _swap(self, pos: np.ndarray, drawn: np.ndarray, m, lv):
        """(mean, logvar) of the batch at `pos` with the drawn variants in place of their images."""
        v = drawn[pos]
        k = np.flatnonzero(v >= 0)
        if not len(k):
            return m, lv
        try:
            vm, vlv = self.variants.rows_at(v[k])
        except latent_store.DamagedRows as exc:
            raise DamagedVariants(exc.rows) from None
        return _put(m, k, vm), _put(lv, k, vlv)

    def rows_at(self, pos: np.ndarray):
        m, lv = self.base.rows_at(pos)
        return self._swap(np.asarray(pos), self.bn_draw, m, lv)

    def batches(self, batch_size: int, seed: int | None, window_chunks: int = 32):
        """`base`'s batches, in its order; with a seed (training), each image's draw of that epoch."""
        drawn = None if seed is None else self.draw(np.random.default_rng([seed, 0x7A7]))
        for pos, m, lv, y in self.base.batches(batch_size, seed, window_chunks):
            yield (pos, *self._swap(pos, drawn, m, lv), y) if drawn is not None else (pos, m, lv, y)


def _put(x, k: np.ndarray, values):
    """A copy of the batch `x` (numpy, or a tensor of a placed cache) with rows `k` set to `values`."""
    if isinstance(x, np.ndarray):
        x = x.copy()
        x[k] = values.cpu().numpy() if isinstance(values, torch.Tensor) else values
        return x
    x = x.clone()
    x[torch.from_numpy(k).to(x.device)] = torch.as_tensor(values).to(x.device, x.dtype)
    return x


def with_variants(train: LatentRows, lat, train_rows: np.ndarray, variants, p: float, budget: float) -> VariantRows:
    """`train` (the rows `train_rows` of the latents `lat`) drawing from the valid rows of the variants'
    latents `variants` that copy one of those rows."""
    of_base = sources(lat.manifest, variants.manifest)
    group = latent_store.open_store(variants.store)
    valid = latent_store.valid_rows(group, latent_store.hash_rows(variants.file_hashes))
    position = np.full(len(lat.manifest), -1, np.int64)
    position[train_rows] = np.arange(len(train_rows))
    keep = np.flatnonzero(valid & (of_base >= 0) & (position[np.maximum(of_base, 0)] >= 0))
    of = position[of_base[keep]]
    try:
        rows = LatentRows(variants.store, keep, train.labels[of], budget)
    except latent_store.DamagedRows as exc:
        raise DamagedVariants(exc.rows) from None
    return VariantRows(train, rows, of, p)
