"""Stage lock files: what a stage's outputs were made from, by name, and their checksums.

A lock is written last and atomically, so its presence means the outputs it lists are complete.
`check` is the one function that says whether a stage is up to date, and why not in words: the
stages call it before they work and `leakpipe status` calls it to report, so the two cannot
disagree.

A long file list (a manifest's million rows with their files' hashes: `Rows`) is recorded in the
lock by its length and digest; the rows themselves, with each file's stat when it was hashed, go to a
side file beside the lock (`<lock>.rows`), which is read only to say what changed, or by a stage
that can tell from the stats alone that nothing did (stages/encode.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import ADDED_KEYS, canonical_hash
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import code as code_id
from leakpipe.pipeline.ledger.columns import ENCODING, Column
from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.atomic import atomic_path, atomic_write_json
from leakpipe.pipeline.store.hashing import hash_bytes, hash_stream
from leakpipe.pipeline.store.stats import Joined

# 2: named inputs (config keys, upstream identities, file lists, code version); 3: long file lists as
# a digest (their rows in a side file), and `identity`, the inputs' hash with those lists as digests
LOCK_FORMAT = 3
READ_FORMATS = (2, 3)  # a format-2 lock is read as it was written, and rewritten as 3 by its stage
_SKIP_SUFFIXES = (".partial", ".tmp", ".lock", ".lock.json", ".lock.json.rows")


@dataclass
class Upstream:
    """Another stage's output that this one reads, identified by that stage's lock."""

    fingerprint: str
    redone: str  # what it means when it changes, e.g. "re-encoded", "retrained"
    about: dict = field(default_factory=dict)  # readable facts (VAE, rows, when), for the reasons


def rows_digest(names: Sequence[str], values: Sequence[str]) -> str:
    """blake2b-128 of two string columns, each as its strings' lengths and then their text: one
    digest per list, never the same for two different lists of pairs."""
    h = hashlib.blake2b(b"rows 1", digest_size=16)
    for column in (names, values):
        h.update(np.fromiter(map(len, column), np.int64, len(column)).tobytes())
        h.update("".join(column).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass
class Rows:
    """A long file list as two columns: `names` (a manifest's paths) and `values` (their files'
    content hashes). `stamps` (n, 5) int64: each file's (device, inode, size, mtime_ns) when it was
    hashed, and when (hashing.py's stamps); `listing`: [the file that lists the names (a manifest),
    the blake2b of its bytes]; `root`: the folder the names are relative to. A lock records the list
    as its length and digest (the same digest for the same pairs, whatever the stamps)."""

    names: Sequence[str]  # a list, or a Column read from a side file
    values: Sequence[str]
    stamps: np.ndarray | None = None
    listing: list[str] | None = None
    root: str = ""
    digest: str = ""  # rows_digest(names, values), computed when empty

    def __post_init__(self):
        self.digest = self.digest or rows_digest(self.names, self.values)

    def record(self) -> dict:
        return {"rows": len(self.names), "digest": self.digest}

    def paths(self, prefix: str) -> list | Joined:
        """prefix + each name, for store/stats.py's stat_stamps (a side file's column: as its bytes)."""
        names = self.names
        return names.prefixed(prefix) if isinstance(names, Column) else [prefix + p for p in names]

    def pairs(self) -> list[list[str]]:
        return [[n, v] for n, v in zip(self.names, self.values)]

    def fresh(self, racy_ns: int) -> bool:
        """Every file was stat'ed and hashed at least `racy_ns` after it was last modified."""
        s = self.stamps
        return s is not None and bool(np.all(s[:, 3] <= s[:, 4] - racy_ns) and np.all(s[:, 1] != 0))


