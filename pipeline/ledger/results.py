"""The files of a trained or scored result as the later stages read them, each checked against its lock
as it is read: the model file, metrics.json, the saved scores. Bookkeeping only: what builds a model
from them is engine/trained.py; what joins a split's embeddings with its manifest, and reads metrics.json
with its threshold validated, is report/scored.py."""

from __future__ import annotations

from pathlib import Path

from leakpipe.pipeline.ledger.graph import trained_lock
from leakpipe.pipeline.ledger.locks import checked_bytes, read_lock
from leakpipe.pipeline.store.checkpoint import read_safetensors

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
