"""The model of a config, built or loaded: the backbone's starting weights (model.init), and a trained
model with the feature path it was trained with, from a model file's tensors and metadata or a finished
run's folder, and the backbone's features at each stage of a trained model (Fig. 3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows, eval_noise
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger.graph import run_config
from leakpipe.pipeline.ledger.results import load_checked
from leakpipe.pipeline.nn.backbones import adapt_state, resolve_stem
from leakpipe.pipeline.nn.model import ProtoLeakNet, resolve_latent_readout
from safetensors.torch import load_file


def build_model(cfg: Config, n_classes: int, latent_shape: tuple[int, int, int]):
    """The model for z0 of `latent_shape` (C, h, w): f_t has 2C channels, or C without the DCT map."""
    c, h, w = latent_shape
    in_channels = c if cfg.features.dct_map == "none" else 2 * c
    side = min(cfg.train.crop or h, h, w)  # what the backbone sees: a training crop, or z0 whole
    seen = (side, side) if 0 < cfg.train.crop < min(h, w) else (h, w)
    # the stem follows z0's side, not the crop's: 64-px crops of 256-px pixels keep ImageNet's stride
    model = dataclasses.replace(cfg.model, stem=resolve_stem(cfg.model.stem, min(h, w)))
    reads_latent = resolve_latent_readout(cfg.model.latent_readout, seen[0] * seen[1]) == "linear"
    try:
        dct = (0, 0) if cfg.features.dct_map == "none" else (c, cfg.features.dct_k)
        latent = (c, *seen) if reads_latent else (0, 0, 0)
        return ProtoLeakNet(model, n_classes, in_channels, side, dct, latent, cfg.train.backbone_dropout_mode == "skip")
    except ValueError as exc:
        raise UserError(f"model.backbone = {cfg.model.backbone}: {exc}") from None


def init_backbone(model, path: Path) -> list[str]:
    """Load `model.init` (a torchvision-named .safetensors state dict) into the backbone, adapting the
    first convolution (and a ViT's patches and position grid); returns what was adapted, in words."""
    try:
        state = load_file(str(path))
    except (OSError, Exception) as exc:  # safetensors raises its own error types for a bad header
        raise UserError(f"model.init = {path}: not a readable .safetensors file ({exc})") from None
    try:
        state, notes = adapt_state(state, model.backbone)
    except ValueError as exc:
        raise UserError(
            f"model.init = {path} does not fit model.backbone: {exc}. Give a torchvision "
            "state dict of the same architecture"
        ) from None
    model.backbone.load_state_dict(state)
    return notes


def model_from(tensors: dict, meta: dict, cfg: Config, device):
    """(model in eval mode, FeatureBuilder, classes, cfg) from a model.safetensors' tensors and metadata:
    the feature path is the one saved with the model (its statistics, alpha_t, sigma_t, DCT bases)."""
    # model files written before the shape was saved all held SD2.1's z0 of 256-px images
    model = build_model(cfg, len(meta["classes"]), meta.get("latent_shape", (4, 32, 32)))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("feature_")})
    return model.to(device).eval(), FeatureBuilder.from_saved(cfg, device, tensors), meta["classes"], cfg


def load_trained(out: Path, device):
    """(model in eval mode, FeatureBuilder with its statistics, classes, config) of a finished run."""
    if not (out / "model.safetensors").exists():
        raise UserError(f"no trained model in {out}; run `leakpipe train --run {out.name}` first")
    tensors, meta = load_checked(out, "model.safetensors")
    return model_from(tensors, meta, run_config(out), device)


def stage_features(result: Path, store: str, rows: np.ndarray, device, batch_size: int = 64) -> dict:
    """The paper's Fig. 3 data for `rows` of a latent store: the backbone's pooled features after each
    stage, then h_bar and h_bar * w, each pooled over timesteps by a_t. {name: (n, dims)}."""
    model, build, _, cfg = load_trained(result, device)
    data = LatentRows(store, rows, rows * 0, 2**30)
    parts: dict[str, list] = {}
    with torch.inference_mode():
        for pos, m, lv, _ in data.batches(build.eval_rows(batch_size, data.latent_shape), seed=None):
            f = build(m, lv, eval_noise(data.hashes[pos], cfg.train.eval_seed, build.noise_shape(data.latent_shape)))
            out = model(f)
            b, t = f.shape[0], f.shape[-4]
            tiles = f.shape[1] if f.dim() == 6 else 1  # train.crop: a stage's features averaged over tiles
            stages = model.backbone.stages(f.reshape(-1, *f.shape[-3:]))
            named = {f"stage {i + 1}": s.view(b, tiles, t, -1).mean(1) for i, s in enumerate(stages)}
            pooled = {k: (v * out.a_t.unsqueeze(-1)).sum(1) for k, v in named.items()}
            pooled.update({"h_bar": out.h_bar, "h_bar * w (gated)": out.h_bar * out.w})
            for k, v in pooled.items():
                parts.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
