"""The run cache: trained results stored by training fingerprint, and run names that point at them.

`cache/results/<fp12>/` holds one trained result (model, config, history, checkpoint, embeddings,
metrics, report) and is never overwritten by a different config: its name *is* its inputs.
`cache/runs/<name>` is a symbolic link to the result the name was last trained (or restored) as,
so `cache/runs/default/report.md` keeps working and retraining a name keeps the earlier result.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from leakpipe.pipeline.names import NAME, check_name as _check_name
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.workspace import Workspace


def check_name(name: str) -> str:
    return _check_name(name, "run", "a folder under cache/runs/")


def results_root(ws: Workspace) -> Path:
    return ws.cache / "results"


def result_dir(ws: Workspace, fingerprint: str) -> Path:
    return results_root(ws) / fingerprint[:12]


def link(ws: Workspace, name: str) -> Path:
    return ws.cache / "runs" / check_name(name)


def _adopt_legacy(ws: Workspace, name: str) -> None:
    """A run folder from leakpipe 0.1 (a real folder, not a link) becomes a result of its own."""
    path = link(ws, name)
    if path.is_dir() and not path.is_symlink():
        target = results_root(ws) / f"legacy-{name}-{time.strftime('%Y%m%d%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        os.symlink(os.path.relpath(target, path.parent), path)


def pointed(ws: Workspace, name: str) -> Path | None:
    """The result folder run `name` points at (a leakpipe 0.1 run folder is its own result), or None
    if the name has never been trained. Reading never moves anything."""
    path = link(ws, name)
    if path.is_symlink():
        return (path.parent / os.readlink(path)).resolve()
    return path.resolve() if path.is_dir() else None


def point(ws: Workspace, name: str, result: Path) -> None:
    """Make `name` point at `result`, atomically (a new link renamed over the old one)."""
    _adopt_legacy(ws, name)
    path = link(ws, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(result, path.parent), tmp)
    os.replace(tmp, path)


def names(ws: Workspace) -> list[str]:
    root = ws.cache / "runs"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if NAME.fullmatch(p.name) and (p.is_symlink() or p.is_dir()))


def results(ws: Workspace) -> list[Path]:
    root = results_root(ws)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def names_of(ws: Workspace) -> dict[Path, list[str]]:
    """{result folder: run names pointing at it}."""
    out: dict[Path, list[str]] = {}
    for name in names(ws):
        target = pointed(ws, name)
        if target is not None:
            out.setdefault(target, []).append(name)
    return out


def seed_group(ws: Workspace, name: str) -> list[str] | None:
    """The member runs of a seed group made by `train --seeds` under `name`, or None."""
    import json

    path = ws.cache / "runs" / f"{check_name(name)}.seeds.json"
    return json.loads(path.read_text())["runs"] if path.is_file() else None


def write_seed_group(ws: Workspace, name: str, seeds: list[int], members: list[str]) -> None:
    atomic_write_json(ws.cache / "runs" / f"{check_name(name)}.seeds.json", {"seeds": seeds, "runs": members})
