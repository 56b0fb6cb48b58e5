"""What an autoencoder's latents are, read from its config without torch: its family, which generators'
latent space it encodes to, its latent channels and downscale, the input range, and how the family scales
and shifts its latents, against leakpipe's `latent.scale` (z0 = stored mean * latent.scale, Eq. 1).

Stage one stores each family's latents with its shift already removed (FLUX.2: its batch-norm
normalisation applied), so `latent.scale` is the family's scaling factor: 0.18215 for SD 1/2 (the
default), 0.13025 SDXL, 1.5305 SD3, 0.3611 FLUX.1, 1 for FLUX.2 and for every TAESD.
"""

from __future__ import annotations

from dataclasses import dataclass

from leakpipe.pipeline.engine import vae as vae_lib

# (latent channels, scaling_factor, shift_factor) of the released AutoencoderKL configs
_KL_GENERATORS = {
    (4, 0.18215, 0.0): "SD 1.x/2.x",
    (4, 0.13025, 0.0): "SDXL",
    (16, 1.5305, 0.0609): "SD3",
    (16, 0.3611, 0.1159): "FLUX.1",
}
# TAESD weights by latent channels (and TAEF2's mid-block pool); a file's name tells taesd from taesdxl
_TAESD_GENERATORS = {
    (4, False): "SD 1.x/2.x or SDXL (taesd, taesdxl)",
    (16, False): "SD3 or FLUX.1 (taesd3, taef1)",
    (32, True): "FLUX.2 (taef2)",
}


@dataclass(frozen=True)
class Conventions:
    family: str  # a key of vae.FAMILIES
    generators: str  # whose latent space, as far as the config tells
    latent_channels: int
    downscale: int  # the latent's side is the image's / downscale
    input_range: str
    scale: float  # the family's scaling factor: the latent.scale of its convention
    scaling: str  # how the family scales and shifts, in words


def conventions(src: vae_lib.VaeSource) -> Conventions:
    """The conventions of `src`'s latents, as stage one stores them and stage two reads them."""
    cfg = vae_lib.model_config(src)
    channels = int(cfg.get("latent_channels", 4))
    downscale = 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if src.family == "pixels":
        return Conventions("pixels", "none (the preprocessed image)", 3, 1, "[-1, 1]", 1.0, "none: z0 is the image")
    if src.family == "kl-flux2":
        text = (
            "FLUX.2's batch-norm normalisation (running statistics per channel of its 2 x 2 patches), applied by "
            "stage one: scale 1"
        )
        return Conventions(src.family, "FLUX.2", channels, downscale, "[-1, 1]", 1.0, text)
    scale = float(cfg.get("scaling_factor", 0.18215 if src.family == "kl" else 1.0))
    shift = vae_lib.shift_factor(cfg)
    if src.family == "kl":
        generators = _KL_GENERATORS.get((channels, scale, shift), "unknown (no released layout has this config)")
        input_range = "[-1, 1]"
    else:
        generators = _TAESD_GENERATORS.get((channels, bool(cfg.get("mid_block_pool"))), "unknown")
        input_range = "[0, 1] (leakpipe maps its [-1, 1] to it)"
    text = f"scaling_factor {scale:g}" + (
        f", shift_factor {shift:g} (stage one stores E(x) - {shift:g})" if shift else ", no shift"
    )
    return Conventions(src.family, generators, channels, downscale, input_range, scale, text)


def scale_note(latent_scale: float, conv: Conventions) -> str | None:
    """What to set when `latent.scale` is not the family's scaling factor (None when it is)."""
    if conv.family == "pixels" or abs(latent_scale - conv.scale) <= 1e-9 * conv.scale:
        return None
    return (
        f"latent.scale = {latent_scale:g} is not this VAE's own scaling factor {conv.scale:g}: set latent.scale = "
        f"{conv.scale:g} in the workspace's config for its convention (or 1/std of its z0, which train's log gives)"
    )
