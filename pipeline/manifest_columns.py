"""A manifest's rows as columns: parsing, path normalisation and validation without Python work per
row beyond a few C-level string operations (GenImage has 1.35 M rows: each microsecond per row is a
second). Rows that might have a problem are found first, in bulk; only those go through the
row-by-row checks that word the messages, so the messages are the same as before.
"""

from __future__ import annotations

import csv
import io
import itertools
import operator
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
    first, _, data = body.partition("\n")
    header = first.split(",") if first else []
    values = _fields(data, len(header))
    return tuple(header), _columns(header, values)


def _fields(data: str, n_cols: int) -> list[list[str]]:
    """Columns of unquoted CSV lines: when every line has n_cols fields (the usual case), one split
    of the whole text and a slice per column; else line by line, padded or cut to n_cols."""
    data = data if data.endswith("\n") or not data else data + "\n"
    if n_cols and data and "\n\n" not in data and not data.startswith("\n"):
        raw = np.frombuffer(data.encode(), np.uint8)  # "," and "\n" are single bytes in UTF-8
        commas, ends = np.flatnonzero(raw == 44), np.flatnonzero(raw == 10)
        if np.all(np.diff(np.searchsorted(commas, np.r_[-1, ends])) == n_cols - 1):
            flat = data[:-1].replace("\n", ",").split(",")
            return [flat[k::n_cols] for k in range(n_cols)]
    rows = [(f + [""] * n_cols)[:n_cols] for f in (ln.split(",") for ln in data.split("\n") if ln)]
    return [list(v) for v in zip(*rows)] if rows else [[] for _ in range(n_cols)]


def _parse_csv(body: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    reader = csv.reader(io.StringIO(body, newline=""))
    header = next(reader, [])
    rows = [(r + [""] * len(header))[: len(header)] for r in reader if r]
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
    needles = [needle for needle in _ODD if needle in joined]
    found = set()
    if needles:
        starts = 1 + np.concatenate([[0], np.cumsum(np.fromiter(map(len, paths), np.int64, len(paths)) + 1)[:-1]])
        found = {i for needle in needles for i in _rows_at(joined, starts, needle)}
    found |= set(np.flatnonzero(np.fromiter(map(str.isspace, paths), bool, len(paths))).tolist())
    return sorted(found)


def normalise(path: str) -> str:
    """'./x', 'a//x', 'b/../a/x' and 'a\\x' -> 'a/x'; blank -> ''."""
    norm = posixpath.normpath(path.replace("\\", "/")) if path.strip() else ""
    return "" if norm == "." else norm


def suspects(m, check_files: bool, partitions: tuple[str, ...]) -> list[int]:
    """Sorted rows that may break a rule of `validation_problems` (every other row breaks none):
    an empty path, label or unknown partition; a path that is absolute or climbs out of the root;
    one in a folder that resolves outside the root; a symbolic link (it may point outside); and
    with `check_files`, one that is not a regular file in its folder's listing."""
    paths, n = m.column("path"), len(m)
    out = set(np.flatnonzero(np.array(paths, dtype=object) == "").tolist()) if "" in paths else set()
    if "" in m.column("label"):
        out |= set(np.flatnonzero(np.array(m.column("label"), dtype=object) == "").tolist())
    if set(m.column("partition")) - set(partitions):
        out |= {i for i, p in enumerate(m.column("partition")) if p not in partitions}
    climbs = {i for i in odd_rows(paths) if paths[i] == ".." or paths[i].startswith(("../", "/"))}
    for folder, runs in _folder_runs(paths).items():
        if _outside(m.root, folder):
            out |= {i for a, b in runs for i in range(a, b)}
        else:
            out |= _odd_files(m, folder, runs, check_files)
    return sorted(out | climbs)


def _folder_runs(paths: list[str]) -> dict[str, list[tuple[int, int]]]:
    """{folder: [(start, stop), ...]}: the runs of consecutive rows in each folder (a manifest lists
    a folder's files together, so there are few)."""
    if not paths:
        return {}
    folders = np.array(
        list(map(operator.itemgetter(0), map(str.rpartition, paths, itertools.repeat("/")))), dtype=object
    )
    cuts = np.flatnonzero(folders[1:] != folders[:-1]) + 1
    runs: dict[str, list[tuple[int, int]]] = {}
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(paths)]):
        runs.setdefault(folders[a], []).append((a, b))
    return runs


def _outside(root, folder: str) -> bool:
    real, top = os.path.realpath(os.path.join(root, folder)), str(root)
    return not (real == top or real.startswith(top.rstrip("/") + "/"))


def _odd_files(m, folder: str, runs: list[tuple[int, int]], check_files: bool) -> set[int]:
    """Rows of one folder whose file is a symbolic link, or (check_files) not a regular file."""
    full = os.path.join(str(m.root), folder)
    paths, prefix = m.column("path"), f"{folder}/" if folder else ""
    rows = [i for a, b in runs for i in range(a, b)]
    if len(rows) >= _LISTED:
        try:
            with os.scandir(full) as it:  # d_type: no stat per entry
                regular = {prefix + e.name for e in it if e.is_file(follow_symlinks=False)}
            rows = [i for a, b in runs if set(paths[a:b]) - regular for i in range(a, b) if paths[i] not in regular]
        except OSError:  # missing, not a folder, unreadable: each row says which
            pass
    kinds = {i: _kind(os.path.join(str(m.root), paths[i])) for i in rows}
    return {i for i, k in kinds.items() if k == "link" or (check_files and k != "file")}


def _kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    return "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"
