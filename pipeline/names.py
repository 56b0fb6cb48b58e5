"""Names a user gives (splits, run names): each names files and folders, so it cannot hold a path."""

from __future__ import annotations

import re

from leakpipe.pipeline.errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str, kind: str, names: str) -> str:
    """`name` if it is a valid name, else an error saying what a `kind` name may hold and what it
    `names` (for the message: "manifests/NAME.csv")."""
    if not NAME.fullmatch(name or ""):
        raise UserError(
            f"{kind} name {name!r}: use letters, digits, '.', '_' and '-' (up to 100, starting "
            f"with a letter or digit); it names {names}"
        )
    return name
