"""A manifest's rows as columns: parsing, path normalisation and validation without Python work per
row beyond a few C-level string operations (GenImage has 1.35 M rows: each microsecond per row is a
second). Rows that might have a problem are found first, in bulk; only those go through the
row-by-row checks that word the messages, so the messages are the same as before.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import stat

import numpy as np

# Substrings of "\n" + "\n".join(paths) + "\n" that mark a path normpath could change (or empty it)
_ODD = ("\\", "//", "/./", "/../", "\n./", "\n../", "/.\n", "/..\n", "\n.\n", "\n..\n", "/\n", "\n\n", "\n/")
_LISTED = 8  # a folder with at least this many rows is listed once (os.scandir), not lstat'ed per row


def parse(body: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """(header, {column: values}) of the CSV text after the comment lines; values of every column but
    `path` are stripped, missing fields are "" and extra fields dropped (as csv.DictReader reads it)."""
    if '"' in body or "\r" in body:  # quoting or \r line ends: the csv module's rules apply
        return _parse_csv(body)
    lines = body.split("\n")
    header = lines[0].split(",") if lines[0] else []
    fields = [ln.split(",") for ln in lines[1:] if ln]  # csv skips empty lines
    if fields and set(map(len, fields)) != {len(header)}:
        fields = [(f + [""] * len(header))[:len(header)] for f in fields]
    values = list(zip(*fields)) if fields else [()] * len(header)
    return tuple(header), _columns(header, [list(v) for v in values])


def _parse_csv(body: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    reader = csv.reader(io.StringIO(body, newline=""))
    header = next(reader, [])
    rows = [(r + [""] * len(header))[:len(header)] for r in reader if r]
    return tuple(header), _columns(header, [list(v) for v in zip(*rows)] if rows else [[] for _ in header])


def _columns(header: list[str], values: list[list[str]]) -> dict[str, list[str]]:
    cols = {}
    for name, col in zip(header, values):  # a repeated name: the last one wins, as in DictReader
        cols[name] = col if name == "path" else list(map(str.strip, col))
    return cols


def _rows_at(joined: str, starts: np.ndarray, needle: str) -> list[int]:
    """Rows of the joined paths where `needle` occurs."""
    hits, at = [], joined.find(needle)
    while at >= 0:
        hits.append(at + (needle[0] == "\n"))  # a leading separator belongs to the row before
        at = joined.find(needle, at + 1)
    return (np.searchsorted(starts, np.array(hits), side="right") - 1).tolist() if hits else []


def odd_rows(paths: list[str]) -> list[int]:
    """Sorted rows whose path normalisation could change, or which are absolute or blank; every other
    path is already what posixpath.normpath makes of it."""
    joined = "\n" + "\n".join(paths) + "\n"
    if joined.count("\n") != len(paths) + 1:
        return list(range(len(paths)))  # a quoted line break in a path: the joined form cannot locate rows
    starts = 1 + np.concatenate([[0], np.cumsum(np.fromiter(map(len, paths), np.int64, len(paths)) + 1)[:-1]])
    found = {i for needle in _ODD if needle in joined for i in _rows_at(joined, starts, needle)}
    found |= set(np.flatnonzero(np.fromiter(map(str.isspace, paths), bool, len(paths))).tolist())
    return sorted(found)


def normalise(path: str) -> str:
    """'./x', 'a//x', 'b/../a/x' and 'a\\x' -> 'a/x'; blank -> ''."""
    norm = posixpath.normpath(path.replace("\\", "/")) if path.strip() else ""
    return "" if norm == "." else norm


def suspects(m, check_files: bool) -> list[int]:
    """Sorted rows that may break a rule of `validation_problems` (every other row breaks none):
    an empty path, label or unknown partition; a path that is absolute or climbs out of the root;
    one in a folder that resolves outside the root; a symbolic link (it may point outside); and
    with `check_files`, one that is not a regular file in its folder's listing."""
    from leakpipe.pipeline.manifest import PARTITIONS

    paths, n = m.column("path"), len(m)
    out = set(np.flatnonzero(np.array(paths, dtype=object) == "").tolist()) if "" in paths else set()
    if "" in m.column("label"):
        out |= set(np.flatnonzero(np.array(m.column("label"), dtype=object) == "").tolist())
    if set(m.column("partition")) - set(PARTITIONS):
        out |= {i for i, p in enumerate(m.column("partition")) if p not in PARTITIONS}
    climbs = {i for i in odd_rows(paths) if paths[i] == ".." or paths[i].startswith(("../", "/"))}
    groups: dict[str, list[int]] = {}
    for i, (folder, _, _) in enumerate(map(str.rpartition, paths, ["/"] * n)):
        groups.setdefault(folder, []).append(i)
    for folder, rows in groups.items():
        out |= set(rows) if _outside(m.root, folder) else _odd_files(m, folder, rows, check_files)
    return sorted(out | climbs)


def _outside(root, folder: str) -> bool:
    real, top = os.path.realpath(os.path.join(root, folder)), str(root)
    return not (real == top or real.startswith(top.rstrip("/") + "/"))


def _odd_files(m, folder: str, rows: list[int], check_files: bool) -> set[int]:
    """Rows of one folder whose file is a symbolic link, or (check_files) not a regular file."""
    full = os.path.join(str(m.root), folder)
    paths, skip = m.column("path"), len(folder) + 1 if folder else 0
    if len(rows) >= _LISTED:
        try:
            with os.scandir(full) as it:  # d_type: no stat per entry
                regular = {e.name for e in it if e.is_file(follow_symlinks=False)}
            rows = [i for i in rows if paths[i][skip:] not in regular]
        except OSError:  # missing, not a folder, unreadable: each row says which
            pass
    kinds = {i: _kind(os.path.join(full, paths[i][skip:])) for i in rows}
    return {i for i, k in kinds.items() if k == "link" or (check_files and k != "file")}


def _kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    return "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"
