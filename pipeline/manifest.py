"""Manifests: one CSV row per image (path, label, partition, variant, and optional extra columns).

File format:

    # leakpipe manifest v1
    # root: ../data/closed          (relative to this file's folder, or absolute)
    path,label,partition,variant
    sd21/0001.png,sd21,train,raw

The row key is `path`; the content key is the file's hash (computed by the stages, not stored).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import random
import re
from collections import Counter
from pathlib import Path

from leakpipe.pipeline import manifest_columns as columnar
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.store.hashing import hash_bytes
from leakpipe.pipeline.config import canonical_hash
from leakpipe.pipeline import names
from leakpipe.pipeline.errors import UserError

REQUIRED = ("path", "label", "partition", "variant")
PARTITIONS = ("train", "val", "test", "")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
HEADER = "# leakpipe manifest v1"


class ManifestError(UserError):
    """Every problem found in a manifest, one per line, with line numbers."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        super().__init__(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))


class Manifest:
    """A manifest's rows, kept as one list of strings per column (`rows`, a list of dicts, is made on
    first use: a million dicts cost a second, and most callers only need a column or two)."""

    def __init__(
        self,
        name: str,
        root: Path,
        rows: list[dict] | None = None,
        columns: tuple[str, ...] = REQUIRED,
        source: Path | None = None,
        first_line: int = 4,
        cols: dict[str, list[str]] | None = None,
    ):
        self.name, self.root, self.columns, self.source = name, root, tuple(columns), source
        self.first_line = first_line  # file line of row 0, for messages
        self.digest = ""  # blake2b of the file's bytes, when read from one
        if cols is None:
            rows = list(rows or [])
            cols = {
                c: [r.get(c, "") for r in rows] for c in dict.fromkeys([*columns, *(k for r in rows[:1] for k in r)])
            }
        self._cols, self._rows = cols, rows
        self._n = len(next(iter(cols.values()))) if cols else 0

    @property
    def rows(self) -> list[dict]:
        if self._rows is None:
            names = list(self._cols)
            self._rows = [dict(zip(names, values)) for values in zip(*self._cols.values())]
        return self._rows

    def __len__(self) -> int:
        return self._n

    def column(self, name: str) -> list[str]:
        """The column's values, row by row (the manifest's own list: do not modify it)."""
        return self._cols[name]

    def has_column(self, name: str) -> bool:
        return name in self._cols

    def abspath(self, i: int) -> Path:
        return self.root / self._cols["path"][i]

    def abspaths(self) -> list[str]:
        """Every row's file as an absolute path string (the root is resolved, paths normalised)."""
        prefix = f"{self.root}/"
        return [prefix + p for p in self._cols["path"]]

    def line(self, i: int) -> int:
        return self.first_line + i

    def rows_hash(self) -> str:
        """Hash of the rows (all columns, in order): changes when anything in the file changes."""
        return canonical_hash([list(values) for values in zip(*(self._cols[c] for c in self.columns))])

    def labels(self) -> list[str]:
        """Sorted class names of the rows that have a partition (the closed-set classes)."""
        return sorted(set(self._cols["label"]))


def manifest_path(manifests_dir: Path, name: str) -> Path:
    return Path(manifests_dir) / f"{name}.csv"


def check_name(name: str) -> str:
    """A split name names a file in manifests/ and folders in cache/: it cannot hold a path."""
    return names.check_name(name, "split", "manifests/NAME.csv")


def _root(path: Path, text: str) -> Path:
    root = (Path(text) if os.path.isabs(text) else path.parent / text).resolve()
    if root == Path(root.anchor):
        raise ManifestError(
            str(path),
            [
                f"root {text!r} is the filesystem root; the root must be the "
                "folder that holds the images (fix the '# root:' line)"
            ],
        )
    if not root.is_dir():
        raise ManifestError(
            str(path), [f"root {text!r} ({root}) is not a folder; fix the '# root:' line or move the images back"]
        )
    return root


def _header(text: str) -> tuple[dict, int, int]:
    """(the leading '# key: value' comments, how many lines they are, where the CSV starts)."""
    comments, n_comment, offset = {}, 0, 0
    while text.startswith("#", offset):
        end = text.find("\n", offset)
        line = text[offset : end if end >= 0 else len(text)].rstrip("\r")
        key, _, value = line[1:].partition(":")
        comments[key.strip()] = value.strip()
        n_comment, offset = n_comment + 1, (end + 1 if end >= 0 else len(text))
    return comments, n_comment, offset


