"""The run cache: trained results stored by training fingerprint, and run names that point at them.

`cache/results/<fp12>/` holds one trained result (model, config, history, checkpoint, embeddings,
metrics, report) and is never overwritten by a different config: its name *is* its inputs.
`cache/runs/<name>` is a symbolic link to the result the name was last trained (or restored) as,
so `cache/runs/default/report.md` keeps working and retraining a name keeps the earlier result.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger.locks import read_lock
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


def trained(ws: Workspace) -> list[tuple[str, Path]]:
    """(run name, the result it points at) of each run name whose result finished training."""
    pairs = ((name, pointed(ws, name)) for name in names(ws))
    return [(n, r) for n, r in pairs if r is not None and read_lock(r / "train.lock.json") is not None]


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


def _shown(ws: Workspace, path: Path) -> str:
    return os.path.relpath(path, ws.root) if path.is_absolute() else str(path)


def _fingerprint(result: Path) -> str | None:
    lock = read_lock(result / "train.lock.json")
    return lock["fingerprint"] if lock else None


CHECKPOINT = Path("checkpoint") / "checkpoint.safetensors"  # store/checkpoint.py's, under a result


def interrupted(result: Path) -> dict | None:
    """{"epoch": the last epoch its checkpoint holds, "fingerprint": the training's} of a result whose
    training was stopped before it finished (a checkpoint and no train lock), else None. Reads the
    checkpoint's header only (safetensors: 8 bytes of length, then JSON), never its tensors."""
    path = result / CHECKPOINT
    if not path.is_file() or read_lock(result / "train.lock.json") is not None:
        return None
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        state = json.loads(header["__metadata__"]["state"])
        return {"epoch": int(state["epoch"]), "fingerprint": str(state["fingerprint"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"epoch": None, "fingerprint": None}  # damaged: train starts it again, gc may free it


def problem(ws: Workspace, name: str) -> str | None:
    """What is wrong with run name `name`, in words with what to do: a link whose result is gone, or a
    folder standing in for the link (a copy of a result, which nothing keeps checked or up to date).
    None for a link to a result, and for a run folder of leakpipe 0.1 (no lock of this version:
    `train --run NAME` adopts it as a result)."""
    path = link(ws, name)
    shown = _shown(ws, path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        if target.is_dir():
            return None
        return (
            f"{shown} points at {_shown(ws, Path(os.path.normpath(target)))}, which does not exist (the result "
            f"was deleted or moved): train it again with `leakpipe train --run {name}` and its config, or "
            f"remove the name with `rm {shown}`"
        )
    fp = _fingerprint(path) if path.is_dir() else None
    if fp is None:
        return None
    same = [r for r in results(ws) if _fingerprint(r) == fp]
    fix = (
        f"it holds the training of {_shown(ws, same[0])}: replace it with a link, `rm -r {shown} && "
        f"ln -s ../results/{same[0].name} {shown}`"
        if same
        else f"`leakpipe train --run {name}` adopts it as a result of its own"
    )
    return f"{shown} is a folder, not a link to a result in cache/results/ (a copy?); {fix}"


def stand_ins(ws: Workspace) -> dict[str, str]:
    """{run name: training fingerprint} of the run names that are folders holding a finished training."""
    out = {}
    for name in names(ws):
        path = link(ws, name)
        fp = None if path.is_symlink() else _fingerprint(path)
        if fp:
            out[name] = fp
    return out


def trained_result(ws: Workspace, name: str) -> Path:
    """The result run `name` points at, finished training; otherwise an error that says what is wrong:
    no such run (with the runs there are), a dangling link, or no finished training."""
    check_name(name)
    out, bad = pointed(ws, name), problem(ws, name)
    if out is None:
        have = names(ws)
        raise UserError(
            f"there is no run {name!r} (no {_shown(ws, link(ws, name))}); runs here: "
            f"{', '.join(have) or 'none'}. Train it with `leakpipe train --run {name}`"
        )
    if bad and not out.exists():
        raise UserError(f"run {name!r}: {bad}")
    if read_lock(out / "train.lock.json") is None:
        raise UserError(
            f"run {name!r} has no finished training ({out} holds no valid train.lock.json); run "
            f"`leakpipe train --run {name}`"
        )
    return out


def scored_result(ws: Workspace, name: str) -> Path:
    """The result run `name` points at, trained and scored (see trained_result)."""
    out = trained_result(ws, name)
    if read_lock(out / "score.lock.json") is None:
        raise UserError(
            f"run {name!r} is trained but not scored (no valid score.lock.json in {_shown(ws, out)}); "
            f"run `leakpipe score --run {name}` first"
        )
    return out


def seed_group(ws: Workspace, name: str) -> list[str] | None:
    """The member runs of a seed group made by `train --seeds` under `name`, or None."""
    path = ws.cache / "runs" / f"{check_name(name)}.seeds.json"
    return json.loads(path.read_text())["runs"] if path.is_file() else None


def write_seed_group(ws: Workspace, name: str, seeds: list[int], members: list[str]) -> None:
    atomic_write_json(ws.cache / "runs" / f"{check_name(name)}.seeds.json", {"seeds": seeds, "runs": members})
