"""What every `leakpipe` command shares: the group, the workspace options (-C, --config, --set,
--profile) and errors as one-paragraph messages, never a traceback."""

from __future__ import annotations

import errno
import functools
import inspect
import re
from pathlib import Path

import click

from leakpipe.pipeline.config import DEFAULT_PROFILE, PROFILES
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace


def _disk_full(exc: BaseException) -> str | None:
    """The message for a full disk (or quota), however the writer reported it; None otherwise."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors (Rust) reports it in its message: "I/O error: No space left on device (os error 28)"
    full = (
        full
        or type(exc).__name__ == "SafetensorError"
        and bool(re.search(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b|StorageFull|QuotaExceeded", str(exc)))
    )
    if not full:
        return None
    filename = getattr(exc, "filename", None)
    where = f" while writing {filename}" if filename else ""
    return (
        f"No space left on the device{where}. Nothing was corrupted: every file is written to a "
        "temporary name and renamed only when complete. Free some space (`leakpipe gc` lists what it "
        "can free) and rerun the command; it continues where it stopped."
    )


def _denied(exc: BaseException) -> str | None:
    """The message for a file this user may not write (permissions, a read-only file system); None otherwise."""
    if not (isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
        return None
    where = exc.filename or "a file"
    return (
        f"{where}: {exc.strerror}: this user cannot write there, and this command needs to. Run it as a user "
        "who can write there (in a workspace: its cache/ and manifests/ folders), or choose a place of your own "
        "(-C for another workspace); the commands that only read (status, runs, verify, attribute, compare, "
        "and score of an up-to-date run) work on a read-only cache."
    )


def _friendly(fn):
    """User errors and a full disk as one-paragraph messages, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            message = _disk_full(exc) or _denied(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper


def _workspace_options(fn):
    @click.option(
        "-C",
        "--workspace",
        "workspace",
        type=click.Path(file_okay=False, path_type=Path),
        default=".",
        show_default=True,
        help="Workspace folder (holds manifests/ and cache/).",
    )
    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Config TOML (default: WORKSPACE/leakpipe.toml if present).",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one setting, e.g. --set vae.dtype=float16 (repeatable).",
    )
    @click.option(
        "--profile",
        type=click.Choice(list(PROFILES)),
        default=DEFAULT_PROFILE,
        show_default=True,
        help="Defaults to start from, under the config file and --set: leakpipe (the paper's "
        "method with the measured training recipe), paper (as printed) or authors-code (the "
        "authors' released code's); the docs' Configuration page lists every difference.",
    )
    @functools.wraps(fn)
    @_friendly
    def wrapper(workspace, config_file, overrides, profile, **kwargs):
        ws = Workspace(workspace)
        cfg = ws.config(config_file, overrides, profile)
        if "config_file" in inspect.signature(fn).parameters:
            kwargs.update(config_file=config_file, overrides=overrides, profile=profile)
        return fn(ws=ws, cfg=cfg, **kwargs)

    return wrapper


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leakpipe")
def main():
    """leakpipe: which generator made this image? (Proto-LeakNet as a checksum-tracked pipeline)"""


def _print_summary(s: dict, path) -> None:
    click.echo(f"{path}: {s['rows']} rows, root {s['root']}")
    for key in ("by_label", "by_partition", "by_variant"):
        click.echo(f"  {key[3:]:<10} " + "  ".join(f"{k}={v}" for k, v in s[key].items()))
