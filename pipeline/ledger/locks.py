"""Stage lock files: what a stage's outputs were made from, by name, and their checksums.

A lock is written last and atomically, so its presence means the outputs it lists are complete.
`check` is the one function that says whether a stage is up to date, and why not in words: the
stages call it before they work and `leakpipe status` calls it to report, so the two cannot
disagree.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leakpipe.pipeline.config import ADDED_KEYS, canonical_hash
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import code as code_id
from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.store.hashing import hash_bytes, hash_stream

LOCK_FORMAT = 2  # 2: named inputs (config keys, upstream identities, file lists, code version)
_SKIP_SUFFIXES = (".partial", ".tmp", ".lock", ".lock.json")


@dataclass
class Upstream:
    """Another stage's output that this one reads, identified by that stage's lock."""

    fingerprint: str
    redone: str  # what it means when it changes, e.g. "re-encoded", "retrained"
    about: dict = field(default_factory=dict)  # readable facts (VAE, rows, when), for the reasons


@dataclass
class Inputs:
    """What a stage's outputs are made from. Only these decide whether it reruns."""

    config: dict = field(default_factory=dict)  # dotted config key -> value
    upstream: dict = field(default_factory=dict)  # name -> Upstream
    files: dict = field(default_factory=dict)  # name -> [[path, content hash], ...] (manifest rows, weights)
    code: str | dict = ""  # the stage's code identity (ledger/code.py): a legacy label, or {entry: hash}

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "code": self.code,
            "files": self.files,
            "upstream": {k: asdict(u) for k, u in self.upstream.items()},
        }

    def fingerprint(self) -> str:
        """The identity of the outputs: `about` is for reading only and never changes it."""
        return canonical_hash(
            {
                "config": self.config,
                "code": self.code,
                "files": self.files,
                "upstream": {k: u.fingerprint for k, u in self.upstream.items()},
            }
        )


@dataclass
class Verdict:
    up_to_date: bool
    reasons: list[str]  # why not, in words
    lock: dict | None = None
    blocked: list[str] = field(default_factory=list)  # commands of upstream stages that must run first
    restore: bool = False  # a stored result matches: the stage restores it without recomputing

    def to_dict(self) -> dict:
        return {
            "up_to_date": self.up_to_date,
            "reasons": self.reasons,
            "blocked_by": self.blocked,
            "restores_stored_result": self.restore,
        }


# ---------------------------------------------------------------- reasons in words
def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value) or "[]"
    if value is None:
        return "(unset)"
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _setting(config: dict, key: str):
    """A fingerprinted setting; an added key is absent at its earlier default, which is what it meant."""
    return config[key] if key in config else ADDED_KEYS.get(key)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pairs(rows) -> list[tuple]:
    """A lock's file list as (path, hash) pairs; a bare hash (how model.init was once recorded) is one
    pair with no path."""
    rows = rows if isinstance(rows, list) else [rows]
    return [tuple(r) if isinstance(r, list) and len(r) == 2 else ("", str(r)) for r in rows]


def files_changed(old: list, new: list, changed: str = "file", unit: str = "row") -> str:
    """'12 rows added, 3 files changed, 1 row removed' (or 'rows reordered') between two row lists."""
    old, new = _pairs(old), _pairs(new)
    was, now = dict(old), dict(new)
    added, removed = len(now.keys() - was.keys()), len(was.keys() - now.keys())
    n_changed = sum(1 for k in now.keys() & was.keys() if now[k] != was[k])
    parts = [
        f"{_plural(added, unit)} added" if added else "",
        f"{_plural(n_changed, changed)} changed" if n_changed else "",
        f"{_plural(removed, unit)} removed" if removed else "",
    ]
    words = ", ".join(p for p in parts if p)
    if not words and [r[0] for r in old] != [r[0] for r in new]:
        words = "rows reordered"
    return words or "unchanged"


VAE_FILES = "vae files"  # stage one's files input: [[weights file name, hash], ..., ["config.json", hash]]


def _encoder_kind(vae_files: list) -> str:
    """A VAE has weight files; `vae.source = pixels` has its config alone (no encoder to weigh)."""
    return "VAE" if any(name != "config.json" for name, _ in vae_files) else "pixels (no encoder)"


def _files_reason(key: str, old: list, new: list) -> str:
    if key == VAE_FILES and old and new and _encoder_kind(old) != _encoder_kind(new):
        return f"{_encoder_kind(old)} -> {_encoder_kind(new)}"  # to or from vae.source = pixels
    if key == VAE_FILES:
        return f"{key}: {files_changed(old, new, 'file', unit='file')}"
    return f"{key}: {files_changed(old, new, 'row' if key.startswith('labels') else 'file')}"


