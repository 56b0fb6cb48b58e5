"""`leakpipe demo`: a small synthetic benchmark through every stage, end to end, on a CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from leakpipe.pipeline.config import LatentConfig, VaeConfig
from leakpipe.pipeline.config_files import load_config
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.autoencoders import load_autoencoder
from leakpipe.pipeline.engine.vae_conventions import conventions
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark, write_variants
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from leakpipe.workflows.pipeline import through_score

# The decoder family (bench/rendered.py): each generator's low-frequency latent bias rendered through the
# shipped TAEF2, at 64 px (rendering costs 0.036 CPU-s per 64-px image, 0.136 at 128 px) and difficulty 0.5
# (leaks twice the default strength: benchmarks/RESULTS.md, "Generators rendered through a real decoder").
# 5 unseen generators, not WILD's 10: TAEF2's arithmetic bounds the demo (render, encode, the reconstruction
# baseline); 200 unseen images leave the open-set AUROC's interval about as wide as 400 did (0.13 against 0.12:
# benchmarks/RESULTS.md, issue 36, "The demo within a minute")
DEMO_SPEC = SynthSpec(n_closed=10, n_open=5, per_generator=40, size=64, difficulty=0.5, seed=0, family="decoder")
DEMO_DECODER = "builtin:taef2"  # what renders the demo's generators
# `--vae random` keeps the pixel family of the demo before TAEF2 (128 px): a random-weight VAE keeps little of
# a default-strength fingerprint (a probe on its latents: 0.155), so it draws the fingerprints 10x stronger
RANDOM_SPEC = SynthSpec(n_closed=10, n_open=10, per_generator=40, size=128, difficulty=0.1, seed=0)
DEMO_VAE = "builtin:taef2"  # the pretrained FLUX.2 tiny autoencoder shipped with leakpipe: a trained latent space
RANDOM = "random"  # `leakpipe demo --vae random`: the seeded random AutoencoderKL below
DEMO_VAE_BLOCKS = (32, 64, 64, 64)  # SD2.1's layout at a quarter of its width: 1/8 latents, 4 ch
RANDOM_VAE_NOTE = (
    "NOTE: the demo uses a reduced-width AutoencoderKL with seeded random weights (--vae random); "
    "leave --vae out for the pretrained TAEF2 shipped with leakpipe, or pass --vae for another VAE."
)
TAEF2_NOTE = (
    "stage one: TAEF2, the pretrained FLUX.2 tiny autoencoder by Ollin Boer Bohan shipped with leakpipe "
    "(builtin:taef2, MIT licence): a trained latent space, 32 channels at 1/8 of the side"
)
# Each demo VAE's scale (Eq. 1), from the std of its z0 means on the demo's training images
# (benchmarks/head.py), as SD2.1's 0.18215 is for SD's VAE. The random VAE's z0 has std 0.28: with 0.18215
# it would have std 0.05 and the noise at t = 10 would be half of it, where SD's VAE leaves 0.03; so 3.57.
# TAEF2's z0 has std 0.78 (per channel 0.47-1.69; 200 images, DEMO_SPEC at 128 px), near unit variance
# already, so the demo keeps its family's own scale 1 (1/std would be 1.28): the noise at t = 10 is then a
# thirtieth of z0, and the demo's z0 is what `encode --vae builtin:taef2` gives any workspace.
DEMO_VAE_SCALE = 3.57
DEMO_TAEF2_SCALE = 1.0
# Measured on the demo's earlier data (pixel family, 128 px) before it moved to the decoder family at 64 px:
# TAEF2 costs 7.7 GFLOP per 128-px image against the random VAE's 1.5: on the demo's 1,160 images, encoding
# took 699 s against 309 s and the whole demo 874 s of CPU against 732 s at 15 epochs (one run each, 2 shared
# cores, benchmarks/RESULTS.md). An epoch took 162 s of the 3,263 s, so 10 epochs keep the demo within the
# random VAE's time; on TAEF2's latents validation macro AUC was 1.000 from the first epoch.
DEMO_EPOCHS = 10
# The temperature and the 90% sets are calibrated on the val images and K = 2 post-processed variants of each
# (score.variants; training stays on raw images, train.variants = ""): on the demo's data and config, 3 seeds,
# the sets then hold the true generator of 0.903, 0.842 and 0.850 of the step 1-3 copies (raw calibration:
# 0.794, 0.678, 0.667) at 1.7-2.2 generators a set, with the same top-1; variants in training cost raw top-1
# -0.075 [-0.119, -0.031] (benchmarks/RESULTS.md, issue 35). Only val's variants are read: 160 rows to encode.
DEMO_CALIBRATION_VARIANTS = 2
# An image whose h_t backbone dropout drops skips the backbone (train.backbone_dropout_mode = skip): half the
# training FLOPs; on the demo's data, 3 seeds, head top-1 +0.014 [-0.011, +0.042] and open AUROC +0.023
# [+0.000, +0.047] against the default mask (benchmarks/RESULTS.md, "The demo within a minute").
# the demo validates after its last epoch alone (log.validate_every = 0): the same weights, bitwise, without
# the precise-BatchNorm and validation passes after every epoch, over a quarter of its training time (py-spy);
# and checkpoints once a minute (log.checkpoint_seconds), not after each 3-s epoch: a checkpoint is 4x the
# model (ResNet-18, its Adam state, best weights, average), and writing one per epoch took 8.4 s of 32 (py-spy)
DEMO_TOML = """# written by `leakpipe demo`
[vae]
source = "{vae}"
{latent}[preprocess]
size = {size}
[encode]
batch_size = 16
num_workers = 0
[model]
embed_dim = 64
prototypes_per_class = 2
[train]
epochs = {epochs}
batch_size = 32
backbone_dropout_mode = "skip"
variants = ""
[score]
variants = "closed-var"
[log]
validate_every = 0
checkpoint_seconds = 60
"""


def setup(
    ws: Workspace, vae_source: str | None, spec: SynthSpec = DEMO_SPEC, epochs: int = DEMO_EPOCHS, log=print
) -> None:
    """Synthetic data, manifests, the demo VAE (TAEF2 unless `vae_source` names another, or "random") and
    leakpipe.toml (each only if missing)."""
    if not ws.manifest("closed").exists():
        start = time.perf_counter()
        ae = rendering_autoencoder(spec, DEMO_DECODER, ws.root)
        written = write_benchmark(ws.root / "data" / "synth", ws.manifests, spec, autoencoder=ae)
        written["closed-var"] = write_calibration_variants(ws, spec)
        atomic_write_text(_spec_file(ws), json.dumps(dataclasses.asdict(spec)))
        log(f"synth: {sum(written.values())} images in {time.perf_counter() - start:.1f} s")
    explicit, vae_source = vae_source is not None, vae_source or DEMO_VAE
    toml = ws.root / "leakpipe.toml"
    if toml.exists():
        kept = load_config(toml, []).vae
        same = kept.source == vae_source or (vae_source == RANDOM and vae_lib.is_random(kept, ws.root))
        if explicit and not same:
            log(f"note: {toml} exists, so its VAE is kept; --vae {vae_source} applies to a new workspace (-C)")
        return
    if vae_source == RANDOM:
        vae_source = str(ws.root / "models" / "demo-vae")
        if not Path(vae_source, "config.json").exists():
            vae_lib.save_random_vae(Path(vae_source), DEMO_VAE_BLOCKS, seed=0)
    scale = demo_scale(vae_source, ws.root)
    latent = f"[latent]\nscale = {scale}\n" if scale != LatentConfig().scale else ""
    atomic_write_text(toml, DEMO_TOML.format(vae=vae_source, size=spec.size, epochs=epochs, latent=latent))


def write_calibration_variants(ws: Workspace, spec: SynthSpec) -> int:
    """DEMO_CALIBRATION_VARIANTS post-processed variants of each val image of the closed split (manifest
    closed-var, drawn as `postprocess --variants K --partition val` draws them); 0 without steps."""
    if not spec.steps:
        return 0
    k, workers = DEMO_CALIBRATION_VARIANTS, os.cpu_count() or 1
    return write_variants(ws.root / "data" / "synth", ws.manifests, k, spec.steps, spec.seed, workers, ("val",))


def _spec_file(ws: Workspace) -> Path:
    return ws.root / "data" / "synth" / "demo-spec.json"


def written_spec(ws: Workspace, spec: SynthSpec) -> SynthSpec:
    """The spec the workspace's data was written with (`spec` for data written before it was recorded)."""
    if not _spec_file(ws).exists():
        return spec
    fields = json.loads(_spec_file(ws).read_text())
    return SynthSpec(**{**fields, "steps": tuple(fields["steps"])})


