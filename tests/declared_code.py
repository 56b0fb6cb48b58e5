"""Adds a git revision's code identities to pipeline/ledger/declared_code.json, the table that keeps
results valid across the change from declared to derived code identities (docs/developer.md, "Code
identity"). For each stage, both hashed from the source at revision REV: the identity leakpipe at REV
recorded of the entries the stage declared (its CODE list), and the identity derived from the same source
with this leakpipe's roots and NOT_OUTPUTS. A lock written at REV records the first and is read as the
second: valid exactly while every unit the stage reaches is as it was at REV.

    .venv/bin/python tests/declared_code.py REV   # a commit whose stages still list their CODE entries
"""

import ast
import contextlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from leakpipe.pipeline.ledger import code, reach
from leakpipe.stages import STAGES

FOLDERS = ("pipeline", "stages", "workflows")
CHECKOUT = Path(__file__).resolve().parents[1]


def declared_entries(rev: str, stage: str) -> tuple[str, ...]:
    """The CODE tuple of stages/STAGE.py at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:stages/{stage}.py"], capture_output=True, text=True, check=True, cwd=CHECKOUT
    ).stdout
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CODE" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"stages/{stage}.py at {rev} declares no CODE")


@contextlib.contextmanager
def source_at(rev: str):
    """Inside it, ledger/reach.py reads leakpipe's source as it was at git revision `rev` (a copy of it)."""
    archive = subprocess.run(["git", "archive", rev, *FOLDERS], capture_output=True, check=True, cwd=CHECKOUT).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp, filter="data")
        saved = reach._package_dir
        reach._package_dir = lambda package: Path(tmp) / package.split(".", 1)[1]  # leakpipe.stages -> stages
        _forget()
        try:
            yield
        finally:
            reach._package_dir = saved
            _forget()


def identities_at(rev: str) -> dict:
    """{stage: {"declared": ..., "derived": ...}} of the source at `rev`, read from a copy of it."""
    with source_at(rev):
        return {
            name: {"declared": code.declared_identity(declared_entries(rev, name)), "derived": code.identity(roots)}
            for name, roots in ((name, stage.code) for name, stage in STAGES.items())
        }


def _forget() -> None:
    """Drop what was read of one source tree before reading another."""
    for cached in (reach.source_path, reach._parse, code._entry_hash):
        cached.cache_clear()
    reach._REACHED.clear()  # what a walk reached, checked against the mtimes of the other tree's files


def main(rev: str) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", rev], capture_output=True, text=True, check=True, cwd=CHECKOUT
    ).stdout.strip()
    table = json.loads(code.DECLARED_FILE.read_text()) if code.DECLARED_FILE.exists() else {}
    table[commit] = identities_at(commit)
    code.DECLARED_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
