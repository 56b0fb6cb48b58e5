"""A trained result as the later stages read it: the model with its feature statistics, and the
embeddings of a split joined with its manifest columns."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import HASH_BYTES
from leakpipe.pipeline.ledger.graph import run_config, trained_lock
from leakpipe.pipeline.ledger.locks import read_lock, verify
from leakpipe.pipeline.workspace import Workspace


def build_model(cfg: Config, n_classes: int, latent_shape=(4, 32, 32)):
    """The model for z0 of `latent_shape` (C, h, w): f_t has 2C channels, or C without the DCT map."""
    from leakpipe.pipeline.nn.model import ProtoLeakNet

    from leakpipe.pipeline.nn.backbones import resolve_stem

    c, h, w = latent_shape
    in_channels = c if cfg.features.dct_map == "none" else 2 * c
    side = min(cfg.train.crop or h, h, w)  # what the backbone sees: a training crop, or z0 whole
    # the stem follows z0's side, not the crop's: 64-px crops of 256-px pixels keep ImageNet's stride
    model = dataclasses.replace(cfg.model, stem=resolve_stem(cfg.model.stem, min(h, w)))
    try:
        return ProtoLeakNet(model, n_classes, in_channels, side)
    except ValueError as exc:
        raise UserError(f"model.backbone = {cfg.model.backbone}: {exc}") from None


def init_backbone(model, path: Path) -> list[str]:
    """Load `model.init` (a torchvision-named .safetensors state dict) into the backbone, adapting the
    first convolution (and a ViT's patches and position grid); returns what was adapted, in words."""
    from safetensors.torch import load_file

    from leakpipe.pipeline.nn.backbones import adapt_state

    try:
        state = load_file(str(path))
    except (OSError, Exception) as exc:  # safetensors raises its own error types for a bad header
        raise UserError(f"model.init = {path}: not a readable .safetensors file ({exc})") from None
    try:
        state, notes = adapt_state(state, model.backbone)
    except ValueError as exc:
        raise UserError(f"model.init = {path} does not fit model.backbone: {exc}. Give a torchvision "
                        "state dict of the same architecture") from None
    model.backbone.load_state_dict(state)
    return notes


def _checked_bytes(path: Path, lock: dict, todo: str) -> bytes:
    """The file's bytes, hashed as read and compared with the lock's checksum; a mismatch is refused."""
    data = path.read_bytes()
    if hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest() != lock["outputs"][path.name]["blake2b"]:
        raise UserError(f"{path} is damaged (checksum mismatch with {lock['stage']}.lock.json); it was not used. {todo}")
    return data


def load_checked(result: Path, name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a result's safetensors file, checked against the train lock as read."""
    from safetensors.torch import load

    data = _checked_bytes(result / name, trained_lock(result),
                          "Run `leakpipe train --run NAME` with its config to train it again.")
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    return load(data), {k: json.loads(v) for k, v in header.items()}


def load_checked_scores(result: Path) -> dict | None:
    """The open-set scores a scored result saved, checked against its score lock as read, as numpy;
    None if it has none."""
    from safetensors.numpy import load

    lock = read_lock(result / "score.lock.json")
    if lock is None or "open_scores.safetensors" not in lock["outputs"]:
        return None
    return load(_checked_bytes(result / "open_scores.safetensors", lock, "Run `leakpipe score` to write it again."))


def load_trained(out: Path, device):
    """(model in eval mode, FeatureBuilder with its statistics, classes, config) of a finished run."""
    if not (out / "model.safetensors").exists():
        raise UserError(f"no trained model in {out}; run `leakpipe train --run {out.name}` first")
    tensors, meta = load_checked(out, "model.safetensors")
    return model_from(tensors, meta, run_config(out), device)


def model_from(tensors: dict, meta: dict, cfg: Config, device):
    """(model in eval mode, FeatureBuilder, classes, cfg) from a model.safetensors' tensors and metadata."""
    from leakpipe.pipeline.engine.data import FeatureBuilder

    model = build_model(cfg, len(meta["classes"]), meta.get("latent_shape", (4, 32, 32)))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("feature_")})
    build = FeatureBuilder(cfg, device, tensors["feature_mean"].to(device), tensors["feature_std"].to(device))
    return model.to(device).eval(), build, meta["classes"], cfg


def load_split(ws: Workspace, run_dir: Path, split: str, content: list[str] | None = None):
    """The valid rows of `split`'s embeddings with their manifest columns (evaluate.Split); `content`:
    the manifest rows' file hashes, for the leakage audit."""
    from leakpipe.pipeline.store import embeddings
    from leakpipe.pipeline.report.evaluate import Split
    from leakpipe.pipeline.manifest import read_manifest

    lock_path = run_dir / "embeddings" / f"{split}.lock.json"
    lock = read_lock(lock_path)
    problems = verify(lock_path, lock, deep=True) if lock else ["no valid lock: unfinished"]
    if problems:
        raise UserError(f"the embeddings of {split!r} in {run_dir} cannot be used ({'; '.join(problems)}); "
                        "run `leakpipe score`, which embeds them again")
    e = embeddings.read(run_dir / "embeddings" / f"{split}.zarr")
    m = read_manifest(ws.manifest(split), check_files=False)
    if len(m) != len(e["valid"]):
        raise UserError(f"embeddings of {split!r} have {len(e['valid'])} rows but {ws.manifest(split)} has "
                        f"{len(m)}; run `leakpipe encode --split {split}` and `leakpipe score` again")
    v = e["valid"]
    col = lambda name: np.array(m.column(name) if m.has_column(name) else [""] * len(m), dtype=object)[v]  # noqa: E731
    ids = {"path": col("path"), "group": col("group"), "source": col("source"), "row": np.nonzero(v)[0]}
    if content is not None:
        ids["content"] = np.array(content, dtype=object)[v]
    return Split(split, {k: e[k][v] for k in ("h_bar", "w", "a_t", "logits", "pi", "d_min", "pi_cm", "r")},
                 col("label"), col("partition"), col("variant"), int((~v).sum()), ids), e["attrs"]


def stage_features(result: Path, store: str, rows: np.ndarray, device, batch_size: int = 64) -> dict:
    """The paper's Fig. 3 data for `rows` of a latent store: the backbone's pooled features after each
    stage, then h_bar and h_bar * w, each pooled over timesteps by a_t. {name: (n, dims)}."""
    import torch

    from leakpipe.pipeline.engine.data import LatentRows, eval_noise

    model, build, _, cfg = load_trained(result, device)
    data = LatentRows(store, rows, rows * 0, 2 ** 30)
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
