"""Code identity: the code a stage's outputs are made by, hashed from its source.

A stage declares its code as entries: a module (`leakpipe.pipeline.math.diffusion`) or one top-level
function or class of a module (`leakpipe.pipeline.engine.images:resize_crop`). An entry's identity is
the blake2b-128 of its normalised source: parsed, docstrings dropped and printed back by `ast.unparse`,
so comments, docstrings and formatting do not count and any change to what runs does. Sources are read,
never imported, so `leakpipe status` stays fast.

A lock written by an earlier leakpipe holds a code *version label* (`train-3`); LEGACY maps each label
to the identity its code had when labels were retired, so results made then stay valid for exactly as
long as the code is unchanged.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import hash_bytes


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def normalised(source: str, name: str | None = None) -> str:
    """The source (or its top-level function or class `name`) without comments, docstrings and
    formatting: what `ast.unparse` prints of its syntax tree."""
    tree = _strip_docstrings(ast.parse(source))
    if name is None:
        return ast.unparse(tree)
    found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             and n.name == name]
    if not found:
        raise UserError(f"code entry {name!r}: no top-level function or class of that name")
    return ast.unparse(found[0])


def source_path(module: str) -> Path:
    """The file of a module, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise UserError(f"code entry {module!r}: no Python source found")
    return Path(spec.origin)


@functools.lru_cache(maxsize=None)
def _entry_hash(entry: str, mtime_ns: int) -> str:  # mtime in the key: an edit in this process counts
    module, _, name = entry.partition(":")
    text = normalised(source_path(module).read_text(), name or None)
    return hash_bytes(text.encode())


def identity(entries: tuple[str, ...]) -> dict[str, str]:
    """{entry: hash of its normalised source} for every declared entry."""
    return {e: _entry_hash(e, source_path(e.partition(":")[0]).stat().st_mtime_ns) for e in entries}


# Code version labels of the locks written before code identity, with the identity their code has now.
# A lock that holds a label is read as holding that identity.
LEGACY: dict[str, dict[str, str]] = {}


def recorded(lock_code) -> dict[str, str] | None:
    """The code identity a lock records (a legacy label read through LEGACY); None if unknown."""
    if isinstance(lock_code, dict):
        return lock_code
    return LEGACY.get(lock_code)


def stored_form(current: dict[str, str]) -> str | dict[str, str]:
    """What a lock (and a fingerprint) records for the current identity: the legacy label whose code it
    still is, so that upgrading leakpipe keeps every stored output valid, else the identity itself."""
    return next((label for label, code in LEGACY.items() if code == current), current)


def changed(old, new) -> list[str]:
    """The entries whose code differs between a lock's record and the current one (each an identity
    or a legacy label), in words."""
    was, now = recorded(old), recorded(new)
    if was is None or now is None:
        return [f"code: {old if was is None else 'this version'} -> {new if now is None else 'this version'}"]
    return [f"code changed: {e}" + ("" if e in was else " (newly part of the stage)") +
            ("" if e in now else " (no longer part of the stage)")
            for e in sorted(set(was) | set(now)) if was.get(e) != now.get(e)]