def root_of(path: Path, data: bytes) -> Path | None:
    """The folder a manifest's rows are relative to, as `read_manifest` resolves it from the manifest's
    bytes `data` (only its leading comment lines are decoded); None where it would refuse it."""
    lines = data.split(b"\n", 64)
    head = b"\n".join(
        lines[: next((k for k, ln in enumerate(lines) if not ln.lstrip(b"\xef\xbb\xbf").startswith(b"#")), len(lines))]
    )
    try:
        return _root(Path(path), _header(head.decode("utf-8-sig"))[0].get("root", "."))
    except (ManifestError, UnicodeDecodeError):
        return None


def read_manifest(path: Path, validate: bool = True, check_files: bool = True) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise ManifestError(
            str(path), ["file does not exist; build it with `leakpipe manifest build ROOT --split NAME`"]
        )
    # only "\n" ends a line: \r and U+2028 may be part of a (quoted) file name
    data = path.read_bytes()
    text = data.decode("utf-8-sig")
    comments, n_comment, offset = _header(text)
    root = _root(path, comments.get("root", "."))
    columns, cols = columnar.parse(text[offset:])
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ManifestError(
            str(path),
            [
                f"line {n_comment + 1}: missing column(s) {', '.join(missing)};"
                f" the header must name {', '.join(REQUIRED)}"
            ],
        )
    m = Manifest(name=path.stem, root=root, columns=columns, source=path, first_line=n_comment + 2, cols=cols)
    m.digest = hash_bytes(data)
    problems = _normalise_paths(m)
    if validate:
        problems += validation_problems(m, check_files)
    if problems:
        raise ManifestError(str(path), problems)
    return m


class Deferred:
    """A manifest whose rows are read from its file on first use; its length is known before (from a
    lock that lists them: a plan that finds nothing changed needs no more of it)."""

    def __init__(self, path: Path, n_rows: int, **read):
        self._path, self._n, self._read = Path(path), n_rows, read
        self._loaded: Manifest | None = None

    def __len__(self) -> int:
        return self._n

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._loaded is None:
            self._loaded = read_manifest(self._path, **self._read)
        return getattr(self._loaded, name)


def _normalise_paths(m: Manifest) -> list[str]:
    """One file, one row: './x', 'a//x' and 'b/../a/x' all become 'a/x'; a second row naming the
    same file is an error (it could sit in two partitions under two labels)."""
    paths = m.column("path")
    given = {i: paths[i] for i in columnar.odd_rows(paths)}
    for i, p in given.items():
        paths[i] = columnar.normalise(p)
    if len(set(paths)) + max(paths.count("") - 1, 0) == len(paths):  # every non-empty path once
        return []
    problems, seen = [], {}
    for i, p in enumerate(paths):
        if p in seen and p:
            written = given.get(i, p)
            alias = "" if written == p else f", written here as {written!r}"
            problems.append(
                f"line {m.line(i)}: duplicate path {p!r} (first on line {seen[p]}{alias}); keep one row per file"
            )
        seen.setdefault(p, m.line(i))
    return problems


def validation_problems(m: Manifest, check_files: bool = True) -> list[str]:
    """All problems at once: unknown partitions, empty labels, escaping or missing paths. Rows are
    screened in bulk (`manifest_columns.suspects`); only suspects are checked one by one."""
    return [msg for i in columnar.suspects(m, check_files, PARTITIONS) for msg in _row_problems(m, i, check_files)]


def _row_problems(m: Manifest, i: int, check_files: bool) -> list[str]:
    where, p = f"line {m.line(i)}", m.column("path")[i]
    label, partition = m.column("label")[i], m.column("partition")[i]
    if not p:
        return [f"{where}: empty path"]
    problems = [f"{where}: empty label for {p!r}"] if not label else []
    if partition not in PARTITIONS:
        problems.append(f"{where}: unknown partition {partition!r} for {p!r}; expected train, val, test or empty")
    full = (m.root / p).resolve()
    if os.path.isabs(p) or not full.is_relative_to(m.root):
        problems.append(f"{where}: path {p!r} escapes the manifest root {m.root}")
    elif check_files and full.is_dir():
        problems.append(f"{where}: a folder, not an image file: {full}")
    elif check_files and not full.is_file():
        problems.append(f"{where}: file not found: {full}")
    return problems


