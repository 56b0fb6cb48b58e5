"""A trained result as the later stages read it, every file checked against its lock as it is read:
the model with its feature path, the saved open-set scores, and the embeddings of a split joined with
its manifest columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.engine.attributor_schema import threshold_problems
from leakpipe.pipeline.engine.trained import model_from
from leakpipe.pipeline.ledger.graph import run_config, trained_lock
from leakpipe.pipeline.ledger.locks import checked_bytes, read_lock, verify
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.report.evaluate import Split
from leakpipe.pipeline.store import embeddings
from leakpipe.pipeline.store.checkpoint import read_safetensors
from leakpipe.pipeline.workspace import Workspace


RETRAIN = "Run `leakpipe train --run NAME` with its config to train it again."


def trained_bytes(result: Path, name: str) -> bytes:
    """A file the training wrote (model.safetensors, config.json), checked against the train lock as read."""
    trained_lock(result)
    return checked_bytes(result / name, result / "train.lock.json", RETRAIN)


def load_checked(result: Path, name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a result's safetensors file, checked against the train lock as read."""
    return read_safetensors(trained_bytes(result, name))


def metrics_bytes(result: Path, run: str = "RUN") -> bytes:
    """metrics.json as the score stage wrote it, checked against the score lock as read."""
    return checked_bytes(
        result / "metrics.json", result / "score.lock.json", f"Run `leakpipe score --run {run}` to score it again."
    )


def load_metrics(result: Path, run: str = "RUN") -> dict:
    """A scored result's metrics.json, checked against its score lock as read, with its unseen-generator
    threshold validated (finite threshold, positive bandwidth, a known embedding)."""
    path = result / "metrics.json"
    try:
        m = json.loads(metrics_bytes(result, run))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable ({exc}); run `leakpipe score --run {run}`") from None
    problems = ["not a JSON object"] if not isinstance(m, dict) else threshold_problems(m.get("unseen_threshold"))
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}; run `leakpipe score --run {run}` to score it again")
    return m


def load_checked_scores(result: Path, name: str = "open_scores.safetensors") -> dict | None:
    """Scores a scored result saved (the open-set scores, or the validation scores of `name` =
    calibration.safetensors), checked against its score lock as read, as numpy; None if it has none."""
    lock = read_lock(result / "score.lock.json")
    if lock is None or name not in lock["outputs"]:
        return None
    tensors, _ = read_safetensors(
        checked_bytes(result / name, result / "score.lock.json", "Run `leakpipe score` to write it again.")
    )
    return {k: v.numpy() for k, v in tensors.items()}


def load_trained(out: Path, device):
    """(model in eval mode, FeatureBuilder with its statistics, classes, config) of a finished run."""
    if not (out / "model.safetensors").exists():
        raise UserError(f"no trained model in {out}; run `leakpipe train --run {out.name}` first")
    tensors, meta = load_checked(out, "model.safetensors")
    return model_from(tensors, meta, run_config(out), device)


def load_split(ws: Workspace, run_dir: Path, split: str, content: list[str] | None = None):
    """The valid rows of `split`'s embeddings with their manifest columns (evaluate.Split); `content`:
    the manifest rows' file hashes, for the leakage audit."""
    lock_path = run_dir / "embeddings" / f"{split}.lock.json"
    lock = read_lock(lock_path)
    problems = verify(lock_path, lock, deep=True) if lock else ["no valid lock: unfinished"]
    if problems:
        raise UserError(
            f"the embeddings of {split!r} in {run_dir} cannot be used ({'; '.join(problems)}); "
            "run `leakpipe score`, which embeds them again"
        )
    e = embeddings.read(run_dir / "embeddings" / f"{split}.zarr")
    m = read_manifest(ws.manifest(split), check_files=False)
    if len(m) != len(e["valid"]):
        raise UserError(
            f"embeddings of {split!r} have {len(e['valid'])} rows but {ws.manifest(split)} has "
            f"{len(m)}; run `leakpipe encode --split {split}` and `leakpipe score` again"
        )
    v = e["valid"]
    col = lambda name: np.array(m.column(name) if m.has_column(name) else [""] * len(m), dtype=object)[v]  # noqa: E731
    ids = {"path": col("path"), "group": col("group"), "source": col("source"), "ops": col("ops")}
    ids["row"] = np.nonzero(v)[0]
    if content is not None:
        ids["content"] = np.array(content, dtype=object)[v]
    return Split(
        split,
        {k: e[k][v] for k in ("h_bar", "w", "a_t", "logits", "pi", "d_min", "pi_cm", "r")},
        col("label"),
        col("partition"),
        col("variant"),
        int((~v).sum()),
        ids,
    ), e["attrs"]


def stage_features(result: Path, store: str, rows: np.ndarray, device, batch_size: int = 64) -> dict:
    """The paper's Fig. 3 data for `rows` of a latent store: the backbone's pooled features after each
    stage, then h_bar and h_bar * w, each pooled over timesteps by a_t. {name: (n, dims)}."""
    import torch  # heavy: only the figures that need the model load it

    from leakpipe.pipeline.engine.data import LatentRows, eval_noise

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
