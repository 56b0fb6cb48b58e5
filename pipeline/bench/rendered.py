"""A second synthetic family: generators rendered through a real decoder.

Each image starts as content like the pixel family's (a crop of scikit-learn's sample photos or a
procedural scene), encoded by a real autoencoder's encoder (the shipped TAEF2 by default). Its
generator then adds, in latent space, its own low-frequency bias, the "signal leak" of Everaert et al.
(WACV 2024): a diffusion model trained on noised latents that keep some of the image's low frequencies
but sampled from pure noise generates latents whose mean and lowest frequencies carry a model-specific
bias. Here it is a per-channel offset plus a few cosines of 1-2 cycles per image, and optionally the
generator's own latent noise level. The real decoder renders the result, so every generator's images
carry that decoder's own traces, and differ only by their latents.

Image i of every generator shows the same content (as prompt-matched benchmarks give each generator
the same prompts), so content cannot identify a generator, and it is encoded once for all of them.

What it models: several generators that share one autoencoder (as the models built on one base's VAE
do) and differ by the latent statistics their sampler leaves. What it does not: a generator's own
decoder or upsampler, the denoiser's textures, prompts and semantics, or a generator's content
distribution. The pixel family (`synth.py`) paints its fingerprints in pixel space instead;
docs/guide/synthetic.md compares the two.

Images are rendered in fixed chunks of CHUNK consecutive indices (torch's convolutions give a sample
bits that depend on its batch), every chunk whole, so an image's bytes depend on its identity (seed,
generator, index, size, difficulty, noise) and the autoencoder, not on the number of images or
generators asked for; the same arguments give the same bytes on the same machine and torch build.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakpipe.pipeline.bench import synth

# Leak amplitudes at difficulty 1, in latent units (TAEF2's latents have std about 0.7 over the
# content; calibrated with benchmarks/synth.py --family decoder, see docs/guide/synthetic.md)
LEAK_MEAN = 0.15  # std of each channel's offset
LEAK_AMPLITUDE = 0.25  # std of the cosines' amplitudes, summed over them
LEAK_COMPONENTS = 3
NOISE_RANGE = (0.05, 0.3)  # std of the generator's own latent noise
CHUNK = 8  # images per decoder call


@dataclass(frozen=True)
class LatentLeak:
    name: str
    mean: np.ndarray  # (C,) offset of each latent channel
    freqs: np.ndarray  # (K, 2) cycles per image along x, y: 1 or 2 (0 is the offset)
    phases: np.ndarray  # (K, C)
    amps: np.ndarray  # (K, C)
    noise: float  # std of the latent noise the generator adds; 0: none


def make_leak(name: str, seed: int, channels: int, difficulty: float = 1.0, noise: bool = True) -> LatentLeak:
    """Generator `name`'s latent bias (and noise level), all scaled by 1/difficulty."""
    rng = synth.rng_for(seed, "leak", name)
    scale, k = 1.0 / difficulty, LEAK_COMPONENTS
    freqs = rng.integers(0, 3, size=(k, 2)).astype(float)
    freqs[(freqs == 0).all(1)] = 1.0  # each cosine varies across the image
    return LatentLeak(
        name=name,
        mean=rng.normal(size=channels) * LEAK_MEAN * scale,
        freqs=freqs,
        phases=rng.uniform(0, 2 * np.pi, size=(k, channels)),
        amps=rng.normal(size=(k, channels)) * LEAK_AMPLITUDE * scale / np.sqrt(k),
        noise=float(rng.uniform(*NOISE_RANGE)) * scale if noise else 0.0,
    )


def leak_field(leak: LatentLeak, h: int, w: int) -> np.ndarray:
    """The generator's low-frequency latent bias on an h x w latent grid: (C, h, w)."""
    y, x = np.mgrid[0:h, 0:w].astype(float)
    y, x = (y + 0.5) / h, (x + 0.5) / w
    field = np.broadcast_to(leak.mean[:, None, None], (len(leak.mean), h, w)).copy()
    for (fx, fy), ph, amp in zip(leak.freqs, leak.phases, leak.amps):
        field += amp[:, None, None] * np.cos(2 * np.pi * (fx * x + fy * y)[None] + ph[:, None, None])
    return field


def contents(seed: int, indices, size: int) -> np.ndarray:
    """(B, size, size, 3) in [0, 1]: the content of images `indices`, the same for every generator."""
    out = []
    for i in indices:
        rng = synth.rng_for(seed, "rendered-content", int(i))
        out.append((synth.photo_content if rng.random() < 0.5 else synth.procedural_content)(rng, size))
    return np.clip(np.stack(out), 0, 1)


def encode_chunk(autoencoder, seed: int, start: int, size: int):
    """The latents (CHUNK, C, h, w) of images start ... start + CHUNK - 1's content."""
    import torch

    x = torch.from_numpy(contents(seed, range(start, start + CHUNK), size)).float()
    x = (x.permute(0, 3, 1, 2) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return autoencoder.encode(x).latent_dist.mean.float()


def render_chunk(autoencoder, z, leak: LatentLeak, seed: int, start: int) -> np.ndarray:
    """Generator `leak`'s images start ... start + CHUNK - 1 from their content's latents `z`: plus its
    latent bias and noise, through the decoder, as uint8 (CHUNK, H, W, 3)."""
    import torch

    c, h, w = z.shape[1:]
    noise = np.stack(
        [synth.rng_for(seed, "latent-noise", leak.name, start + j).normal(size=(c, h, w)) for j in range(CHUNK)]
    )
    with torch.inference_mode():
        z = z + torch.from_numpy(leak_field(leak, h, w) + leak.noise * noise).float()
        img = autoencoder.decode(z.contiguous(memory_format=torch.channels_last)).float()
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().numpy()


def latent_channels(autoencoder, size: int) -> int:
    """The autoencoder's latent channels, from encoding one blank image of `size`."""
    import torch

    with torch.inference_mode():
        return int(autoencoder.encode(torch.zeros(1, 3, size, size)).latent_dist.mean.shape[1])
