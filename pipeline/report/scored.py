"""A scored result as the report and the later commands read it: the embeddings of a split, its valid rows
joined with their manifest columns (evaluate.Split), and metrics.json with its unseen-generator threshold
validated; each checked against its lock first (ledger/results.py keeps the checked bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leakpipe.pipeline.engine.attributor_schema import threshold_problems
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger.locks import read_lock, verify
from leakpipe.pipeline.ledger.results import metrics_bytes
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.report.evaluate import Split
from leakpipe.pipeline.store import embeddings
from leakpipe.pipeline.workspace import Workspace


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
