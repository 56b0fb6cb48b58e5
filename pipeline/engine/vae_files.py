"""Weight files of the VAE read without torch: a safetensors header's tensor shapes, the TAESD layout they
show, the autoencoders shipped with leakpipe (`builtin:NAME`) and the SHA-256 that vouches for them, and
the one-time conversion of a madebyollin `.pth` state dict to safetensors."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"


class WeightFileError(ValueError):
    """A weight file that is not what it must be; the message names the file and what to do."""


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a .safetensors file's JSON header (8-byte length, then the JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise WeightFileError(f"{path}: not a readable .safetensors file ({exc})") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class TaesdLayout:
    part: str  # encoder | decoder
    latent_channels: int
    pool: bool  # TAEF2's mid-block pool


def taesd_layout(shapes: dict[str, list[int]]) -> TaesdLayout | None:
    """The TAESD layout (madebyollin/taesd's parameter names) that a state dict's shapes show, or None.
    Encoder: 0 = conv(3, 64) ... 14 = conv(64, C); decoder: 1 = conv(C, 64) ... 19 = conv(64, 3); the
    mid-block pool sits in encoder blocks 11-13 and decoder blocks 3-5."""
    enc, dec = shapes.get("0.weight"), shapes.get("1.weight")
    if enc == [64, 3, 3, 3] and len(shapes.get("14.weight", [])) == 4 and "1.conv.0.weight" in shapes:
        return TaesdLayout("encoder", shapes["14.weight"][0], "11.pool.0.weight" in shapes)
    if dec and len(dec) == 4 and dec[0] == 64 and shapes.get("19.weight") == [3, 64, 3, 3]:
        return TaesdLayout("decoder", dec[1], "3.pool.0.weight" in shapes)
    return None


def taesd_config(layout: TaesdLayout) -> dict:
    """The config leakpipe records for a TAESD-format encoder (in the fingerprint and the store): its
    layout and the family's conventions (images in [0, 1], latents in the diffusion space: scale 1)."""
    return {
        "_class_name": "TAESD",
        "latent_channels": layout.latent_channels,
        "mid_block_pool": layout.pool,
        "block_out_channels": [64, 64, 64, 64],  # three stride-2 stages: latents at 1/8 of the side
        "input_range": [0.0, 1.0],
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Builtin:
    """An autoencoder shipped in leakpipe/pipeline/assets/NAME/, with the SHA-256 of each file."""

    name: str
    what: str
    sha256: dict  # file name -> SHA-256 of the shipped (converted) file

    @property
    def folder(self) -> Path:
        return ASSETS / self.name


# The SHA-256 of the shipped files pins them in the code: a file that differs (a damaged install, an
# edit) is refused when it is loaded. SHA256SUMS beside them also lists the originals (.pth).
BUILTINS = {
    "taef2": Builtin(
        "taef2",
        "TAEF2, the FLUX.2 tiny autoencoder by Ollin Boer Bohan (madebyollin/taesd, MIT licence)",
        {
            "taef2_encoder.safetensors": "18d5c09da0e3ae5d71943a58fc3e308fb8088b67e471650d7d805cffe45dfe24",
            "taef2_decoder.safetensors": "69826bf716fdec4ef76ac1c33a6ac1d9115b77162d7e2978887b0fa959e08d0f",
        },
    ),
}


def builtin(source: str) -> Builtin:
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTINS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
        raise WeightFileError(f"vae.source {source!r}: no such autoencoder ships with leakpipe (there is {known})")
    return BUILTINS[name]


def check_builtin(item: Builtin, files: list[Path]) -> None:
    """Refuse shipped weights whose SHA-256 is not the one recorded in the code."""
    for path in files:
        want = item.sha256.get(path.name)
        if not path.is_file():
            raise WeightFileError(
                f"{BUILTIN_PREFIX}{item.name}: {path} is missing; reinstall leakpipe "
                "(pip install --force-reinstall leakpipe) or restore it from git (git checkout -- pipeline/assets)"
            )
        got = sha256(path)
        if got != want:
            raise WeightFileError(
                f"{BUILTIN_PREFIX}{item.name}: {path} has SHA-256 {got}, not the {want} this leakpipe ships: "
                "the file was damaged or replaced. Reinstall leakpipe (pip install --force-reinstall leakpipe) "
                "or restore it from git (git checkout -- pipeline/assets); to use other weights, give their "
                "path as --vae instead"
            )


def convert_pth(src: Path, dst: Path) -> dict:
    """A madebyollin `.pth` state dict as .safetensors: read with torch.load(weights_only=True), which
    unpickles tensors and plain containers only, never code; the tensors are written unchanged (same
    dtype), with the original's name and SHA-256 in the metadata. Returns that metadata."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightFileError(f"{src}: not a state dict that loads with weights_only=True ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{src}: expected a flat state dict {{name: tensor}}")
    # one metadata entry: safetensors writes a map of several in no fixed order, and the converted bytes
    # must be the same on every run (their SHA-256 is recorded)
    meta = {"converted_from": f"{src.name} sha256 {sha256(src)}"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=meta)
    return meta
