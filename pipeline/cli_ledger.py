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
    """Every lock: of latent stores, of results, and of run names that are folders, not links."""
    folders = [p.name for p in ws.cache.glob("runs/*") if p.is_dir() and not p.is_symlink()]
    return sorted(
        [
            *ws.cache.glob("latents/*/*.lock.json"),
            *ws.cache.glob("results/*/*.lock.json"),
            *ws.cache.glob("results/*/embeddings/*.lock.json"),
            *(
                q
                for name in folders
                for pattern in ("*.lock.json", "embeddings/*.lock.json")
                for q in (ws.cache / "runs" / name).glob(pattern)
            ),
        ]
    )


@main.command()
@_workspace_options
def verify(ws, cfg):
    """Re-check every stored checksum; report corrupted or missing chunks and orphaned partial writes,
    and run names whose result is gone or that are folders standing in for a link."""
    from leakpipe.pipeline.ledger import locks as ledger, runs as run_names

    lock_files = _lock_files(ws)
    problems = [f"run {name}: {bad}" for name in run_names.names(ws) if (bad := run_names.problem(ws, name))]
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
            f"{len(problems)} problem(s); rerun the stage to repair them "
            "(it rewrites whatever does not verify), and fix the run names as said"
        )
    click.echo(f"verified {len(lock_files)} lock(s) and {len(run_names.names(ws))} run name(s): all checksums match")


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

    garbage, freed, removed, skipped = st.garbage(graph(ws, cfg)), 0, 0, 0
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
            freed, removed = freed + size, removed + 1
        except Busy:
            click.echo(
                f"skipping {location}: in use by another leakpipe process (a training, an encode or "
                "a reader); run gc again when it has finished"
            )
            skipped += 1
            continue
        if store:
            lock.unlink(missing_ok=True)
    if not garbage:
        click.echo("gc: nothing to remove")
    elif dry_run:
        click.echo(f"gc: {len(garbage)} item(s), {sum(s for _, s in garbage) / 2**20:.1f} MiB would be freed")
    else:
        click.echo(
            f"gc: {removed} item(s) removed, {freed / 2**20:.1f} MiB freed"
            + (f"; {skipped} in use, skipped (run gc again later)" if skipped else "")
        )


@main.command("config")
@_workspace_options
def config_show(ws, cfg):
    """Print the effective config (defaults + leakpipe.toml + --set) as TOML."""
    from leakpipe.pipeline.config import canonical_hash
    from leakpipe.pipeline.config_files import to_toml

    click.echo(to_toml(cfg))
    click.echo(f"# canonical hash {canonical_hash(cfg.to_dict())}")
