"""Baselines beside the model, on the same split: the chance level, a forensic pixel baseline, a
linear probe on the cached z0 (which tells whether stage one kept the signal at all), and a
reconstruction baseline.

Every baseline is a logistic regression on standardised features. The pixel baseline's features are
the classical forensic ones of `math/forensic.py` (block-DCT statistics on the JPEG grid, noise
residuals, the power spectrum, colour means), computed from each original file at its native
resolution (a centre crop of at most score.baseline_max_side, never resized), so it reads codec and
resampling traces rather than content. The reconstruction baseline (the idea of AEROBLADE, Ricker et
al., CVPR 2024) reads each file's distances to its round trip through each autoencoder of
score.reconstruction (`math/reconstruction.py`; LPIPS's VGG weights cannot be had offline), training
free but for the regression. Comparisons are paired: the same bootstrap resamples of the same test
images.
"""

from __future__ import annotations

import numpy as np

from leakpipe.pipeline.math import bootstrap, metrics, reconstruction as recon
from leakpipe.pipeline.math.probe import probe  # noqa: F401  (the baselines' classifier)
from leakpipe.pipeline.math.forensic import features


def forensic_matrix(paths: list, max_side: int, max_pixels: int) -> np.ndarray:
    """(N, F) forensic features of the files, each read at its native resolution."""
    from leakpipe.pipeline.engine.images import load_native

    return np.stack([features(load_native(p, max_side, max_pixels)) for p in paths])


# the learners the report compares, in its order, and the paired differences it computes
LEARNERS = {
    "head": "the model's head",
    "forensic": "the forensic pixel baseline",
    "z0_probe": "the linear probe on z0",
    "reconstruction": "the reconstruction baseline",
}
PAIRS = (("head", "forensic"), ("head", "z0_probe"), ("z0_probe", "forensic"), ("head", "reconstruction"))
RECONSTRUCTION_ABOUT = {
    "features": "per autoencoder: the power of the residual x - D(E(x)) relative to x's own in 5 octave bands of "
    "the spectrum per colour channel, the SSIM of x and D(E(x)) per channel, and the squared distance of E(x) and "
    "E(D(E(x))) relative to E(x)'s per latent channel (the encoder as the perceptual space, in place of LPIPS's VGG, "
    "whose weights cannot be had offline; benchmarks/reconstruction.py compares them)"
}
RECONSTRUCTION_BATCH = 16  # images of one shape per autoencoder call


def round_trips(paths: list, autoencoder, max_side: int, max_pixels: int, cached=None):
    """Per file, in order: (x, D(E(x)), E(x), E(D(E(x)))) as float arrays, x (3, H, W) in [0, 1] the
    native centre crop of at most `max_side` on the 8-px grid (engine.images.load_native), never resized;
    consecutive files of one shape go through the autoencoder together. `cached(i, x)`: E(x) of file i as
    stage one cached it, where that is this encoder's output for these very pixels (else None): the
    first of the three passes is then not run again."""
    import torch

    from leakpipe.pipeline.engine.images import load_native

    pending: list[np.ndarray] = []
    known: list[np.ndarray | None] = []

    def flush():
        x = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            z = (
                _encoded(autoencoder, x, known)
                if any(k is not None for k in known)
                else autoencoder.encode(x).latent_dist.mean
            )
            y = autoencoder.decode(z).clamp(-1, 1)
            z2 = autoencoder.encode(y).latent_dist.mean
        pending.clear()
        known.clear()
        return zip(*((t.float().numpy()) for t in ((x + 1) / 2, (y + 1) / 2, z, z2)))

    for i, path in enumerate(paths):
        arr = load_native(path, max_side, max_pixels)
        if pending and (arr.shape != pending[0].shape or len(pending) == RECONSTRUCTION_BATCH):
            yield from flush()
        pending.append(arr)
        known.append(cached(i, arr) if cached else None)
    if pending:
        yield from flush()


def _encoded(autoencoder, x, known: list):
    """E(x) of a batch: the rows `known` holds as given, the others encoded; in the channels_last layout of
    the encoder's own output (x is a view of images stored pixel by pixel), for the decoder takes a third
    longer on latents stored channel by channel (25 against 33 ms an image, TAEF2 at 64 px)."""
    import torch

    todo = [k for k, z in enumerate(known) if z is None]
    fresh = iter(
        autoencoder.encode(x[todo].contiguous(memory_format=torch.channels_last)).latent_dist.mean if todo else []
    )
    z = torch.stack([torch.from_numpy(z) if z is not None else next(fresh) for z in known])
    return z.contiguous(memory_format=torch.channels_last)


def reconstruction_features(x, y, z, z2) -> np.ndarray:
    """One image's distances to its round trip (math/reconstruction): the residual's power per octave
    band and channel, the SSIM per channel, and the latents' distance per channel."""
    return np.concatenate([recon.band_errors(x, y), recon.ssim(x, y), recon.latent_distance(z, z2)])


def reconstruction_matrix(paths: list, autoencoders: list, max_side: int, max_pixels: int, cached=None) -> np.ndarray:
    """(N, F) reconstruction features of the files through each autoencoder, side by side. `cached`: for
    each autoencoder, round_trips' `cached` or None."""
    return np.concatenate(
        [
            np.stack([reconstruction_features(*t) for t in round_trips(paths, ae, max_side, max_pixels, known)])
            for ae, known in zip(autoencoders, cached or [None] * len(autoencoders))
        ],
        axis=1,
    )


