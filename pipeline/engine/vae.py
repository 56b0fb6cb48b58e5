"""Finding and loading the frozen VAE: a Hub id, a local diffusers folder, or one .safetensors file.

`resolve` needs no torch (it only finds files), so the encoder fingerprint and `leakpipe status`
stay fast; `load_vae` imports torch and diffusers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakpipe.pipeline.config import Config, VaeConfig, canonical_hash
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import HashCache

PACKAGED_CONFIGS = Path(__file__).parent.parent / "configs"
DEFAULT_SINGLE_FILE_CONFIG = PACKAGED_CONFIGS / "sd21-vae" / "config.json"
_VOLATILE_CONFIG_KEYS = ("_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values")


class VaeError(UserError):
    """The VAE cannot be found or loaded; the message says what to do."""


@dataclass
class VaeSource:
    kind: str  # folder | single_file | hub
    location: Path  # folder for from_pretrained, or the .safetensors file
    config_path: Path
    weights: list[Path]
    label: str  # what the user asked for, for messages and reports


def _folder_weights(folder: Path) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.ckpt"))
        hint = (
            (" (only pickle files found: convert them to .safetensors; leakpipe never loads pickle)") if pickled else ""
        )
        raise VaeError(f"VAE folder {folder} has no .safetensors weights{hint}")
    return weights


def _resolve_folder(p: Path, subfolder: str, label: str) -> VaeSource:
    for folder in (p, p / subfolder) if subfolder else (p,):
        if (folder / "config.json").is_file():
            return VaeSource("folder", folder, folder / "config.json", _folder_weights(folder), label)
    raise VaeError(
        f"{p} is a folder but neither it nor {p / subfolder} holds a diffusers "
        "config.json; expected a folder saved by AutoencoderKL.save_pretrained"
    )


def _resolve_single_file(p: Path, config: str, label: str) -> VaeSource:
    if p.suffix != ".safetensors":
        raise VaeError(
            f"{p}: only .safetensors weight files are loaded (leakpipe never loads "
            "pickle); convert .ckpt/.bin/.pt files first"
        )
    cfg = Path(config).expanduser() if config else DEFAULT_SINGLE_FILE_CONFIG
    if cfg.is_dir():
        cfg = cfg / "config.json"
    if not cfg.is_file():
        raise VaeError(
            f"VAE config {cfg} not found (vae.config): give a diffusers config.json or the folder holding it"
        )
    return VaeSource("single_file", p, cfg, [p], label)


def _resolve_hub(cfg: VaeConfig) -> VaeSource:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of diffusers
        raise VaeError("huggingface_hub is not installed") from None
    patterns = (
        [f"{cfg.subfolder}/config.json", f"{cfg.subfolder}/*.safetensors"]
        if cfg.subfolder
        else ["config.json", "*.safetensors"]
    )
    kwargs = dict(repo_id=cfg.source, allow_patterns=patterns, revision=cfg.revision or None)
    try:
        root = snapshot_download(local_files_only=True, **kwargs)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            root = None
        else:
            try:
                root = snapshot_download(**kwargs)
            except Exception:
                root = None
    folder = Path(root) / cfg.subfolder if root else None
    if folder is None or not (folder / "config.json").is_file():
        raise VaeError(
            f"VAE {cfg.source!r} (subfolder {cfg.subfolder!r}) is not in the local Hugging Face "
            "cache and could not be downloaded (offline, or no such repository). Either download it "
            f"where there is internet (`huggingface-cli download {cfg.source} --include "
            f"'{cfg.subfolder}/*'`) and copy the cache, or pass a local copy: "
            "--vae PATH/TO/FOLDER or --vae PATH/TO/vae.safetensors"
        )
    return VaeSource("hub", folder, folder / "config.json", _folder_weights(folder), cfg.source)


def local_path(source: str, base: Path | None = None) -> Path:
    """`source` as a local path: a relative one is relative to `base` (the workspace) if given."""
    p = Path(source).expanduser()
    return base / p if base is not None and not p.is_absolute() else p


PIXELS = "pixels"
# what stage one stores for vae.source = pixels: the preprocessed image itself as z0's mean, and a
# log-variance so low that latent.sample draws the image itself
PIXELS_CONFIG: dict[str, Any] = {
    "encoder": "identity",
    "latent_channels": 3,
    "block_out_channels": [3],
    "range": [-1.0, 1.0],
    "logvar": -30.0,
}  # block_out_channels: one block, no downsampling (the latent shape's factor 1)


def resolve(cfg: VaeConfig, base: Path | None = None) -> VaeSource:
    """Where `vae.source` is: "pixels" (no VAE: the authors' latent mode off), a .safetensors file, a
    diffusers folder (relative paths are relative to `base`, the workspace), or else a Hub id in the
    local Hugging Face cache."""
    if cfg.source == PIXELS:
        return VaeSource(PIXELS, Path(PIXELS), Path(PIXELS), [], "pixels (no VAE: the preprocessed image)")
    p = local_path(cfg.source, base)
    if p.is_file():
        return _resolve_single_file(p, cfg.config, cfg.source)
    if p.is_dir():
        return _resolve_folder(p, cfg.subfolder, cfg.source)
    if not is_hub_id(cfg.source):
        where = f" (looked for {p.resolve()})" if str(p.resolve()) != cfg.source else ""
        raise VaeError(
            f"missing local path: VAE source {cfg.source!r} does not exist{where}; give a diffusers "
            "folder, a .safetensors file or a Hub id such as stabilityai/stable-diffusion-2-1-base"
        )
    return _resolve_hub(cfg)


def is_hub_id(source: str) -> bool:
    """A Hub repository id is exactly `owner/name`; anything else (`vae`, `./vae`, `a/b/c`, `~/x`,
    `C:\\x`, `x.safetensors`) is a local path."""
    owner, _, name = source.partition("/")
    legal = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    return bool(name) and all(legal.fullmatch(x) for x in (owner, name)) and not source.endswith(".safetensors")


def recorded_source(source: str, base: Path | None = None) -> str:
    """`source` as it can be found from any folder: an existing local path made absolute (a relative
    one is relative to `base`), a Hub id or "pixels" as it is."""
    if source == PIXELS:
        return source
    p = local_path(source, base)
    return str(p.resolve()) if p.exists() else source


def model_config(src: VaeSource) -> dict:
    if src.kind == PIXELS:
        return dict(PIXELS_CONFIG)
    data = json.loads(src.config_path.read_text())
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def parameter_counts(src: VaeSource) -> tuple[int, int]:
    """(all parameters, those of the encoder and quant_conv that stage one runs), read from the
    safetensors headers without loading any weights."""
    from safetensors import safe_open

    total = encoder = 0
    for path in src.weights:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
                encoder += n if key.startswith(("encoder.", "quant_conv.")) else 0
    return total, encoder


def encoder_fingerprint(cfg: Config, src: VaeSource, hashes: HashCache, code) -> str:
    """Hash of (weights bytes, VAE config, preprocessing, dtypes, the encode stage's code identity):
    SPEC section 3. Other code means other bytes for the same image, so a new store; the code of the
    first version ("encode-1", see ledger/code.py) is left out of the hash, so that stores made by it
    keep their names."""
    return canonical_hash(
        {
            "weights": [hashes.hash(w) for w in src.weights],
            "vae_config": model_config(src),
            "preprocess": cfg.preprocess.__dict__,
            "compute_dtype": cfg.vae.dtype,
            "store_dtype": cfg.store.dtype,
            **({"code": code} if code != "encode-1" else {}),
        }
    )


def _from_single_file(cls, src: VaeSource, torch_dtype):
    """diffusers reads the config from a folder's config.json; give it one, never the Hub."""
    if src.config_path.name == "config.json":
        return cls.from_single_file(
            str(src.location), config=str(src.config_path.parent), local_files_only=True, torch_dtype=torch_dtype
        )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(src.config_path, Path(tmp) / "config.json")
        return cls.from_single_file(str(src.location), config=tmp, local_files_only=True, torch_dtype=torch_dtype)


def load_vae(src: VaeSource, dtype: str = "float32", device="cpu"):
    """The frozen AutoencoderKL in eval mode, offline, on `device`."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    torch_dtype = getattr(torch, dtype)
    if src.kind == PIXELS:
        from leakpipe.pipeline.nn.pixels import PixelEncoder

        return PixelEncoder(torch_dtype, PIXELS_CONFIG["logvar"]).eval().to(device)
    try:
        if src.kind == "single_file":
            vae = _from_single_file(AutoencoderKL, src, torch_dtype)
        else:
            vae = AutoencoderKL.from_pretrained(
                str(src.location), local_files_only=True, torch_dtype=torch_dtype, use_safetensors=True
            )
    except Exception as exc:
        raise VaeError(f"cannot load the VAE from {src.location} ({src.kind}): {exc}") from None
    vae.requires_grad_(False)
    return vae.eval().to(device)


def resolve_device(name: str):
    import torch

    from leakpipe.pipeline.engine.precision import check_device

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return check_device(torch.device(name))


def save_random_vae(
    folder: Path,
    block_out_channels=(32, 64, 64, 64),
    seed: int = 0,
    norm_num_groups: int | None = None,
    layers_per_block: int = 1,
) -> Path:
    """Write a diffusers AutoencoderKL with seeded random weights (tests, demo; no download).

    With 4 blocks the latent is 1/8 of the image and has 4 channels, like SD2.1's VAE.
    Passing SD2.1's widths (128, 256, 512, 512), groups 32 and 2 layers per block builds its
    exact architecture.
    """
    import torch
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    groups = norm_num_groups or min(8, block_out_channels[0])
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        sample_size=256,
    )
    vae.save_pretrained(str(folder), safe_serialization=True)
    (Path(folder) / RANDOM_MARKER).write_text(
        f"seeded random weights (seed {seed}) written by leakpipe; not a pretrained VAE\n"
    )
    return Path(folder)


RANDOM_MARKER = "LEAKPIPE_RANDOM_WEIGHTS.txt"


def is_random(cfg: VaeConfig, base: Path | None = None) -> bool:
    """True for a VAE written by save_random_vae (demo, tests): reports must say so."""
    p = local_path(cfg.source, base)
    return (p / RANDOM_MARKER).exists() or (p.is_file() and (p.parent / RANDOM_MARKER).exists())
