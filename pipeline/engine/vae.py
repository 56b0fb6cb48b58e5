"""Finding and loading the frozen VAE: a Hub id, a local diffusers folder, one .safetensors file, a
TAESD-format encoder file, or an autoencoder shipped with leakpipe (`builtin:taef2`).

`resolve` needs no torch (it only finds files and reads headers), so the encoder fingerprint and
`leakpipe status` stay fast; `load_vae` imports torch and diffusers. Each source belongs to a family
(`FAMILIES`); the families other than SD's AutoencoderKL are loaded by `engine/autoencoders.py`.
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
from leakpipe.pipeline.engine import vae_files
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.store.atomic import atomic_write_text, place

PACKAGED_CONFIGS = Path(__file__).parent.parent / "configs"
DEFAULT_SINGLE_FILE_CONFIG = PACKAGED_CONFIGS / "sd21-vae" / "config.json"
_VOLATILE_CONFIG_KEYS = ("_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values")


class VaeError(UserError):
    """The VAE cannot be found or loaded; the message says what to do."""


@dataclass
class VaeSource:
    kind: str  # folder | single_file | hub | builtin | pixels
    location: Path  # folder for from_pretrained, or the .safetensors file
    config_path: Path
    weights: list[Path]  # the files stage one's output depends on (a TAESD source: its encoder only)
    label: str  # what the user asked for, for messages and reports
    family: str = "kl"  # a key of FAMILIES
    decoder: Path | None = None  # a TAESD-format source's decoder file, when there is one
    derived_config: dict | None = None  # the config of a source that has no config.json (TAESD format)


# The autoencoder families stage one encodes with: diffusers' class name (None: a TAESD-format file) and
# what the family is, for `leakpipe vae info`
FAMILIES = {
    "kl": ("AutoencoderKL", "AutoencoderKL (SD 1/2, SDXL, SD3, FLUX.1 layouts)"),
    "kl-flux2": ("AutoencoderKLFlux2", "AutoencoderKLFlux2 (FLUX.2)"),
    "tiny": ("AutoencoderTiny", "AutoencoderTiny (TAESD family in diffusers' format)"),
    "taesd": (None, "TAESD format (madebyollin/taesd: taesd, taesdxl, taesd3, taef1, taef2)"),
    "pixels": (None, "no encoder (vae.source = pixels)"),
}
_FAMILY_OF_CLASS = {cls: family for family, (cls, _) in FAMILIES.items() if cls}


def family_of(config: dict, where: Path) -> str:
    """The family of a diffusers config (no _class_name: AutoencoderKL, as leakpipe has always read it)."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in _FAMILY_OF_CLASS:
        raise VaeError(
            f"{where}: a {cls}, which stage one cannot encode with; give an AutoencoderKL, AutoencoderKLFlux2 "
            "or AutoencoderTiny (a diffusers folder or .safetensors) or a TAESD-format encoder .safetensors"
        )
    return _FAMILY_OF_CLASS[cls]


def _diffusers_source(kind: str, location: Path, config_path: Path, weights: list[Path], label: str) -> VaeSource:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise VaeError(f"VAE config {config_path} cannot be read as JSON ({exc})") from None
    return VaeSource(kind, location, config_path, weights, label, family_of(config, config_path))


def _taesd_source(kind: str, encoder: Path, label: str) -> VaeSource | None:
    """A TAESD-format encoder file as a source (its decoder beside it: the name with decoder for encoder);
    None if the file is not in that format."""
    layout = vae_files.taesd_layout(_shapes(encoder))
    if layout is None:
        return None
    if layout.part == "decoder":
        raise VaeError(
            f"{encoder} is a TAESD-format decoder; stage one needs the encoder: give the *_encoder file beside it"
        )
    decoder = encoder.with_name(encoder.name.replace("encoder", "decoder"))
    decoder = decoder if decoder != encoder and decoder.is_file() else None
    return VaeSource(kind, encoder, encoder, [encoder], label, "taesd", decoder, vae_files.taesd_config(layout))