def explain(old: dict, new: Inputs) -> list[str]:
    """Each input of `new` that differs from the lock's `old` inputs, named with both values."""
    reasons = []
    if old.get("code") != new.code:
        reasons += code_id.changed(old.get("code"), new.code) or ["code changed"]
    was = old.get("config", {})
    reasons += [
        f"{k}: {_show(_setting(was, k))} -> {_show(_setting(new.config, k))}"
        for k in sorted(set(was) | set(new.config))
        if was.get(k) != new.config.get(k)
    ]
    files = old.get("files", {})
    reasons += [
        _files_reason(k, files.get(k, []), new.files.get(k, []))
        for k in sorted(set(files) | set(new.files))
        if files.get(k) != new.files.get(k)
    ]
    ups = old.get("upstream", {})
    for name in sorted(set(ups) | set(new.upstream)):
        a, b = ups.get(name), new.upstream.get(name)
        if b is None:
            reasons.append(f"{name}: no longer an input")
        elif a is None:
            reasons.append(f"{name}: a new input")
        elif a["fingerprint"] != b.fingerprint:
            diff = [
                f"{k}: {_show(a['about'].get(k))} -> {_show(v)}"
                for k, v in b.about.items()
                if a.get("about", {}).get(k) != v
            ]
            reasons.append(f"{name}: {b.redone}" + (f" ({'; '.join(diff)})" if diff else ""))
    return reasons


# ---------------------------------------------------------------- lock files
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


def write_lock(lock_path: Path, stage: str, inputs: Inputs, outputs: Path | str | list[Path], **extra) -> dict:
    """`outputs`: a folder (everything in it; local or a URL), or a list of files next to the lock."""
    root = str(Path(lock_path).parent) if isinstance(outputs, list) else storage.normalize(outputs)
    files = outputs if isinstance(outputs, list) else None
    lock = {
        "format": LOCK_FORMAT,
        "stage": stage,
        "fingerprint": inputs.fingerprint(),
        "inputs": inputs.to_dict(),
        "outputs_root": _root_record(root, Path(lock_path).parent),
        "outputs": checksums(root, files),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    atomic_write_json(lock_path, lock)
    return lock


def read_lock(lock_path: Path) -> dict | None:
    """The lock, or None when there is none; a lock of another format or a damaged one reads as None."""
    try:
        lock = json.loads(Path(lock_path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lock if isinstance(lock, dict) and lock.get("format") == LOCK_FORMAT else None


def checked_bytes(path: Path, lock_path: Path, todo: str) -> bytes:
    """The bytes of a file that the lock beside it lists, hashed as read and compared with the lock's
    checksum: a file the lock does not list, or whose bytes differ from what the stage wrote (a hand
    edit, damage), is refused, naming the file, the lock and `todo` (what to run)."""
    path, lock = Path(path), read_lock(lock_path)
    want = lock["outputs"].get(path.name) if lock else None
    if want is None:
        raise UserError(
            f"{path} is not covered by a checksum ({lock_path.name} is missing, damaged or does not "
            f"list it), so it was not used. {todo}"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing, though {lock_path.name} lists it. {todo}") from None
    if hash_bytes(data) != want["blake2b"]:
        raise UserError(
            f"{path} does not match its checksum in {lock_path.name}: it was edited by hand or damaged "
            f"after the {lock['stage']} stage wrote it, so it was not used. {todo}"
        )
    return data


def outputs_root(lock_path: Path, lock: dict) -> str:
    """Where the lock's outputs are: an absolute local path or a URL."""
    root = lock["outputs_root"]
    return root if storage.is_url(root) else storage.normalize(Path(lock_path).parent / root)


def verify(lock_path: Path, lock: dict, deep: bool, bad: list[str] | None = None) -> list[str]:
    """Problems with a lock's outputs: missing, resized, (deep) corrupted files, orphaned partials.
    `bad`, if given, receives the relative paths of the outputs that fail."""
    root = outputs_root(lock_path, lock)
    have = storage.files(root)
    problems, failed = [], [] if bad is None else bad
    for rel, want in lock["outputs"].items():
        full, size = storage.join(root, rel), have.get(rel)
        if size is None:
            problems.append(f"output missing: {full}")
        elif size != want["size"]:
            problems.append(f"output size changed: {full} ({want['size']} -> {size} bytes)")
        elif deep and _hash(full) != want["blake2b"]:
            problems.append(f"checksum mismatch (corrupted): {full}")
        else:
            continue
        failed.append(rel)
    problems += [
        f"orphaned partial write (killed writer; safe to delete): {storage.join(root, rel)}"
        for rel in sorted(have)
        if rel.endswith(".partial")
    ]
    return problems


def check(
    lock_path: Path,
    inputs: Inputs,
    outputs_at: Path | str | None = None,
    previous: Path | None = None,
    deep: bool = False,
) -> Verdict:
    """Up to date iff the lock's inputs equal `inputs` and its outputs are all there (sizes; `verify`
    with deep=True hashes). `outputs_at`: where the outputs should be now (a lock whose outputs are
    elsewhere is stale). `previous`: an older lock to explain the change against when this stage has
    never been run with these inputs (another encoder's store, the result a run name pointed at).
    `deep`: hash the outputs too (the stages do for the outputs they read; `status` does not)."""
    lock = read_lock(lock_path)
    if lock is None:
        old = read_lock(previous) if previous else None
        reasons = explain(old["inputs"], inputs) if old else []
        return Verdict(False, reasons or ["never run with these inputs (no lock file)"])
    if lock["fingerprint"] != inputs.fingerprint():
        return Verdict(False, explain(lock["inputs"], inputs) or ["inputs changed"], lock)
    if outputs_at is not None:
        was, now = outputs_root(lock_path, lock), storage.normalize(outputs_at)
        if was != now:
            return Verdict(False, [f"outputs moved: the lock's are at {was}, the config wants them at {now}"], lock)
    problems = verify(lock_path, lock, deep=deep)
    return Verdict(not problems, problems, lock)