def _csv_line(values: list[str]) -> str:
    """One CSV line ending in "\\n"; a field holding \\r is quoted (csv quotes only the characters of
    its line terminator, so it writes with "\\r\\n" and the terminator is swapped after)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()[:-2] + "\n"


def write_manifest(path: Path, root: Path, rows: list[dict], columns=REQUIRED) -> None:
    path = Path(path)
    root_rel = os.path.relpath(Path(root).resolve(), path.parent.resolve())
    cols = [[str(r.get(c, "")) for r in rows] for c in columns]
    if any(ch in "\0".join(col) for col in [list(columns), *cols] for ch in ',"\r\n'):  # some need quoting
        body = [_csv_line([col[i] for col in cols]) for i in range(len(rows))]
    else:  # nothing to quote (the usual case): no csv writer per row
        body = [",".join(values) + "\n" for values in zip(*cols)]
    atomic_write_text(path, "".join([f"{HEADER}\n# root: {root_rel}\n", _csv_line(list(columns)), *body]))


def scan_tree(root: Path) -> dict[str, list[str]]:
    """{label: [relative paths]} for a folder-per-generator tree (nested folders included; links to
    files count, links to folders are not followed)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(str(root), ["not a folder; expected ROOT/<generator>/<images>"])
    tree = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(_images_under(str(d), d.name + "/"))
        if files:
            tree[d.name] = files
    if not tree:
        raise ManifestError(
            str(root),
            [f"no images ({', '.join(IMAGE_SUFFIXES)}) in any sub-folder; expected ROOT/<generator>/<images>"],
        )
    return tree


def _images_under(folder: str, rel: str) -> list[str]:
    """Relative paths (prefixed by `rel`) of the image files under `folder`, by os.scandir: the
    directory entries say which are folders and files, so only links cost a stat."""
    out, stack = [], [(folder, rel)]
    while stack:
        here, prefix = stack.pop()
        with os.scandir(here) as it:
            entries = list(it)
        stack += [(e.path, f"{prefix}{e.name}/") for e in entries if e.is_dir(follow_symlinks=False)]
        names = [e.name for e in entries if _is_image_name(e.name.lower()) and e.is_file()]
        out += [prefix + name for name in names]
    return out


def _is_image_name(low: str) -> bool:
    """What Path(name).suffix.lower() in IMAGE_SUFFIXES says ('.png' alone has no suffix)."""
    return low.endswith(IMAGE_SUFFIXES) and low not in IMAGE_SUFFIXES


def partition_by_ratio(
    tree: dict[str, list[str]], ratios=(0.5, 0.2, 0.3), seed: int = 0, groups: dict[str, str] | None = None
) -> dict:
    """{path: partition}: a seeded shuffle per class split train/val/test by `ratios`. With `groups`
    ({path: group}), whole groups are shuffled and assigned across all classes, so one group (a
    prompt, a source photo) never sits in two partitions."""
    if len(ratios) != 3 or abs(sum(ratios) - 1) > 1e-6 or min(ratios) < 0:
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {ratios}")
    if groups:
        return _partition_groups(tree, ratios, seed, groups)
    out = {}
    for label, files in tree.items():
        order = list(files)
        random.Random(f"{seed}:{label}").shuffle(order)
        n_train = round(len(order) * ratios[0])
        n_val = round(len(order) * ratios[1])
        for k, p in enumerate(order):
            out[p] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return out


def _partition_groups(tree, ratios, seed, groups) -> dict:
    members: dict[str, list[str]] = {}
    for files in tree.values():
        for p in files:
            members.setdefault(groups[p], []).append(p)
    order = sorted(members)
    random.Random(f"{seed}:groups").shuffle(order)
    total, seen, out = sum(len(v) for v in members.values()), 0, {}
    for g in order:  # a group goes where the running share of rows says, whole
        share = seen / total
        part = "train" if share < ratios[0] else "val" if share < ratios[0] + ratios[1] else "test"
        out.update({p: part for p in members[g]})
        seen += len(members[g])
    return out


def groups_of(tree: dict[str, list[str]], group_by: str) -> dict[str, str]:
    """{path: group} from a regex on each file name (its first capture group, else the whole match)
    or from a CSV with columns path (relative to the tree's root) and group. Every image must get one."""
    if group_by.endswith(".csv") and Path(group_by).is_file():
        with open(group_by, encoding="utf-8-sig", newline="") as fh:
            table = {posixpath.normpath(r["path"]): r["group"] for r in csv.DictReader(fh)}
        found = {p: table.get(p) for files in tree.values() for p in files}
        where = group_by
    else:
        try:
            rx = re.compile(group_by)
        except re.error as exc:
            raise UserError(f"--group-by {group_by!r}: not a regular expression ({exc}) nor a CSV file") from None
        found = {}
        for files in tree.values():
            for p in files:
                hit = rx.search(posixpath.basename(p))
                found[p] = (hit.group(1) if rx.groups else hit.group(0)) if hit else None
        where = f"the regex {group_by!r}"
    missing = sorted(p for p, g in found.items() if not g)
    if missing:
        raise ManifestError(
            group_by, [f"{len(missing)} images get no group from {where}, e.g. " + ", ".join(missing[:3])]
        )
    return found


