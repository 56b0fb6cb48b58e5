"""`leakpipe verify`: hash every output every lock vouches for, name what fails and the command that
repairs it, and (with --contents) read every input file again, past the file-hash cache.

What `status` and the stages check cheaply they check by stat: a file whose size, inode and mtime are
unchanged is taken to hold the bytes hashed before. `verify` reads every output. Rows of a latent
store whose chunks fail are recorded in the store's damage register (ledger/graph.py), which
`status` shows ("8 rows damaged") and the next `encode` re-encodes: the files' stat is unchanged by
bit rot, so nothing else would tell encode to read them. Inputs (images, VAE weights) are compared
by stat unless `--contents` reads them; a file changed in place with its size and mtime kept is then
found, and its new hash goes into the cache so that `status` and `encode` see the change.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from pathlib import Path

from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.graph import check_latents
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store.hashing import HashCache, hash_file
from leakpipe.pipeline.workspace import Workspace


@dataclass
class Checked:
    """What verify found: a line per lock, the problems, and the commands that repair them."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    locks: int = 0

    def repair(self, command: str) -> None:
        if command not in self.repairs:
            self.repairs.append(command)


def lock_files(ws: Workspace) -> list[Path]:
    """Every lock: of latent stores, of results, and of run names that are folders, not links."""
    folders = [p.name for p in ws.cache.glob("runs/*") if p.is_dir() and not p.is_symlink()]
    return sorted(
        [
            *ws.cache.glob("latents/*/*.lock.json"),
            *ws.cache.glob("results/*/*.lock.json"),
            *ws.cache.glob("results/*/embeddings/*.lock.json"),
            *(
                q
                for name in folders
                for pattern in ("*.lock.json", "embeddings/*.lock.json")
                for q in (ws.cache / "runs" / name).glob(pattern)
            ),
        ]
    )


def _rerun(ws: Workspace, lock_path: Path, lock: dict) -> str:
    """The command that rewrites what a result's lock vouches for."""
    result = lock_path.parent.parent if lock["stage"] == "embed" else lock_path.parent
    names = runs.names_of(ws).get(result.resolve(), [])
    if not names:
        return f"nothing refers to {result.name} (`leakpipe gc` frees it)"
    if lock["stage"] == "train":
        return f"`leakpipe train --run {names[0]}` (with the config it was trained with)"
    return f"`leakpipe score --run {names[0]}` (with the config it was scored with; it embeds again what it reads)"


def check_outputs(ws: Workspace) -> Checked:
    """Hash the outputs of every lock; damaged latent rows go into their store's damage register."""
    out = Checked()
    out.problems += [f"run {name}: {bad}" for name in runs.names(ws) if (bad := runs.problem(ws, name))]
    if out.problems:
        out.repair("fix the run names as said above")
    for lock_path in lock_files(ws):
        lock = locks.read_lock(lock_path)
        if lock is None:
            out.problems.append(f"unreadable lock file (damaged, or from an older leakpipe): {lock_path}")
            continue
        out.locks += 1
        if lock["stage"] == "encode":
            found, rows = _latents(lock_path, lock, out)
        else:
            found, rows = locks.verify(lock_path, lock, deep=True), []
            if found:
                out.repair(_rerun(ws, lock_path, lock))
        out.lines.append(
            f"{lock_path.relative_to(ws.root)}: {len(lock['outputs'])} files, "
            + ("ok" if not found else f"{len(found)} problem(s)")
            + (f", {len(rows)} rows damaged" if rows else "")
        )
        out.problems += found
    return out


def _latents(lock_path: Path, lock: dict, out: Checked) -> tuple[list[str], list[int]]:
    split = lock.get("split") or lock_path.parent.name
    try:
        found, rows = check_latents(lock_path, lock)
    except OSError as exc:  # a read-only cache: found, but not recorded
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        found, rows = locks.verify(lock_path, lock, deep=True), []
        if found:
            out.problems.append(f"the damage could not be recorded for encode ({exc.strerror}: {exc.filename})")
    if found:
        out.repair(
            f"`leakpipe encode --split {split}`"
            + (f" (re-encodes the {len(rows)} damaged rows, recorded for it)" if rows else "")
        )
    return found, rows


def check_inputs(ws: Workspace, cfg, log=lambda msg: None) -> Checked:
    """Read every image of every manifest and the VAE's weights again, past the file-hash cache: a file
    whose bytes changed while its size, inode and mtime did not is named, and its new hash is put in the
    cache, so that `status` and `encode` see the change."""
    out, hashes = Checked(), HashCache(ws.hash_cache)
    groups = [(s, read_manifest(ws.manifest(s)), f"`leakpipe encode --split {s}`") for s in ws.splits()]
    try:
        weights = vae_lib.resolve(cfg.vae, ws.root).weights
    except UserError:
        weights = []
    for split, manifest, command in groups:
        what, changed = f"manifest {split}", _reread(manifest.abspaths(), hashes)
        log(f"verify --contents: read {len(manifest)} files of {what}")
        out.lines.append(f"{what}: {len(manifest)} files read, " + (f"{len(changed)} changed" if changed else "ok"))
        out.problems += [f"changed in place (size and mtime kept): {manifest.abspath(i)}" for i in changed]
        if changed:
            out.repair(command)
            for lock_path in ws.latents_dir(split).glob("*.lock.json"):  # their stats vouch for the old bytes
                locks.forget_stamps(lock_path)
    changed = _reread(list(weights), hashes)
    out.lines.append(f"VAE weights: {len(weights)} files read, " + (f"{len(changed)} changed" if changed else "ok"))
    out.problems += [f"VAE weights changed in place (size and mtime kept): {weights[i]}" for i in changed]
    hashes.close()
    return out


def _reread(paths: list, hashes) -> list[int]:
    """Indices of the files whose bytes no longer hash to what the cache holds for them; their new
    hashes replace the old ones in the cache."""
    cached = hashes.hash_many(paths)
    changed = []
    for i, (path, had) in enumerate(zip(paths, cached)):
        started = time.time_ns()
        try:
            now = hash_file(path)
        except OSError:
            continue  # unreadable: encode names it, with the reason
        if had is not None and now != had:
            hashes.remember([path], [now], started)
            changed.append(i)
    return changed
