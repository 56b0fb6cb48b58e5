"""Writes pipeline/ledger/declared_code.json, the table that keeps results valid across the change from
declared to derived code identities (docs/developer.md, "Code identity"). For each stage: the identity an
earlier leakpipe recorded of the entries the stage declared at git revision REV, and the identity derived
from the same source; a lock that records the first is read as recording the second.

    .venv/bin/python tests/declared_code.py REV

Both are hashed from the source checked out now: a lock written at REV matches only where every entry
it declared is unchanged since (the rest of the code is taken to be REV's, as the declared lists took it).
"""

import ast
import json
import subprocess
import sys

from leakpipe.pipeline.ledger import code
from leakpipe.stages import STAGES


def declared_entries(rev: str, stage: str) -> tuple[str, ...]:
    """The CODE tuple of stages/STAGE.py at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:stages/{stage}.py"], capture_output=True, text=True, check=True
    ).stdout
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CODE" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"stages/{stage}.py at {rev} declares no CODE")


def main(rev: str) -> None:
    table = {
        name: {"declared": code.declared_identity(declared_entries(rev, name)), "derived": code.identity(stage.code)}
        for name, stage in STAGES.items()
    }
    code.DECLARED_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