@dataclass
class Inputs:
    """What a stage's outputs are made from. Only these decide whether it reruns."""

    config: dict = field(default_factory=dict)  # dotted config key -> value
    upstream: dict = field(default_factory=dict)  # name -> Upstream
    # name -> [[path, content hash], ...] (weights, labels) or Rows (a manifest's rows with their hashes)
    files: dict = field(default_factory=dict)
    code: str | dict = ""  # the stage's code identity (ledger/code.py): a legacy label, or {entry: hash}

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "code": self.code,
            "files": {k: v.record() if isinstance(v, Rows) else v for k, v in self.files.items()},
            "upstream": {k: asdict(u) for k, u in self.upstream.items()},
        }

    def _hash(self, files: dict) -> str:
        return canonical_hash(
            {
                "config": self.config,
                "code": self.code,
                "files": files,
                "upstream": {k: u.fingerprint for k, u in self.upstream.items()},
            }
        )

    def fingerprint(self) -> str:
        """The identity of the outputs: `about` is for reading only and never changes it. The same
        value as in format 2 (every row of every list), so what downstream locks recorded of it holds."""
        return self._hash({k: v.pairs() if isinstance(v, Rows) else v for k, v in self.files.items()})

    def identity(self) -> str:
        """What a format-3 lock compares: the fingerprint's inputs with each Rows as its digest (equal
        exactly when the fingerprints are, and computed without the rows)."""
        return self._hash({k: v.record() if isinstance(v, Rows) else v for k, v in self.files.items()})


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


def _same_list(was, now) -> bool:
    """A lock's record of a file list (a list, or a Rows' length and digest) against the current one."""
    if isinstance(now, Rows):
        return was == now.record() if isinstance(was, dict) else was == now.pairs()
    return was == now


def _list_reason(key: str, was, now, rows_of) -> str:
    """`_files_reason` for two lists of which either may be a Rows (or a lock's record of one, whose
    rows `rows_of(key)` reads from the lock's side file)."""
    now = now.pairs() if isinstance(now, Rows) else now
    if isinstance(was, dict):
        old = rows_of(key) if rows_of is not None else None
        if old is None:
            return (
                f"{key}: {_plural(was.get('rows', 0), 'row')} -> {_plural(len(now), 'row')}, changed (the lock's "
                "side file of earlier rows is missing or damaged, so the change is not itemised)"
            )
        was = old.pairs()
    return _files_reason(key, was, now)


def explain(old: dict, new: Inputs, rows_of=None) -> list[str]:
    """Each input of `new` that differs from the lock's `old` inputs, named with both values.
    `rows_of(key)`: the Rows the lock's side file holds for a list it records as a digest."""
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
        _list_reason(k, files.get(k, []), new.files.get(k, []), rows_of)
        for k in sorted(set(files) | set(new.files))
        if not _same_list(files.get(k, []), new.files.get(k, []))
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
    return _write(lock_path, lock, inputs)


def _write(lock_path: Path, lock: dict, inputs: Inputs) -> dict:
    """Write `lock` in this format: its identity, and the side file of its Rows first."""
    lock = {**lock, "format": LOCK_FORMAT, "identity": inputs.identity(), "inputs": inputs.to_dict()}
    rows = {k: v for k, v in inputs.files.items() if isinstance(v, Rows)}
    lock.pop("rows", None)
    if rows:
        lock["rows"] = _write_rows(Path(lock_path), rows)
    atomic_write_json(lock_path, lock)
    return lock


def rewrite_rows(lock_path: Path, lock: dict, inputs: Inputs) -> dict:
    """The lock of up-to-date outputs (its inputs equal `inputs`) again, in this format, with the rows
    of `inputs` (their stamps, where they are listed): its fingerprint, outputs and facts kept. How a
    format-2 lock is upgraded, and a side file of stale stamps refreshed, without redoing the work."""
    return _write(lock_path, lock, inputs)


def rows_file(lock_path: Path) -> Path:
    return Path(lock_path).with_name(Path(lock_path).name + ".rows")


def _column(strings: Sequence[str], what: str) -> np.ndarray:
    if isinstance(strings, Column):  # read from a side file, and written back as it was
        return np.frombuffer(strings.raw, np.uint8)
    text = "\0".join(strings)
    if text.count("\0") != max(len(strings) - 1, 0):
        raise ValueError(f"{what}: an entry holds a NUL character, which no file name can")
    return np.frombuffer(text.encode(*ENCODING), np.uint8)