def _shapes(path: Path) -> dict:
    try:
        return vae_files.safetensors_shapes(path)
    except vae_files.WeightFileError as exc:
        raise VaeError(str(exc)) from None


def _folder_weights(folder: Path) -> list[Path]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.ckpt"))
        hint = (
            (" (only pickle files found: convert them to .safetensors; leakpipe never loads pickle)") if pickled else ""
        )
        raise VaeError(f"VAE folder {folder} has no .safetensors weights{hint}")
    return weights


def _resolve_folder(p: Path, subfolder: str, label: str, kind: str = "folder") -> VaeSource:
    for folder in (p, p / subfolder) if subfolder else (p,):
        if (folder / "config.json").is_file():
            return _diffusers_source(kind, folder, folder / "config.json", _folder_weights(folder), label)
    encoders = sorted(p.glob("*encoder*.safetensors"))
    found = [s for s in (_taesd_source(kind, e, label) for e in encoders) if s is not None]
    if len(found) == 1:
        return found[0]
    raise VaeError(
        f"{p} is a folder but neither it nor {p / subfolder} holds a diffusers config.json, nor one "
        "TAESD-format *encoder*.safetensors; expected a folder saved by AutoencoderKL.save_pretrained, or give "
        "the encoder file itself"
    )


def _resolve_single_file(p: Path, config: str, label: str) -> VaeSource:
    if p.suffix == ".pth":
        raise VaeError(
            f"{p}: a PyTorch pickle; leakpipe loads .safetensors only. Convert it once with `leakpipe vae convert "
            f"{p}` (it reads tensors only, torch.load(weights_only=True)) and pass the .safetensors it writes"
        )
    if p.suffix != ".safetensors":
        raise VaeError(
            f"{p}: only .safetensors weight files are loaded (leakpipe never loads "
            "pickle); convert .ckpt/.bin/.pt files first"
        )
    cfg = Path(config).expanduser() if config else DEFAULT_SINGLE_FILE_CONFIG
    if cfg.is_dir():
        cfg = cfg / "config.json"
    taesd = _taesd_source("single_file", p, label)
    if taesd is not None:
        return taesd
    if not cfg.is_file():
        raise VaeError(
            f"VAE config {cfg} not found (vae.config): give a diffusers config.json or the folder holding it"
        )
    return _diffusers_source("single_file", p, cfg, [p], label)


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
    return _diffusers_source("hub", folder, folder / "config.json", _folder_weights(folder), cfg.source)


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
        return VaeSource(PIXELS, Path(PIXELS), Path(PIXELS), [], "pixels (no VAE: the preprocessed image)", PIXELS)
    if cfg.source.startswith(vae_files.BUILTIN_PREFIX):
        return _resolve_builtin(cfg.source)
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


def _resolve_builtin(source: str) -> VaeSource:
    try:
        item = vae_files.builtin(source)
    except vae_files.WeightFileError as exc:
        raise VaeError(str(exc)) from None
    return _resolve_folder(item.folder, "", source, kind="builtin")


def is_hub_id(source: str) -> bool:
    """A Hub repository id is exactly `owner/name`; anything else (`vae`, `./vae`, `a/b/c`, `~/x`,
    `C:\\x`, `x.safetensors`) is a local path."""
    owner, _, name = source.partition("/")
    legal = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    return bool(name) and all(legal.fullmatch(x) for x in (owner, name)) and not source.endswith(".safetensors")


def recorded_source(source: str, base: Path | None = None) -> str:
    """`source` as it can be found from any folder: an existing local path made absolute (a relative
    one is relative to `base`), a Hub id or "pixels" as it is."""
    if source == PIXELS or source.startswith(vae_files.BUILTIN_PREFIX):
        return source
    p = local_path(source, base)
    return str(p.resolve()) if p.exists() else source


