"""`leakpipe status`, `runs`, `verify`, `gc` and `config`: what the workspace holds and why."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leakpipe.pipeline.cli_base import _log, _workspace_options, main


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


@main.command()
@click.option(
    "--contents",
    is_flag=True,
    help="Also read every image of every manifest and the VAE's weights again, past the file-hash cache "
    "(which compares size, inode and mtime): finds a file changed in place with its mtime kept.",
)
@_workspace_options
def verify(ws, cfg, contents):
    """Re-check every stored checksum; report corrupted or missing chunks and orphaned partial writes,
    and run names whose result is gone or that are folders standing in for a link. Damaged latent rows
    are recorded for `status` and `encode`, which re-encodes them; each problem comes with its command."""
    from leakpipe.workflows import verify as check

    found = check.check_outputs(ws)
    lines, problems, repairs = found.lines, found.problems, found.repairs
    if contents:
        read = check.check_inputs(ws, cfg, log=_log)
        lines, problems = lines + read.lines, problems + read.problems
        repairs += [r for r in read.repairs if r not in repairs]
    for line in lines:
        click.echo(line)
    for p in problems:
        click.echo(f"  {p}")
    if not contents:
        click.echo(
            "not read: the input images and the VAE's weights (compared by size, inode and mtime through the "
            "file-hash cache); `leakpipe verify --contents` reads them too"
        )
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s). To repair them: " + "; ".join(repairs))
    click.echo(
        f"verified {found.locks} lock(s) and {len(run_names(ws))} run name(s): all checksums match"
        + ("; every input file read again, unchanged" if contents else "")
    )


def run_names(ws) -> list[str]:
    from leakpipe.pipeline.ledger import runs

    return runs.names(ws)


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
@click.option(
    "--drop",
    multiple=True,
    metavar="RESULT",
    help="Remove this interrupted training too (its result folder's name, as `leakpipe runs` lists it), "
    "which gc otherwise keeps because `leakpipe train` under the current config resumes it (repeatable).",
)
@_workspace_options
def gc(ws, cfg, dry_run, drop):
    """Remove what nothing refers to: trained results no run name points at, and latent stores (in
    cache/latents/ and under store.url) that neither the current config nor a named result uses. An
    interrupted training that the current config resumes is kept unless --drop names it. Nothing is
    ever removed except by this command."""
    from leakpipe.pipeline.store import storage
    from leakpipe.pipeline.store.locking import Busy, exclusive
    from leakpipe.stages import graph
    from leakpipe.workflows import status as st

    g = graph(ws, cfg)
    unknown = [d for d in drop if not (ws.cache / "results" / d).is_dir()]
    if unknown:
        raise click.ClickException(f"--drop {', '.join(unknown)}: no such result in {ws.cache / 'results'}")
    garbage, freed, removed, skipped = st.garbage(g, tuple(drop)), 0, 0, 0
    for name in st.kept_interrupted(g, tuple(drop)):
        click.echo(
            f"keeping cache/results/{name}: an interrupted training that `leakpipe train` resumes under the "
            f"current config; `leakpipe gc --drop {name}` removes it"
        )
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
