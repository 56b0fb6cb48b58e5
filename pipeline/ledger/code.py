"""Code identity: the code a stage's outputs are made by, hashed from its source.

A stage declares the roots of its code (`leakpipe.stages.train:work`); its code is every top-level
function, class and constant those roots reach through names and imports, lazy ones too, across
leakpipe's modules (ledger/reach.py), except in the modules of NOT_OUTPUTS, which cannot change what a
stage writes. Its identity is {"module:name": blake2b-128 of that unit's normalised source}: parsed,
docstrings and type annotations dropped (a class's fields aside) and printed back by `ast.unparse`, so
comments, docstrings, formatting and types do not count and any change to what runs does. Sources are
read, never imported, so `leakpipe status` stays fast.

Locks written by earlier leakpipes hold earlier forms, each read as the identity that replaced it for as
long as the code is the same: a code version label (`train-3`, LEGACY), and the identity of a hand-declared
list of entries (whole modules and single functions; declared_code.json). Upgrades (code_upgrades.json)
then carry an identity across unit edits checked bitwise to leave every output the same.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Iterator
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import reach
from leakpipe.pipeline.store.hashing import hash_bytes

# The modules whose code cannot change a stage's outputs, with the reason: a stage's identity leaves them
# out, and does not follow what they call. tests/test_code_identity.py fails on a module a stage imports
# that is in neither its identity nor this list.
NOT_OUTPUTS = {
    "leakpipe.pipeline.errors": "error messages: an error stops a stage before it writes its lock",
    "leakpipe.pipeline.progress": "progress lines on stderr",
    "leakpipe.pipeline.config": "the settings: the values a stage reads are recorded as its inputs (its KEYS)",
    "leakpipe.pipeline.config_files": "reads leakpipe.toml and --set into the settings (recorded as values)",
    "leakpipe.pipeline.manifest": "reads manifests: the rows a stage reads are recorded as its inputs "
    "(paths, labels, partitions, content hashes)",
    "leakpipe.pipeline.workspace": "where a workspace's files are, not what they hold",
    "leakpipe.pipeline.ledger.locks": "lock files: what a stage's outputs were made from, and their checksums",
    "leakpipe.pipeline.ledger.stage": "the runner: when a stage works, never what it computes",
    "leakpipe.pipeline.ledger.graph": "plans stages: what it hands a stage (a manifest, a store, a result's "
    "config) is recorded as that stage's inputs",
    "leakpipe.pipeline.ledger.runs": "run names and the run cache's folders",
    "leakpipe.pipeline.store.atomic": "writes files whole or not at all: where bytes land, never which",
    "leakpipe.pipeline.store.locking": "locks between processes",
    "leakpipe.pipeline.store.storage": "file access, local or at an fsspec URL",
    "leakpipe.pipeline.store.hashing": "checksums of inputs and outputs, and their cache",
    "leakpipe.pipeline.store.stats": "stats of input files: whether they changed, never what a stage computes",
    "leakpipe.pipeline.store.chunk_checks": "which chunks of a store are already done (resuming encode)",
    "leakpipe.pipeline.engine.tboard": "TensorBoard event files: a log beside a result, never read back",
    "leakpipe.pipeline.engine.attributor_schema": "checks an export's and a result's recorded values against what "
    "their math can use: it refuses, never computes",
    "leakpipe.pipeline.engine.distributed": "schedules encode on dask workers, each calling encode's code",
    "leakpipe.stages.encode": "picks the rows to encode, resumes, reports failures: a row's latents are made "
    "by the code encode's CODE names, so a change here never re-encodes a cache",
}


def identity(roots: tuple[str, ...]) -> dict[str, str]:
    """{"module:name": hash of its normalised source} of every unit the roots reach (NOT_OUTPUTS aside)."""
    return reach.reach(roots, frozenset(NOT_OUTPUTS))


# ---------------------------------------------------------------- earlier forms
def normalised(source: str, name: str | None = None) -> str:
    """The source (or its top-level function or class `name`) without comments, docstrings and
    formatting: what `ast.unparse` prints of its syntax tree."""
    tree = ast.parse(source)
    tree.body = reach.strip_docstrings(tree.body)
    if name is None:
        return ast.unparse(tree)
    found = [
        n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
    ]
    if not found:
        raise UserError(f"code entry {name!r}: no top-level function or class of that name")
    return ast.unparse(found[0])


@functools.lru_cache(maxsize=None)
def _entry_hash(entry: str, mtime_ns: int) -> str:  # mtime in the key: an edit in this process counts
    module, _, name = entry.partition(":")
    text = normalised(reach.source_path(module).read_text(), name or None)
    return hash_bytes(text.encode())


def declared_identity(entries: tuple[str, ...]) -> dict[str, str] | None:
    """The identity an earlier leakpipe recorded for hand-declared entries (a module, or one top-level
    function or class of it), of today's source; None if an entry is no longer there."""
    paths = {e: reach.source_path(e.partition(":")[0]) for e in entries}
    try:
        return {e: _entry_hash(e, p.stat().st_mtime_ns) for e, p in paths.items()} if all(paths.values()) else None
    except UserError:
        return None


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

