"""`leakpipe status`, `runs`, `verify`, `gc` and `config`: what the workspace holds and why."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leakpipe.pipeline.cli_base import _workspace_options, main


# ---------------------------------------------------------------- ledger
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON (one object per stage instance).")
@_workspace_options
def status(ws, cfg, as_json):
    """Every stage's state: up to date, or stale and why (the same check each stage makes)."""
    from leakpipe.stages import graph
    from leakpipe.workflows import status as st

    items = st.entries(graph(ws, cfg))
    if as_json:
        click.echo(json.dumps(items, indent=1))
    elif not ws.splits():
        click.echo(f"no manifests in {ws.manifests}; start with `leakpipe manifest build`")
    else:
        click.echo(st.format_entries(items))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@_workspace_options
def runs(ws, cfg, as_json):
    """Every trained result: run names, when made, what differs from the current config, metrics."""
    from leakpipe.stages import graph
    from leakpipe.workflows import status as st

    rows = st.run_rows(graph(ws, cfg))
    click.echo(
        json.dumps(rows, indent=1)
        if as_json
        else st.format_runs(rows)
        if rows
        else "no trained results yet; run `leakpipe train`"
    )


def _lock_files(ws) -> list[Path]:
    return sorted(
        [
            *ws.cache.glob("latents/*/*.lock.json"),
            *ws.cache.glob("results/*/*.lock.json"),
            *ws.cache.glob("results/*/embeddings/*.lock.json"),
        ]
    )


@main.command()
@_workspace_options
def verify(ws, cfg):
    """Re-check every stored checksum; report corrupted or missing chunks and orphaned partial writes."""
    from leakpipe.pipeline.ledger import locks as ledger

    lock_files = _lock_files(ws)
    problems = []
    for lock_path in lock_files:
        lock = ledger.read_lock(lock_path)
        if lock is None:
            problems.append(f"unreadable lock file (damaged, or from an older leakpipe): {lock_path}")
            continue
        found = ledger.verify(lock_path, lock, deep=True)
        click.echo(
            f"{lock_path.relative_to(ws.root)}: {len(lock['outputs'])} files, "
            + ("ok" if not found else f"{len(found)} problem(s)")
        )
        problems += found
    for p in problems:
        click.echo(f"  {p}")
    if problems:
        raise click.ClickException(
            f"{len(problems)} problem(s); rerun the stage to repair them (it rewrites whatever does not verify)"
        )
    click.echo(f"verified {len(lock_files)} lock(s): all checksums match")


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
@_workspace_options
def gc(ws, cfg, dry_run):
    """Remove what nothing refers to: trained results no run name points at, and latent stores (in
    cache/latents/ and under store.url) that neither the current config nor a named result uses.
    Nothing is ever removed except by this command."""
    from leakpipe.pipeline.store import storage
    from leakpipe.pipeline.store.locking import Busy, exclusive
    from leakpipe.stages import graph
    from leakpipe.workflows import status as st

    garbage, freed = st.garbage(graph(ws, cfg)), 0
    for location, size in garbage:
        if dry_run:
            click.echo(f"would remove {location} ({size / 2**20:.1f} MiB)")
            continue
        store = location.endswith(".zarr")
        split, name = location.rstrip("/").split("/")[-2:]
        lock = ws.store_lock(split, name[: -len(".zarr")], "writer.lock") if store else Path(location) / ".writer.lock"
        try:  # a result being trained has no name yet, a store may be encoded or read: never pull either away
            with exclusive(lock, location):
                click.echo(f"removing {location} ({size / 2**20:.1f} MiB)")
                storage.remove(location)
                if store:
                    ws.store_lock(split, name[: -len(".zarr")], "lock.json").unlink(missing_ok=True)
            freed += size
        except Busy:
            click.echo(
                f"skipping {location}: in use by another leakpipe process (a training, an encode or "
                "a reader); run gc again when it has finished"
            )
            continue
        if store:
            lock.unlink(missing_ok=True)
    total = (sum(s for _, s in garbage) if dry_run else freed) / 2**20
    click.echo(
        f"gc: {len(garbage)} item(s), {total:.1f} MiB " + ("would be freed" if dry_run else "freed")
        if garbage
        else "gc: nothing to remove"
    )


@main.command("config")
@_workspace_options
def config_show(ws, cfg):
    """Print the effective config (defaults + leakpipe.toml + --set) as TOML."""
    from leakpipe.pipeline.config import canonical_hash
    from leakpipe.pipeline.config_files import to_toml

    click.echo(to_toml(cfg))
    click.echo(f"# canonical hash {canonical_hash(cfg.to_dict())}")
