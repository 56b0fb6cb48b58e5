"""Where a latent store lives: a local path, or any fsspec URL (s3://, gs://, az://, memory://...).

A location is a plain string. Local paths and `file://` URLs are served by zarr's LocalStore, which
replaces each chunk file atomically (temp file + rename); fsspec's local writer does not, so
`file://` is turned into a path rather than given to it. Object stores replace an object atomically
on every PUT, which is the same guarantee. Credentials and endpoints come from the environment,
as for any fsspec user (AWS_PROFILE, FSSPEC_S3_ENDPOINT_URL, ...), never from the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from leakpipe.pipeline.errors import UserError


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def normalize(location: str | Path) -> str:
    """Absolute path for local locations (`file://` included), the URL otherwise."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return text.rstrip("/") if is_url(text) else os.path.abspath(os.path.expanduser(text))


def join(location: str, *parts: str) -> str:
    if is_url(location):
        return "/".join([normalize(location), *parts])
    return str(Path(normalize(location), *parts))


def filesystem(location: str):
    """(fsspec filesystem, path inside it) for a normalized location."""
    import fsspec

    if not is_url(location):
        return fsspec.filesystem("file"), location
    return fsspec.core.url_to_fs(location)


def probe(location: str) -> None:
    """Fail early, with what to check, when a URL store cannot be reached (no backend package, no
    credentials, wrong endpoint, no network); local folders are created on demand."""
    if not is_url(location):
        return
    try:
        fs, path = filesystem(location)
        fs.exists(path)
    except Exception as exc:  # backends raise their own types (botocore, google.auth, aiohttp...)
        raise UserError(
            f"cannot reach the latent store {location}: {exc}. Check store.url, the credentials in "
            "this environment (and on every dask worker), FSSPEC_S3_ENDPOINT_URL for S3-compatible "
            "servers, and that the backend is installed (pip install s3fs / gcsfs / adlfs)"
        ) from None


def exists(location: str) -> bool:
    if not is_url(location):  # without importing fsspec: a no-op encode checks this
        return os.path.exists(normalize(location))
    fs, path = filesystem(location)
    return fs.exists(path)


def remove(location: str) -> None:
    """Delete a file or a folder (prefix), if present."""
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def files(location: str) -> dict[str, int]:
    """{path relative to the folder `location`: size} of every object under it ({} if none), in one
    listing call, which on object storage is far cheaper than one request per file."""
    if not is_url(location):  # a walk of the folder, without importing fsspec (a no-op encode lists its store)
        root = normalize(location)
        return {
            os.path.relpath(os.path.join(d, n), root): os.stat(os.path.join(d, n)).st_size
            for d, _, names in os.walk(root)
            for n in names
        }
    fs, root = filesystem(location)
    prefix = root.rstrip("/") + "/"
    return {
        p[len(prefix) :]: int(info["size"]) for p, info in fs.find(root, detail=True).items() if p.startswith(prefix)
    }


def open_file(location: str, mode: str = "rb"):
    fs, path = filesystem(location)
    return fs.open(path, mode)


def glob(location: str, pattern: str) -> list[str]:
    """Locations under `location` matching `pattern` (fsspec glob syntax, ** allowed)."""
    fs, root = filesystem(location)
    root = root.rstrip("/")
    # rebuilt from `location`: fsspec's unstrip_protocol does not round-trip every protocol
    return sorted(
        normalize(location) + p[len(root) :] for p in fs.glob(root + "/" + pattern) if p.startswith(root + "/")
    )


def copy_tree(src: str, dst: str, last: str) -> None:
    """Copy every object under `src` to `dst`; those under `src/last` after all others, so a reader
    never sees them before what they vouch for."""
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    names = sorted(files(src))
    vouching = [n for n in names if n.startswith(last + "/")]
    for group in ([n for n in names if n not in vouching], vouching):
        if group:
            fs.copy([f"{s}/{n}" for n in group], [f"{d}/{n}" for n in group])


def move(src: str, dst: str) -> None:
    """Rename a folder; local only (atomic there)."""
    os.replace(src, dst)


def link(src: str, dst: str) -> None:
    """Make `dst` hold the bytes of the file `src` without copying them where possible: a hard link
    on a local disk (a plain copy where links are refused), a server-side copy on object storage."""
    if is_url(src):
        fs, s = filesystem(src)
        fs.copy(s, filesystem(dst)[1])
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        import shutil

        shutil.copyfile(src, dst)
