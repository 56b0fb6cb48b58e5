"""Stage lock files: what a stage's outputs were made from, and their checksums.

A lock is written last and atomically, so its presence means the outputs it lists are complete.
A stage is up to date iff its recorded inputs equal the current ones and its outputs verify.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.config import canonical_hash
from leakpipe.pipeline.store.hashing import hash_stream

LOCK_FORMAT = 1
_SKIP_SUFFIXES = (".partial", ".tmp", ".lock", ".lock.json")


def fingerprint(inputs: dict) -> str:
    return canonical_hash(inputs)


def _hash(location: str) -> str:
    with storage.open_file(location) as fh:
        return hash_stream(fh)


def checksums(root: Path | str, files: list[Path] | None = None) -> dict[str, dict]:
    """{relative path: {size, blake2b}} for every finished file under the folder `root` (local or
    at an fsspec URL), or for the listed local `files` (relative to `root`)."""
    root = storage.normalize(root)
    if files is None:
        sizes = {rel: n for rel, n in storage.files(root).items() if not rel.endswith(_SKIP_SUFFIXES)}
    else:
        sizes = {Path(f).relative_to(root).as_posix(): Path(f).stat().st_size for f in files}
    return {rel: {"size": n, "blake2b": _hash(storage.join(root, rel))} for rel, n in sorted(sizes.items())}


def _root_record(root: str, lock_dir: Path) -> str:
    """Local outputs are recorded relative to the lock (the workspace can move); URLs as they are."""
    return root if storage.is_url(root) else os.path.relpath(root, lock_dir)


def write_lock(lock_path: Path, stage: str, inputs: dict, outputs: Path | str | list[Path], **extra) -> dict:
    """`outputs`: a folder (everything in it; local or a URL), or a list of files next to the lock."""
    root = str(Path(lock_path).parent) if isinstance(outputs, list) else storage.normalize(outputs)
    files = outputs if isinstance(outputs, list) else None
    lock = {"format": LOCK_FORMAT, "stage": stage, "fingerprint": fingerprint(inputs),
            "inputs": inputs, "outputs_root": _root_record(root, Path(lock_path).parent),
            "outputs": checksums(root, files), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    atomic_write_json(lock_path, lock)
    return lock


def read_lock(lock_path: Path) -> dict | None:
    try:
        lock = json.loads(Path(lock_path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a torn lock cannot exist (atomic writes), but a hand-edited one can
    return lock if lock.get("format") == LOCK_FORMAT else None


def outputs_root(lock_path: Path, lock: dict) -> str:
    """Where the lock's outputs are: an absolute local path or a URL."""
    root = lock["outputs_root"]
    return root if storage.is_url(root) else storage.normalize(Path(lock_path).parent / root)


def changed_inputs(lock: dict | None, inputs: dict) -> list[str]:
    """Names of the inputs whose value differs from the lock's, in a sentence each."""
    if lock is None:
        return ["never run (no lock file)"]
    old = lock.get("inputs", {})
    reasons = []
    for name in sorted(set(old) | set(inputs)):
        if old.get(name) != inputs.get(name):
            was, now = str(old.get(name, "-"))[:12], str(inputs.get(name, "-"))[:12]
            reasons.append(f"{name} changed ({was} -> {now})")
    return reasons


def verify(lock_path: Path, lock: dict, deep: bool) -> list[str]:
    """Problems with a lock's outputs: missing, resized, (deep) corrupted files, orphaned partials."""
    root = outputs_root(lock_path, lock)
    have = storage.files(root)
    problems = []
    for rel, want in lock["outputs"].items():
        full, size = storage.join(root, rel), have.get(rel)
        if size is None:
            problems.append(f"missing: {full}")
        elif size != want["size"]:
            problems.append(f"size changed: {full} ({want['size']} -> {size} bytes)")
        elif deep and _hash(full) != want["blake2b"]:
            problems.append(f"checksum mismatch (corrupted): {full}")
    problems += [f"orphaned partial write (killed writer; safe to delete): {storage.join(root, rel)}"
                 for rel in sorted(have) if rel.endswith(".partial")]
    return problems


def stage_state(lock_path: Path, inputs: dict, outputs: Path | str | None = None) -> tuple[bool, list[str]]:
    """(up to date?, reasons if not). Cheap: sizes only, no content hashing. `outputs`: where the
    outputs should be now; a lock whose outputs are elsewhere (store.url changed) is stale."""
    lock = read_lock(lock_path)
    reasons = changed_inputs(lock, inputs)
    if not reasons and outputs is not None:
        was, now = outputs_root(lock_path, lock), storage.normalize(outputs)
        if was != now:
            reasons = [f"outputs moved: the lock's are at {was}, the config wants them at {now}"]
    if not reasons:
        reasons = verify(lock_path, lock, deep=False)
    return not reasons, reasons