PARTITION_KEYS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}  # the keys the authors' code reads, any case
AUTHORS_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # the files their index lists count


def partition_from_split_file(tree: dict[str, list[str]], split_file: Path) -> tuple[dict, list[str], list[str]]:
    """({path: partition}, problems, notes) from a Split.json in every form the authors' code reads.

    Keys: train/training, val/valid/validation, test/testing (any case); other keys are ignored, with
    a note. A value is {class: [entries]}, an entry being a path relative to the class folder or a
    bare file name that exactly one file of the class has; or a list of indices applied to every
    class, into its .jpg/.jpeg/.png/.bmp files sorted by lower-cased name. Unmatched, ambiguous,
    escaping, out-of-range and repeated entries are all reported at once."""
    try:
        data = json.loads(Path(split_file).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        return {}, [f"{split_file}: cannot be read as JSON ({exc})"], []
    if not isinstance(data, dict):
        return {}, [f'{split_file}: expected {{"train": {{class: [files]}}, "val": ..., "test": ...}}'], []
    index = {label: _class_index(label, files) for label, files in tree.items()}
    out, problems, notes = {}, [], []

    def assign(part: str, label: str, entry: str, p: str | None, why: str) -> None:
        if why:
            problems.append(f"{split_file}: {part}/{label}/{entry}: {why}")
        elif p in out:
            problems.append(f"{split_file}: {part}/{label}/{entry}: already in {out[p]} as {p}")
        else:
            out[p] = part

    for key, value in data.items():
        part = PARTITION_KEYS.get(str(key).lower())
        if part is None:
            notes.append(
                f"{split_file}: key {key!r} is not a partition (train, val, test or their aliases); "
                "ignored, as the authors' code ignores it"
            )
        elif isinstance(value, dict):
            for label, names in value.items():
                for name in names if isinstance(names, list) else [names]:
                    assign(part, label, str(name), *_match(index.get(label), label, str(name)))
        elif isinstance(value, list):
            for label, files in tree.items():
                counted = sorted(
                    (p for p in files if p.lower().endswith(AUTHORS_SUFFIXES)),
                    key=lambda p: posixpath.basename(p).lower(),
                )
                for i in value:
                    ok = isinstance(i, int) and 0 <= i < len(counted)
                    assign(
                        part,
                        label,
                        f"#{i}",
                        counted[i] if ok else None,
                        "" if ok else f"index out of range (the class has {len(counted)} files)",
                    )
        else:
            problems.append(f"{split_file}: {key!r} must map classes to file lists, or be a list of indices")
    return out, problems, notes


def _class_index(label: str, files: list[str]) -> tuple[dict, dict]:
    """({path relative to the class folder: tree path}, {file name: [tree paths]})."""
    rel = {p[len(label) + 1 :]: p for p in files}
    names: dict[str, list[str]] = {}
    for r, p in rel.items():
        names.setdefault(posixpath.basename(r), []).append(p)
    return rel, names


def _match(index, label: str, entry: str) -> tuple[str | None, str]:
    if index is None:
        return None, f"no class folder {label!r} in the tree"
    rel, names = index
    norm = posixpath.normpath(entry.replace("\\", "/"))
    if norm.startswith("../") or norm == ".." or posixpath.isabs(norm):
        return None, "escapes the class folder"
    if norm in rel:
        return rel[norm], ""
    if "/" not in norm and len(names.get(norm, [])) == 1:
        return names[norm][0], ""
    if "/" not in norm and norm in names:
        return None, f"ambiguous: {len(names[norm])} files have this name ({', '.join(names[norm][:3])}); give the path"
    return None, "not in the tree"


def build_rows(
    tree: dict[str, list[str]], partitions: dict | None, variant: str = "raw", groups: dict[str, str] | None = None
):
    """Rows for every image; with a split file, images it does not list are left out (and counted)."""
    rows, unassigned = [], []
    for label, files in tree.items():
        for p in files:
            if partitions is not None and p not in partitions:
                unassigned.append(p)
                continue
            row = {"path": p, "label": label, "partition": partitions[p] if partitions else "", "variant": variant}
            rows.append({**row, "group": groups[p]} if groups else row)
    return rows, unassigned


def summary(m: Manifest) -> dict:
    return {
        "rows": len(m),
        "root": str(m.root),
        "by_label": dict(sorted(Counter(m.column("label")).items())),
        "by_partition": dict(sorted(Counter(p or "(none)" for p in m.column("partition")).items())),
        "by_variant": dict(sorted(Counter(m.column("variant")).items())),
    }
