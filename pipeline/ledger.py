"""Stage lock files: what a stage's outputs were made from, and their checksums.

A lock is written last and atomically, so its presence means the outputs it lists are complete.
A stage is up to date iff its recorded inputs equal the current ones and its outputs verify.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.config import canonical_hash
from pipeline.hashing import hash_file

LOCK_FORMAT = 1
_SKIP_SUFFIXES = (".partial", ".tmp", ".lock", ".lock.json")


def fingerprint(inputs: dict) -> str:
    return canonical_hash(inputs)


def _output_files(root: Path):
    root = Path(root)
    if root.is_file():
        yield root.name, root
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(_SKIP_SUFFIXES):
                full = Path(dirpath) / name
                yield full.relative_to(root).as_posix(), full


def checksums(root: Path, files: list[Path] | None = None) -> dict[str, dict]:
    """{relative path: {size, blake2b}} for every finished file under `root` (a folder or a file),
    or for the listed `files` (relative to `root`)."""
    pairs = _output_files(root) if files is None else \
        ((Path(f).relative_to(root).as_posix(), Path(f)) for f in files)
    return {rel: {"size": full.stat().st_size, "blake2b": hash_file(full)} for rel, full in sorted(pairs)}


def write_lock(lock_path: Path, stage: str, inputs: dict, outputs: Path | list[Path], **extra) -> dict:
    """`outputs`: a folder or file (everything in it), or a list of files next to the lock."""
    root = Path(lock_path).parent if isinstance(outputs, list) else Path(outputs)
    files = outputs if isinstance(outputs, list) else None
    lock = {"format": LOCK_FORMAT, "stage": stage, "fingerprint": fingerprint(inputs),
            "inputs": inputs, "outputs_root": os.path.relpath(root, Path(lock_path).parent),
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


def outputs_root(lock_path: Path, lock: dict) -> Path:
    return (Path(lock_path).parent / lock["outputs_root"]).resolve()


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
    problems = []
    for rel, want in lock["outputs"].items():
        full = root / rel if root.is_dir() else root
        if not full.exists():
            problems.append(f"missing: {full}")
        elif full.stat().st_size != want["size"]:
            problems.append(f"size changed: {full} ({want['size']} -> {full.stat().st_size} bytes)")
        elif deep and hash_file(full) != want["blake2b"]:
            problems.append(f"checksum mismatch (corrupted): {full}")
    if root.is_dir():
        problems += [f"orphaned partial write (killed writer; safe to delete): {p}"
                     for p in sorted(root.rglob("*.partial"))]
    return problems


def stage_state(lock_path: Path, inputs: dict) -> tuple[bool, list[str]]:
    """(up to date?, reasons if not). Cheap: sizes only, no content hashing."""
    lock = read_lock(lock_path)
    reasons = changed_inputs(lock, inputs)
    if not reasons:
        reasons = verify(lock_path, lock, deep=False)
    return not reasons, reasons