def model_config(src: VaeSource) -> dict:
    if src.kind == PIXELS:
        return dict(PIXELS_CONFIG)
    if src.derived_config is not None:
        return dict(src.derived_config)
    data = json.loads(src.config_path.read_text())
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def parameter_counts(src: VaeSource) -> tuple[int, int]:
    """(all parameters, those of the encoder and quant_conv that stage one runs), read from the
    safetensors headers without loading any weights."""
    total = encoder = 0
    for path in src.weights + ([src.decoder] if src.decoder else []):
        for key, shape in vae_files.safetensors_shapes(path).items():
            n = 1
            for d in shape:
                n *= d
            total += n
            stage_one = path != src.decoder and (src.family == "taesd" or key.startswith(("encoder.", "quant_conv.")))
            encoder += n if stage_one else 0
    return total, encoder


def shift_factor(config: dict) -> float:
    """The shift a family removes before scaling (diffusers' shift_factor: SD3 0.0609, FLUX.1 0.1159; SD: none)."""
    return float(config.get("shift_factor") or 0.0)


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


# The layouts `leakpipe vae random --like` builds: diffusers' class, latent channels and the family's own
# scaling (its released config's scaling_factor and shift_factor; FLUX.2 normalises with batch-norm
# statistics instead, seeded at random here); SD3 and FLUX.1 have no quant convolutions. The widths are
# the caller's (block_out_channels): 4 blocks give the real 1/8 of the side.
LIKE: dict[str, tuple[str, dict[str, Any]]] = {
    "sd21": ("AutoencoderKL", dict(latent_channels=4, scaling_factor=0.18215)),
    "sdxl": ("AutoencoderKL", dict(latent_channels=4, scaling_factor=0.13025)),
    "sd3": (
        "AutoencoderKL",
        dict(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    ),
    "flux1": (
        "AutoencoderKL",
        dict(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    ),
    "flux2": ("AutoencoderKLFlux2", dict(latent_channels=32)),
}


def save_random_vae(
    folder: Path,
    block_out_channels=(32, 64, 64, 64),
    seed: int = 0,
    norm_num_groups: int | None = None,
    layers_per_block: int = 1,
    like: str = "sd21",
) -> Path:
    """Write a diffusers autoencoder of the layout `like` (LIKE) with seeded random weights (tests, demo;
    no download).

    With 4 blocks the latent is 1/8 of the image, like every released layout of LIKE.
    Passing SD2.1's widths (128, 256, 512, 512), groups 32 and 2 layers per block builds its
    exact architecture (SD3's and FLUX.1's with latent channels 16, FLUX.2's with 32).
    """
    import diffusers
    import torch

    cls, family = LIKE[like]
    n = len(block_out_channels)
    groups = norm_num_groups or min(8, block_out_channels[0])
    torch.manual_seed(seed)
    vae = getattr(diffusers, cls)(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        sample_size=256,
        **family,
    )
    if hasattr(vae, "bn"):  # FLUX.2: batch-norm statistics other than (0, 1), so that they do something
        vae.bn.running_mean.normal_(0.0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # diffusers saves its files 0600: placed
        vae.save_pretrained(tmp, safe_serialization=True)
        for made in sorted(Path(tmp).iterdir()):
            place(made, folder / made.name)
    layout = "" if like == "sd21" else f", {like} layout"
    note = f"seeded random weights (seed {seed}{layout}) written by leakpipe; not a pretrained VAE\n"
    atomic_write_text(folder / RANDOM_MARKER, note)
    return folder


RANDOM_MARKER = "LEAKPIPE_RANDOM_WEIGHTS.txt"


def is_random(cfg: VaeConfig, base: Path | None = None) -> bool:
    """True for a VAE written by save_random_vae (demo, tests): reports must say so."""
    p = local_path(cfg.source, base)
    return (p / RANDOM_MARKER).exists() or (p.is_file() and (p.parent / RANDOM_MARKER).exists())