DECLARED_FILE = Path(__file__).with_name("declared_code.json")


@functools.lru_cache(maxsize=1)
def declared() -> dict[str, dict[str, dict[str, dict[str, str]]]]:
    """{git commit: {stage: {"declared": the identity leakpipe at that commit recorded of the entries the
    stage listed by hand, "derived": the identity derived from the same source}}}, made by
    tests/declared_code.py: a lock that holds the declared identity is read as holding the derived one."""
    return json.loads(DECLARED_FILE.read_text())


def _pairs() -> list[dict[str, dict[str, str]]]:
    return [pair for stages in declared().values() for pair in stages.values()]


UPGRADES_FILE = Path(__file__).with_name("code_upgrades.json")


@functools.lru_cache(maxsize=1)
def upgrades() -> list[dict]:
    """[{"before": {unit: hash, or None: absent}, "after": {...}, "why", "commit", "stages"}], in the order
    they were recorded, made by tests/code_upgrade.py after benchmarks/bitwise.py found the outputs equal:
    each says that these unit edits leave every output of the stages that run them the same."""
    return json.loads(UPGRADES_FILE.read_text())


def upgraded(code: dict[str, str]) -> dict[str, str]:
    """A derived identity carried through each upgrade, in order, whose `before` units it holds as they
    were (a unit `before` gives as None: one it does not hold); the others leave it alone."""
    for up in upgrades():
        if all(code.get(unit) == h for unit, h in up["before"].items()):
            code = {unit: h for unit, h in {**code, **up["after"]}.items() if h is not None}
    return code


def recorded(lock_code) -> dict[str, str] | None:
    """The code identity a lock records, an earlier form read as the identity that replaced it (a legacy
    label through LEGACY, then a declared identity through declared_code.json, then the upgrades since);
    None if unknown."""
    code = LEGACY.get(lock_code) if isinstance(lock_code, str) else lock_code
    if not isinstance(code, dict):
        return None
    code = next((p["derived"] for p in _pairs() if p["declared"] == code), code)
    return upgraded(code) if derived(code) else code


def _earlier_forms() -> Iterator[str | dict[str, str]]:
    """What earlier leakpipes recorded, earliest first: legacy labels, declared identities, the derived
    identities of the declared table's commits."""
    yield from LEGACY
    yield from (p["declared"] for p in _pairs())
    yield from (p["derived"] for p in _pairs())


def _undone(current: dict[str, str], stage: str | None) -> list[dict[str, str]]:
    """The identities the upgrades recorded for `stage` carried to `current`, earliest first: each of them
    whose `after` units it holds as they are, undone, the latest first. A stage whose code changed its
    outputs since the declared table (score: its numbers) records its own identity, and its upgrades since
    start from that."""
    forms, code = [], current
    for up in reversed(upgrades()):
        if stage in up.get("stages", ()) and all(code.get(unit) == h for unit, h in up["after"].items()):
            code = {unit: h for unit, h in {**code, **up["before"]}.items() if h is not None}
            forms.append(code)
    return forms[::-1]


def stored_form(current: dict[str, str], stage: str | None = None) -> str | dict[str, str]:
    """What a lock (and a fingerprint, a store's folder name) records for `stage`'s current identity: the
    earliest form read as it (the code it stood for, upgraded: a table's, else the one `stage`'s upgrades
    started from), so that upgrading leakpipe keeps every stored output valid, else the identity itself."""
    forms = [*_earlier_forms(), *_undone(current, stage)]
    return next((form for form in forms if recorded(form) == current), current)


def derived(code: dict[str, str]) -> bool:
    """Whether an identity was derived, not declared: a declared one names whole modules too (every
    stage declared one), a derived one only functions, classes and constants ("module:name")."""
    return all(":" in e for e in code)


def _declared_changes(code: dict[str, str]) -> list[str]:
    """An identity of declared entries not read as a derived one (a lock older than the declared table):
    the entries whose code differs today, or what else it may be."""
    now = declared_identity(tuple(code))
    if now is None:
        return ["code changed: an entry the stage declared then is gone"]
    return [f"code changed: {e}" for e in sorted(code) if now[e] != code[e]] or [
        "code changed: code the stage's declared entries did not cover (this lock was written before code "
        "identities were derived from the imports)"
    ]


def changed(old, new) -> list[str]:
    """The code that differs between a lock's record and the current one (each an identity or an earlier
    form), in words: one reason per module, naming its functions, classes and constants."""
    was, now = recorded(old), recorded(new)
    if was is None or now is None:
        return [f"code: {old if was is None else 'this version'} -> {new if now is None else 'this version'}"]
    if not derived(was) or not derived(now):
        return _declared_changes(now if derived(was) else was)
    by_module: dict[str, list[str]] = {}
    for e in sorted(set(was) | set(now)):
        if was.get(e) != now.get(e):
            module, _, name = e.partition(":")
            by_module.setdefault(module, []).append(
                name + ("" if e in was else " (newly part of the stage)") + ("" if e in now else " (no longer part)")
            )
    return [f"code changed: {m}: {', '.join(names)}" for m, names in by_module.items()]
