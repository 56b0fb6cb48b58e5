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
        if (
            isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def normalised(source: str, name: str | None = None) -> str:
    """The source (or its top-level function or class `name`) without comments, docstrings and
    formatting: what `ast.unparse` prints of its syntax tree."""
    tree = _strip_docstrings(ast.parse(source))
    if name is None:
        return ast.unparse(tree)
    found = [
        n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
    ]
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


# Code version labels of the locks written before code identity, with the identity of the code that
# replaced them. Each was checked bitwise: the same workspace encoded, trained (profiles leakpipe and
# paper, fp32) and embedded by leakpipe at f356705 and by this code gave identical latents, weights and
# embeddings (checked again after the last change to that code). score-6 is left out: its metrics.json
# gained fields (ECE intervals, chance rows, the KDE reference), so scores made by it are made again.
# A lock that holds a label is read as holding that identity.
LEGACY: dict[str, dict[str, str]] = {
    "encode-1": {
        "leakpipe.pipeline.engine.images:_open": "368acb6e1c470f97179d639c0faf1c4c",
        "leakpipe.pipeline.engine.images:to_rgb": "d1540e59e3c7b1118337faa59bcc5e91",
        "leakpipe.pipeline.engine.images:resize_crop": "feb3046306dee3c791d00f5023bde7f2",
        "leakpipe.pipeline.engine.images:load_image": "1e7fe0934147727dbb4029266431b769",
        "leakpipe.pipeline.engine.images:to_model_range": "21803b5fd63fc17390413aaa45e9b38c",
        "leakpipe.pipeline.engine.encoding:encode_batch": "0fa6ead6cd301fd2bcd7a72578fae54d",
        "leakpipe.pipeline.engine.vae:load_vae": "85f236eca392807c738c0a70d4384515",
        "leakpipe.pipeline.nn.pixels": "b173b7fcb889b7b1912d7899a92371e9",
    },
    "train-3": {
        "leakpipe.pipeline.math.diffusion": "c5a82dc2580b80a6092be7cb71f932c5",
        "leakpipe.pipeline.math.dct": "04ae1ca775d06d602d424a8b7f0a3d24",
        "leakpipe.pipeline.math.features": "9c9b59e031a72b9afb35bd1d56bc5636",
        "leakpipe.pipeline.math.kmeans": "f945bfeaa1cca28452304c08694cba82",
        "leakpipe.pipeline.nn.model": "bbe47e12cb10afdd53aca11d218b0dbb",
        "leakpipe.pipeline.nn.backbones": "e169a37d5c552698275a574436c09ce6",
        "leakpipe.pipeline.engine.data": "b7bbf1a02dd947ce608a0fa7b75b3980",
        "leakpipe.pipeline.engine.training": "1545ddf49682f61d841e4576530c66d2",
        "leakpipe.pipeline.engine.fit": "4b7101f83dcd6815f6efb1d707607f73",
        "leakpipe.pipeline.engine.precision": "4832fc6fc6d21700c9d37d5b95beb448",
        "leakpipe.pipeline.engine.ddp": "db2da40f39a2854eb788ec0707fc6ab7",
        "leakpipe.pipeline.engine.trained:build_model": "8ca363af6927d7785c251dbf8c92946b",
        "leakpipe.pipeline.engine.trained:init_backbone": "95f1e15918597722adea21fe190248c7",
    },
    "embed-2": {
        "leakpipe.pipeline.math.diffusion": "c5a82dc2580b80a6092be7cb71f932c5",
        "leakpipe.pipeline.math.dct": "04ae1ca775d06d602d424a8b7f0a3d24",
        "leakpipe.pipeline.math.features": "9c9b59e031a72b9afb35bd1d56bc5636",
        "leakpipe.pipeline.nn.model": "bbe47e12cb10afdd53aca11d218b0dbb",
        "leakpipe.pipeline.nn.backbones": "e169a37d5c552698275a574436c09ce6",
        "leakpipe.pipeline.engine.data": "b7bbf1a02dd947ce608a0fa7b75b3980",
        "leakpipe.pipeline.engine.training:predict": "5a8dbbd8803c25a70cd5fe566d96b44a",
        "leakpipe.pipeline.engine.precision:autocast": "eb4f0ba07499312764dc23cc48553166",
        "leakpipe.pipeline.engine.trained:model_from": "3ca45162e37a03f8be8abafddb735627",
        "leakpipe.pipeline.store.embeddings": "8bb889eda8035d306c7fe962c7db3faa",
    },
}


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
    return [
        f"code changed: {e}"
        + ("" if e in was else " (newly part of the stage)")
        + ("" if e in now else " (no longer part of the stage)")
        for e in sorted(set(was) | set(now))
        if was.get(e) != now.get(e)
    ]
