"""Loading each autoencoder family stage one encodes with, and its decoder (to render images through a
real decoder, or to measure a round trip), in one convention (pipeline/nn/latents.py): `encode(x)` of an
image in [-1, 1] gives `.latent_dist.mean` / `.logvar` with the family's shift (FLUX.2: its
normalisation) applied, so z0 = mean * latent.scale with the family's scaling factor; `decode(z)` of
such latents gives an image in [-1, 1].

SD's AutoencoderKL (no shift) and the pixels encoder are loaded by `vae.load_vae`, the code that made
every existing store; each other family's code is part of its own stores' code identity (FAMILY_CODE).
"""

from __future__ import annotations

from pathlib import Path

from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine import vae_files
from leakpipe.pipeline.engine.vae import PIXELS, VaeError, VaeSource

# The code each family adds to stage one's own (stages/encode.py CODE, which loads SD's AutoencoderKL and
# the pixels encoder): part of that family's code identity only, so existing stores of SD's VAE keep their
# fingerprints. Roots of code identity (ledger/reach.py): "module:*" is every unit of this module (its loaders
# and how it picks one) and of the wrappers; a bare module name would reach nothing.
_CODE = ("leakpipe.pipeline.engine.autoencoders:*", "leakpipe.pipeline.nn.latents:*")
FAMILY_CODE = {"kl-shift": _CODE, "kl-flux2": _CODE, "tiny": _CODE, "taesd": (*_CODE, "leakpipe.pipeline.nn.taesd:*")}


def family_code(src: VaeSource) -> tuple[str, ...]:
    """The code entries stage one runs for `src` beyond its own CODE (none for SD's AutoencoderKL)."""
    return FAMILY_CODE.get(_key(src), ())


def _key(src: VaeSource) -> str:
    shifted = src.family == "kl" and vae_lib.shift_factor(vae_lib.model_config(src)) != 0.0
    return "kl-shift" if shifted else src.family


def load_encoder(src: VaeSource, dtype: str = "float32", device="cpu"):
    """Stage one's frozen encoder of `src`, in eval mode, on `device`."""
    if not family_code(src):
        return vae_lib.load_vae(src, dtype, device)
    return _frozen(_LOADERS[_key(src)](src, dtype, False), device)


def load_autoencoder(src: VaeSource, dtype: str = "float32", device="cpu"):
    """The frozen encoder and decoder of `src` (a TAESD-format source needs its decoder file beside the
    encoder, or shipped with it): `decode(z)` takes latents as stage one stores them."""
    if src.kind == PIXELS:
        raise VaeError("vae.source = pixels has no decoder")
    if src.family == "taesd" and src.decoder is None:
        raise VaeError(
            f"{src.location}: no TAESD decoder beside this encoder (expected "
            f"{src.location.name.replace('encoder', 'decoder')} in {src.location.parent})"
        )
    return _frozen(_LOADERS[_key(src)](src, dtype, True), device)


def _frozen(model, device):
    model.requires_grad_(False)
    return model.eval().to(device)


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype)


def _diffusers(cls, src: VaeSource, dtype: str):
    """A diffusers model of class `cls` from a folder, the Hub cache or a single file, offline."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    try:
        if src.kind == "single_file":
            return vae_lib._from_single_file(cls, src, _torch_dtype(dtype))
        return cls.from_pretrained(
            str(src.location), local_files_only=True, torch_dtype=_torch_dtype(dtype), use_safetensors=True
        )
    except Exception as exc:
        raise VaeError(f"cannot load the {cls.__name__} from {src.location} ({src.kind}): {exc}") from None


def _kl(src: VaeSource, dtype: str, with_decoder: bool):
    """AutoencoderKL with its shift_factor removed (SD3, FLUX.1; 0 for SD)."""
    from diffusers import AutoencoderKL

    from leakpipe.pipeline.nn.latents import Shifted

    return Shifted(_diffusers(AutoencoderKL, src, dtype), vae_lib.shift_factor(vae_lib.model_config(src)))


def _kl_flux2(src: VaeSource, dtype: str, with_decoder: bool):
    """AutoencoderKLFlux2 with the FLUX.2 pipeline's batch-norm normalisation of its latents."""
    from diffusers import AutoencoderKLFlux2

    from leakpipe.pipeline.nn.latents import Flux2Normalised

    return Flux2Normalised(_diffusers(AutoencoderKLFlux2, src, dtype))


def _tiny(src: VaeSource, dtype: str, with_decoder: bool):
    """diffusers' AutoencoderTiny (it maps [-1, 1] to TAESD's [0, 1] itself), its shift_factor removed."""
    from diffusers import AutoencoderTiny

    from leakpipe.pipeline.nn.latents import TinyAdapter

    return TinyAdapter(_diffusers(AutoencoderTiny, src, dtype), vae_lib.shift_factor(vae_lib.model_config(src)))


def _taesd(src: VaeSource, dtype: str, with_decoder: bool):
    """A TAESD-format encoder (and decoder) file, loaded strictly into pipeline/nn/taesd.py; shipped
    weights only if their SHA-256 is the one recorded in the code."""
    from leakpipe.pipeline.nn.taesd import TinyAutoencoder

    files = src.weights + ([src.decoder] if with_decoder else [])
    if src.kind == "builtin":
        try:
            vae_files.check_builtin(vae_files.builtin(src.label), files)
        except vae_files.WeightFileError as exc:
            raise VaeError(str(exc)) from None
    cfg = vae_lib.model_config(src)
    model = TinyAutoencoder(cfg["latent_channels"], cfg["mid_block_pool"], True, with_decoder)
    _load_strict(model.encoder, src.weights[0], cfg)
    if with_decoder:
        _load_strict(model.decoder, src.decoder, cfg)
    return model.to(_torch_dtype(dtype))


def _load_strict(module, path: Path, cfg: dict) -> None:
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        pool = " with TAEF2's mid-block pool" if cfg["mid_block_pool"] else ""
        raise VaeError(
            f"{path}: not the TAESD layout with {cfg['latent_channels']} latent channels{pool} ({exc})"
        ) from None


_LOADERS = {"kl-shift": _kl, "kl": _kl, "kl-flux2": _kl_flux2, "tiny": _tiny, "taesd": _taesd}
