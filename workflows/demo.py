"""`leakpipe demo`: a small synthetic benchmark through every stage, end to end, on a CPU."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from leakpipe.pipeline.config import VaeConfig
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.autoencoders import load_autoencoder
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from leakpipe.workflows.pipeline import through_score

# The decoder family (bench/rendered.py): each generator's latent bias rendered through the shipped
# TAEF2, at 64 px (rendering costs 0.036 CPU-s per 64-px image, 0.136 at 128 px) and difficulty 0.5
# (leaks twice the default strength: benchmarks/RESULTS.md, "Generators rendered through a real decoder")
DEMO_SPEC = SynthSpec(n_closed=10, n_open=10, per_generator=40, size=64, difficulty=0.5, seed=0, family="decoder")
DEMO_DECODER = "builtin:taef2"  # what renders the demo's generators
DEMO_VAE_BLOCKS = (32, 64, 64, 64)  # SD2.1's layout at a quarter of its width: 1/8 latents, 4 ch
RANDOM_VAE_NOTE = (
    "NOTE: the demo uses a reduced-width AutoencoderKL with seeded random weights "
    "(no pretrained VAE can be shipped or downloaded here); pass --vae for the real one."
)
# The demo VAE's own scale (Eq. 1): 1 / std of its z0 means on the demo's training images
# (benchmarks/head.py), as SD2.1's 0.18215 is for SD's VAE. With 0.18215 its z0 would have std 0.05 and
# the noise at t = 10 would be half of it, where SD's VAE leaves 0.03.
DEMO_VAE_SCALE = 3.57
DEMO_TOML = """# written by `leakpipe demo`
[vae]
source = "{vae}"
{latent}[preprocess]
size = {size}
[encode]
batch_size = 16
num_workers = 1
[model]
embed_dim = 64
prototypes_per_class = 2
[train]
epochs = {epochs}
batch_size = 32
"""


def setup(ws: Workspace, vae_source: str | None, spec: SynthSpec = DEMO_SPEC, epochs: int = 15, log=print) -> None:
    """Synthetic data, manifests, the demo VAE and leakpipe.toml (each only if missing)."""
    if not ws.manifest("closed").exists():
        start = time.perf_counter()
        ae = rendering_autoencoder(spec, DEMO_DECODER, ws.root)
        written = write_benchmark(ws.root / "data" / "synth", ws.manifests, spec, autoencoder=ae)
        log(f"synth: {sum(written.values())} images in {time.perf_counter() - start:.1f} s")
    random_vae = vae_source is None
    if random_vae:
        vae_source = str(ws.root / "models" / "demo-vae")
        if not Path(vae_source, "config.json").exists():
            vae_lib.save_random_vae(Path(vae_source), DEMO_VAE_BLOCKS, seed=0)
    toml = ws.root / "leakpipe.toml"
    if not toml.exists():
        latent = f"[latent]\nscale = {DEMO_VAE_SCALE}\n" if random_vae else ""
        toml.write_text(DEMO_TOML.format(vae=vae_source, size=spec.size, epochs=epochs, latent=latent))


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


def spec_with(**changes) -> SynthSpec:
    """The demo's spec with some fields changed (None keeps the default)."""
    return dataclasses.replace(DEMO_SPEC, **{k: v for k, v in changes.items() if v is not None})


def run(
    ws: Workspace, cfg_loader, vae_source: str | None = None, spec: SynthSpec = DEMO_SPEC, epochs: int = 15, log=print
) -> list[str]:
    """Every stage (each does nothing if up to date); returns the summary lines."""
    setup(ws, vae_source, spec, epochs, log=log)
    cfg = cfg_loader()
    lines = [RANDOM_VAE_NOTE] if vae_lib.is_random(cfg.vae, ws.root) else []
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