def scored(correct: np.ndarray, rs: bootstrap.Resamples | None) -> dict:
    """top-1 of a baseline's correct/incorrect rows, with its interval over the resamples `rs`."""
    out: dict = {"top1": float(correct.mean()) if len(correct) else float("nan")}
    if rs is not None:
        out["ci"] = {"top1": bootstrap.interval(rs.of(lambda w: metrics.top1(correct, w), len(correct)))}
    return out


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray, rs: bootstrap.Resamples) -> dict:
    """top-1 of a minus top-1 of b on the same resamples of the same images (bootstrap.paired)."""
    diff = rs.of(lambda w: metrics.top1(a_correct, w) - metrics.top1(b_correct, w), len(a_correct))
    return bootstrap.paired(a_correct.mean() - b_correct.mean(), diff)


def _below(d: dict | None) -> bool:
    """A paired difference whose whole 95% interval is below 0."""
    return bool(d) and d["ci"][1] < 0


def _top1(r: dict) -> str:
    lo, hi = r.get("ci", {}).get("top1", [None, None])
    return f"{r['top1']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def strongest(b: dict) -> str:
    """One sentence naming the learner with the highest top-1 on these test images, and where the model's
    head stands against it (paired)."""
    have = [k for k in LEARNERS if k in b and "top1" in b[k]]
    best = max(have, key=lambda k: (b[k]["top1"], k == "head"))  # a tie goes to the model
    line = (
        f"Strongest learner on these test images: {LEARNERS[best]} (top-1 {_top1(b[best])}; chance {b['chance']:.3f})"
    )
    if best == "head":
        return line + "."
    d = b.get(f"head_minus_{best}")
    if not d:
        return line + f"; the model's head reaches {_top1(b['head'])}."
    verdict = "significantly below it" if _below(d) else "not significantly below it"
    return line + (
        f"; the model's head ({_top1(b['head'])}) is {verdict} (paired difference {d['difference']:+.3f}, 95% "
        f"interval {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})."
    )


def notes(b: dict) -> list[str]:
    """Plain words for the strongest learner, a model significantly below the forensic or the
    reconstruction baseline, a z0 probe at chance, and traces the forensic baseline finds in the files
    that neither the model nor the z0 probe sees."""
    return [strongest(b), *_below_notes(b), *_probe_note(b), *_unseen_traces_note(b)]


def _below_notes(b: dict) -> list[str]:
    """A model significantly below the forensic baseline, the z0 probe or the reconstruction baseline."""
    out = []
    d = b.get("head_minus_forensic")
    if _below(d):
        out.append(
            f"The model's top-1 is significantly below the forensic pixel baseline's on the same test images "
            f"(difference {d['difference']:+.3f}, 95% interval {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}): "
            "a logistic regression on codec, noise-residual and spectral statistics of the original files "
            "attributes these images better."
        )
    p = b.get("head_minus_z0_probe")
    if _below(p):
        out.append(
            f"The model's top-1 is significantly below a linear probe on the cached z0 (difference "
            f"{p['difference']:+.3f}, 95% interval {p['ci'][0]:+.3f} to {p['ci'][1]:+.3f}): the generators' trace "
            "is in z0 itself, linear in its statistics, and the probe reads it there directly; the model reads it "
            "through z_t with diffusion noise and its DCT features, and learns it less well from these training "
            "images. Quote the probe's figure for these generators, and compare the Mahalanobis row."
        )
    r = b.get("head_minus_reconstruction")
    if _below(r):
        out.append(
            f"The model's top-1 is significantly below the reconstruction baseline's (difference "
            f"{r['difference']:+.3f}, 95% interval {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}): how closely "
            f"{', '.join(b['reconstruction_of']['autoencoders'])} reconstructs each image tells these generators "
            "apart better, a trace of the decoder (or of latent noise) that the encoder's mean z0 does not hold."
        )
    return out


def _probe_note(b: dict) -> list[str]:
    """A linear probe on z0 at chance: what stage one may have lost."""
    out = []
    chance, pixels = b["chance"], b.get("z0_is_pixels", False)
    z = b.get("z0_probe", {})
    lo, hi = z.get("ci", {}).get("top1", [np.nan, np.nan])
    if lo <= chance <= hi:
        out.append(
            f"A linear probe on the cached z0 is at chance (top-1 {z['top1']:.3f}, interval {lo:.3f} to "
            f"{hi:.3f}; chance {chance:.3f}): "
            + (
                "here z0 is the image itself (vae.source = pixels), whose traces are not linear in the pixel values."
                if pixels
                else "stage one may have lost the generator signal before the model saw "
                "it (try another encoder, or `vae.source` of the real SD2.1 VAE)."
            )
        )
    return out


def _unseen_traces_note(b: dict) -> list[str]:
    """Traces the forensic baseline finds in the files that neither the model nor the z0 probe sees."""
    out, chance, pixels = [], b["chance"], b.get("z0_is_pixels", False)
    z, d = b.get("z0_probe", {}), b.get("head_minus_forensic")
    f = b.get("forensic", {})
    f_lo = f.get("ci", {}).get("top1", [np.nan])[0]
    if f_lo > chance and _below(b.get("z0_probe_minus_forensic")) and _below(d):
        seen = (
            f"The forensic pixel baseline finds traces in the files (top-1 {f['top1']:.3f}, interval from "
            f"{f_lo:.3f}; chance {chance:.3f}) that neither the model ({b['head']['top1']:.3f}) nor the z0 probe "
            f"({z['top1']:.3f}) sees: "
        )
        out.append(
            seen
            + (
                "the model, on the pixels themselves, does not learn them from this training set (more "
                "images or epochs, or the recipe of `--profile pixels`: a high-pass residual, one timestep "
                "without noise, 64-px training crops, no resize)."
                if pixels
                else "the signal is there, but stage one's encoder does not keep it. Try `--profile pixels` "
                "(vae.source = pixels with the recipe measured on real codec chains: a high-pass residual, one "
                "timestep without noise, 64-px training crops, no resize), or another encoder."
            )
        )
    return out