def _write_rows(lock_path: Path, rows: dict) -> dict:
    """Write the side file of a lock's Rows (an .npz of their columns) and return the lock's record of it."""
    arrays, lists = {}, {}
    for i, (key, r) in enumerate(rows.items()):
        arrays[f"{i}.names"], arrays[f"{i}.values"] = _column(r.names, key), _column(r.values, key)
        if r.stamps is not None:
            arrays[f"{i}.stamps"] = np.asarray(r.stamps, np.int64)
        lists[key] = {"index": i, "rows": len(r.names), "listing": r.listing, "root": r.root}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
    data = buf.getvalue()
    with atomic_path(rows_file(lock_path)) as tmp:
        tmp.write_bytes(data)
    return {"file": rows_file(lock_path).name, "blake2b": hash_bytes(data), "lists": lists}


def forget_stamps(lock_path: Path) -> bool:
    """Drop the stats a lock's rows were hashed with, keeping the rows: the next plan then reads its
    manifest and asks the file-hash cache instead of trusting unchanged stats (what `verify --contents`
    does for a file whose bytes changed under a kept size, inode and mtime). False: the lock holds no rows."""
    lock = read_lock(lock_path)
    rows = read_rows(lock_path, lock) if lock else None
    if not lock or not rows:
        return False
    unstamped = {key: replace(r, stamps=None) for key, r in rows.items()}
    atomic_write_json(lock_path, {**lock, "rows": _write_rows(lock_path, unstamped)})
    return True


def _member(z, name: str) -> bytes:
    return z[name].tobytes()


def read_rows(lock_path: Path, lock: dict) -> dict | None:
    """{name: Rows} of the lists a lock records by digest, from its side file; None when the side
    file is missing or does not match the lock's checksum of it."""
    record = lock.get("rows")
    if not record:
        return {}
    try:
        data = rows_file(lock_path).read_bytes()
    except OSError:
        return None
    if hash_bytes(data) != record["blake2b"]:
        return None
    z = np.load(io.BytesIO(data), allow_pickle=False)
    out = {}
    for key, meta in record["lists"].items():
        i, n = meta["index"], meta["rows"]
        names, values = (Column(functools.partial(_member, z, f"{i}.{c}"), n) for c in ("names", "values"))
        stamps = z[f"{i}.stamps"] if f"{i}.stamps" in z.files else None
        digest = lock["inputs"]["files"][key]["digest"]
        out[key] = Rows(names, values, stamps, meta["listing"], meta["root"], digest)
    return out


def read_lock(lock_path: Path) -> dict | None:
    """The lock, or None when there is none; a lock of another format or a damaged one reads as None."""
    try:
        lock = json.loads(Path(lock_path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lock if isinstance(lock, dict) and lock.get("format") in READ_FORMATS else None


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


def same_inputs(lock: dict, inputs: Inputs) -> bool:
    """The lock's outputs were made from `inputs`: by its identity (format 3, without the rows) or
    by its fingerprint (format 2: every row)."""
    if lock.get("format") == 2:
        return lock["fingerprint"] == inputs.fingerprint()
    return lock.get("identity") == inputs.identity()


def _rows_of(lock_path: Path, lock: dict):
    """rows_of(key) for `explain`: the lock's side file, read once and only when asked."""
    read = {}

    def rows_of(key: str):
        if "all" not in read:
            read["all"] = read_rows(lock_path, lock) or {}
        return read["all"].get(key)

    return rows_of


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
        reasons = explain(old["inputs"], inputs, _rows_of(previous, old)) if old else []
        return Verdict(False, reasons or ["never run with these inputs (no lock file)"])
    if not same_inputs(lock, inputs):
        return Verdict(False, explain(lock["inputs"], inputs, _rows_of(lock_path, lock)) or ["inputs changed"], lock)
    if outputs_at is not None:
        was, now = outputs_root(lock_path, lock), storage.normalize(outputs_at)
        if was != now:
            return Verdict(False, [f"outputs moved: the lock's are at {was}, the config wants them at {now}"], lock)
    problems = verify(lock_path, lock, deep=deep)
    return Verdict(not problems, problems, lock)