def demo_scale(vae_source: str, base: Path) -> float:
    """latent.scale for the demo's encoder: the measured one of the demo VAEs, else the family's own."""
    if vae_source == DEMO_VAE:
        return DEMO_TAEF2_SCALE
    if vae_lib.is_random(VaeConfig(source=vae_source), base):
        return DEMO_VAE_SCALE
    return conventions(vae_lib.resolve(VaeConfig(source=vae_source), base)).scale


def rendering_autoencoder(spec: SynthSpec, source: str, base: Path):
    """The autoencoder that renders `spec`'s decoder family (None for the pixel family): `source` as a
    vae.source (relative paths relative to `base`), loaded with its decoder."""
    if spec.family != "decoder":
        return None
    if spec.size % 8:
        raise UserError(
            f"the decoder family needs a size that is a multiple of 8 (its latents are 1/8 of it), got {spec.size}"
        )
    return load_autoencoder(vae_lib.resolve(VaeConfig(source=source), base))


def spec_with(vae_source: str | None = None, **changes) -> SynthSpec:
    """The demo's spec for `vae_source` (--vae random: RANDOM_SPEC) with some fields changed (None keeps
    the default)."""
    base = RANDOM_SPEC if vae_source == RANDOM else DEMO_SPEC
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def run(
    ws: Workspace,
    cfg_loader,
    vae_source: str | None = None,
    spec: SynthSpec = DEMO_SPEC,
    epochs: int = DEMO_EPOCHS,
    log=print,
) -> list[str]:
    """Every stage (each does nothing if up to date); returns the summary lines."""
    setup(ws, vae_source, spec, epochs, log=log)
    cfg, spec = cfg_loader(), written_spec(ws, spec)
    lines = [RANDOM_VAE_NOTE] if vae_lib.is_random(cfg.vae, ws.root) else []
    lines += [TAEF2_NOTE + f", latent.scale {cfg.latent.scale:g}"] if cfg.vae.source == DEMO_VAE else []
    family = (
        f"each one's low-frequency latent bias rendered through {DEMO_DECODER}'s decoder"
        if spec.family == "decoder"
        else "each one's pixel-space fingerprint"
    )
    lines.append(
        f"demo data: {spec.n_closed} known + {spec.n_open} unseen generators x {spec.per_generator} "
        f"images of {spec.size} px, {family}, at difficulty {spec.difficulty} ({1 / spec.difficulty:g}x "
        f"the strength of `leakpipe synth --family {spec.family}`'s default 1.0); compare its numbers only with "
        "baselines at the same difficulty, such as the ones in its own report"
    )
    return lines + through_score(graph(ws, cfg), "default", log)
