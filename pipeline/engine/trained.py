"""A trained result as the later stages read it: the model with its feature statistics, and the
embeddings of a split joined with its manifest columns."""
from __future__ import annotations

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


def build_model(cfg: Config, n_classes: int):
    from leakpipe.pipeline.nn.model import ProtoLeakNet

    m = cfg.model
    return ProtoLeakNet(n_classes, 2 * 4, m.backbone, m.embed_dim, m.prototypes,
                        m.prototypes_per_class, m.gating, m.tau, m.tau_learnable)


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
    from leakpipe.pipeline.engine.data import FeatureBuilder

    if not (out / "model.safetensors").exists():
        raise UserError(f"no trained model in {out}; run `leakpipe train --run {out.name}` first")
    cfg = run_config(out)
    tensors, meta = load_checked(out, "model.safetensors")
    model = build_model(cfg, len(meta["classes"]))
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
    col = lambda name: np.array(m.column(name) if name in m.rows[0] else [""] * len(m), dtype=object)[v]  # noqa: E731
    ids = {"path": col("path"), "group": col("group"), "source": col("source"), "row": np.nonzero(v)[0]}
    if content is not None:
        ids["content"] = np.array(content, dtype=object)[v]
    return Split(split, {k: e[k][v] for k in ("h_bar", "w", "a_t", "logits", "pi", "d_min")},
                 col("label"), col("partition"), col("variant"), int((~v).sum()), ids), e["attrs"]
