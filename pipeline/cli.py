"""The `leakpipe` command. Heavy libraries (torch, diffusers, zarr) are imported inside commands
that need them, so `status`, `manifest` and no-op reruns start fast."""
from __future__ import annotations

import functools
import inspect
import json
import os
import time
from pathlib import Path

import click

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace


def _workspace_options(fn):
    @click.option("-C", "--workspace", "workspace", type=click.Path(file_okay=False, path_type=Path),
                  default=".", show_default=True, help="Workspace folder (holds manifests/ and cache/).")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="Config TOML (default: WORKSPACE/leakpipe.toml if present).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override one setting, e.g. --set vae.dtype=float16 (repeatable).")
    @functools.wraps(fn)
    def wrapper(workspace, config_file, overrides, **kwargs):
        ws = Workspace(workspace)
        try:
            cfg = ws.config(config_file, overrides)
            if "config_file" in inspect.signature(fn).parameters:
                kwargs.update(config_file=config_file, overrides=overrides)
            return fn(ws=ws, cfg=cfg, **kwargs)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leakpipe")
def main():
    """leakpipe: which generator made this image? (Proto-LeakNet as a checksum-tracked pipeline)"""


# ---------------------------------------------------------------- manifests
@main.group()
def manifest():
    """Build and inspect manifests (manifests/NAME.csv)."""


@manifest.command("build")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", "split", required=True, help="Manifest name, e.g. closed, closed-pp, open.")
@click.option("--partition", type=click.Choice(["auto", "ratio", "file", "none"]), default="auto",
              show_default=True, help="auto: ROOT/Split.json if present, else seeded ratios.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Split JSON {train|val|test: {class: [file names]}} (the authors' format).")
@click.option("--ratios", default="0.5,0.2,0.3", show_default=True, help="train,val,test per class.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--variant", default="raw", show_default=True, help="Variant column for every row.")
@_workspace_options
def manifest_build(ws, cfg, root, split, partition, split_file, ratios, seed, variant):
    """Scan a folder-per-generator tree ROOT/<generator>/<images> into manifests/SPLIT.csv."""
    from leakpipe.pipeline import manifest as mf

    tree = mf.scan_tree(root)
    if partition == "auto":
        split_file = split_file or (root / "Split.json" if (root / "Split.json").exists() else None)
        partition = "file" if split_file else "ratio"
    if partition == "file":
        if split_file is None:
            raise click.UsageError("--partition file needs --split-file (or ROOT/Split.json)")
        parts, problems = mf.partition_from_split_file(tree, split_file)
        if problems:
            raise mf.ManifestError(str(split_file), problems)
    elif partition == "ratio":
        try:
            parts = mf.partition_by_ratio(tree, tuple(float(x) for x in ratios.split(",")), seed)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ratios") from None
    else:
        parts = None
    rows, unassigned = mf.build_rows(tree, parts, variant)
    out = ws.manifest(split)
    mf.write_manifest(out, root, rows)
    m = mf.read_manifest(out)
    _print_summary(mf.summary(m), out)
    if unassigned:
        _log(f"note: {len(unassigned)} images are not listed in {split_file} and were left out, "
             f"e.g. {unassigned[0]}")


def _print_summary(s: dict, path) -> None:
    click.echo(f"{path}: {s['rows']} rows, root {s['root']}")
    for key in ("by_label", "by_partition", "by_variant"):
        click.echo(f"  {key[3:]:<10} " + "  ".join(f"{k}={v}" for k, v in s[key].items()))


@manifest.command("show")
@click.argument("name")
@_workspace_options
def manifest_show(ws, cfg, name):
    """Row counts per label, partition and variant of manifests/NAME.csv."""
    from leakpipe.pipeline import manifest as mf

    _print_summary(mf.summary(mf.read_manifest(ws.manifest(name))), ws.manifest(name))


# ---------------------------------------------------------------- stage one
@main.command()
@click.option("--split", "splits", multiple=True, required=True, help="Manifest name (repeatable).")
@click.option("--vae", "vae_source", help="Hub id, diffusers folder or .safetensors (vae.source). Saved in "
              "the workspace config, so later commands use this encoder's cache.")
@click.option("--skip-bad", is_flag=True, help="Accept the split without unreadable images.")
@click.option("--workers", type=int, help="Encode on a local dask cluster of N worker processes.")
@click.option("--scheduler", help="Encode on an existing dask cluster (scheduler address).")
@_workspace_options
def encode(ws, cfg, splits, vae_source, skip_bad, workers, scheduler, config_file, overrides):
    """Stage one: encode images to z0 moments in cache/latents/SPLIT/<encoder>.zarr."""
    from leakpipe.stages import encode as stage

    if vae_source:
        _persist_vae(ws, cfg, vae_source, config_file, overrides)
    if workers is not None:
        cfg.encode.workers = workers
    if scheduler:
        cfg.encode.scheduler = scheduler
    for split in splits:
        result = stage.run(ws, split, cfg, skip_bad=skip_bad, log=_log)
        click.echo(result.summary())


def _persist_vae(ws, cfg, source: str, config_file, overrides) -> None:
    """`--vae` is the workspace's encoder from now on: saved as vae.source in its config file (a local
    path relative to the workspace when it lies inside it), so train, score, status and attribute
    find this encoder's cache with no flag."""
    from leakpipe.pipeline.config import persist_setting
    from leakpipe.pipeline.engine.vae import resolve

    local = Path(source).expanduser()
    if local.exists():
        local = local.resolve()
        source = "./" + local.relative_to(ws.root).as_posix() if local.is_relative_to(ws.root) else str(local)
    cfg.vae.source = source
    resolve(cfg.vae, ws.root)  # a source that cannot be found is an error before anything is saved
    path = config_file or ws.root / "leakpipe.toml"
    was = persist_setting(path, "vae.source", source)
    if was != source:
        _log(f"note: vae.source = {source} saved in {path} (was {was or 'the default'}): train, score, "
             "status and attribute now use this encoder's cache")
    if any(o.split("=", 1)[0].strip() == "vae.source" for o in overrides):
        _log("note: --set vae.source was given as well; --vae wins for this command")


# ---------------------------------------------------------------- stage two
@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="Run name (ablations).")
@_workspace_options
def train(ws, cfg, run_name):
    """Stage two: train from the latent cache (or resume, or restore a stored result), then embed
    every encoded split. Results are kept per config in cache/results/; RUN points at one."""
    from leakpipe.stages import train as stage

    from leakpipe.pipeline.engine.ddp import launched_rank

    main_rank = launched_rank() == 0  # under torchrun only rank 0 reports
    result = stage.run(ws, cfg, run_name, log=_log if main_rank else (lambda msg: None))
    if main_rank:
        from leakpipe.stages import embed

        embed.run(ws, cfg, run_name, log=_log)
        click.echo(result.summary())


# ---------------------------------------------------------------- stage three
@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="Run to score.")
@click.option("--dual", is_flag=True, help="Also report the paper's 'dual' open-set setting (not a "
              "detector: it uses each sample's ground-truth domain).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
@_workspace_options
def score(ws, cfg, run_name, dual, as_json):
    """Stage three: metrics, open-set KDE, report.md and figures from the run's embeddings."""
    from leakpipe.stages import score as stage

    from leakpipe.pipeline.ledger.graph import score_splits
    from leakpipe.stages import embed

    if dual:
        cfg.score.dual = True
    embed.run(ws, cfg, run_name, log=_log, splits=[s for _, s in score_splits(cfg) if ws.manifest(s).exists()])
    result = stage.run(ws, cfg, run_name, log=_log)
    click.echo(json.dumps(result.metrics, indent=1) if as_json else result.summary())


@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="A trained run.")
@click.option("--split", "splits", multiple=True, help="Only these splits (repeatable) [default: every encoded one].")
@_workspace_options
def embed(ws, cfg, run_name, splits):
    """Embeddings (h_bar, w, a_t, logits) of encoded splits under a trained run; `train` and `score`
    run it too."""
    from leakpipe.stages import embed as stage

    done = stage.run(ws, cfg, run_name, log=_log, splits=list(splits) or None)
    click.echo(f"embed {run_name}: " + (f"embedded {', '.join(done)}" if done else "up to date, nothing to do"))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="default", show_default=True, help="A scored run.")
@click.option("--top", default=3, show_default=True, help="How many generators (and gated features) to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_workspace_options
def attribute(ws, cfg, images, run_name, top, as_json):
    """Which generator made IMAGE? Top generators, Mahalanobis, unseen-generator flag, explanation."""
    from leakpipe.stages import attribute as stage

    results = stage.run(ws, cfg, list(images), run_name, top)
    if as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        from leakpipe.pipeline.ledger import graph, runs

        click.echo(stage.format_text(results, graph.run_config(runs.pointed(ws, run_name)).diffusion.timesteps))


@main.command()
@click.option("--only", help="Comma-separated ablations [default: all of them].")
@click.option("--list", "list_only", is_flag=True, help="List the ablations and their settings.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Comparison table [default: WORKSPACE/cache/sweep.md].")
@_workspace_options
def sweep(ws, cfg, only, list_only, out):
    """Ablations of the paper's Tables 3-5 over one latent cache: train + score each, then compare."""
    from leakpipe.stages import sweep as stage

    names = stage.select(only)
    if list_only:
        for n in names:
            click.echo(f"{n:<14} {' '.join(stage.ABLATIONS[n]) or '(workspace config)'}")
        return
    params = click.get_current_context().params  # the workspace's --config and --set come first
    stage.run(ws, lambda extra: ws.config(params["config_file"], [*params["overrides"], *extra]), names, log=_log)
    table = stage.compare(ws, names)
    out = out or ws.cache / "sweep.md"
    stage.write_compare(out, table)
    click.echo(table + f"-> {out}")


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table (markdown) here.")
@_workspace_options
def compare(ws, cfg, runs, out):
    """Top-1 and macro AUC (head, Mahalanobis), post-processing and open set, one row per scored RUN."""
    from leakpipe.stages import sweep as stage

    table = stage.compare(ws, list(runs))
    if out:
        stage.write_compare(out, table)
    click.echo(table + (f"-> {out}" if out else ""))


# ---------------------------------------------------------------- data
def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in steps):
        raise click.BadParameter("steps start at 1")
    return steps


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Image folder [default: WORKSPACE/data/synth].")
@click.option("--closed", "n_closed", default=10, show_default=True, help="Known generators.")
@click.option("--open", "n_open", default=10, show_default=True, help="Unseen generators.")
@click.option("--per-generator", default=100, show_default=True, help="Images per generator.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--difficulty", default=1.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Fingerprint strength is 1/difficulty.")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default="1,2,3", show_default=True, help="Post-processing steps ('' for none).")
@click.option("--workers", default=0, help="Worker processes [default: all cores].")
@_workspace_options
def synth(ws, cfg, out, n_closed, n_open, per_generator, size, difficulty, seed, steps, workers):
    """Write a WILD-shaped synthetic benchmark and its manifests closed, closed-pp and open."""
    from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark

    out = out or ws.root / "data" / "synth"
    spec = SynthSpec(n_closed, n_open, per_generator, size, difficulty, seed, _steps(steps))
    start = time.perf_counter()
    written = write_benchmark(out, ws.manifests, spec, workers or None)
    took = time.perf_counter() - start
    click.echo(f"synth: {sum(written.values())} images in {took:.1f} s under {out}")
    for name, n in written.items():
        click.echo(f"  manifests/{name}.csv: {n} rows")


@main.command()
@click.option("--split", required=True, help="Manifest to copy from.")
@click.option("--partition", default="test", show_default=True, help="Rows to copy ('all' for every row).")
@click.option("--steps", default="1,2,3", show_default=True)
@click.option("--name", help="Output manifest [default: SPLIT-pp].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Image folder [default: WORKSPACE/data/NAME].")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=0, help="Worker processes [default: all cores].")
@_workspace_options
def postprocess(ws, cfg, split, partition, steps, name, out, seed, workers):
    """Post-processed copies (steps 1-3: JPEG/WebP, resize, crop, rotation, blur, ...) of a manifest."""
    from leakpipe.pipeline import manifest as mf
    from leakpipe.pipeline.bench.datasets import PP_COLUMNS, postprocess_rows

    m = mf.read_manifest(ws.manifest(split))
    name = name or f"{split}-pp"
    out = out or ws.root / "data" / name
    rows = postprocess_rows(m, out, _steps(steps), seed, None if partition == "all" else partition,
                            workers or os.cpu_count() or 1)
    if not rows:
        raise click.ClickException(f"no rows of {ws.manifest(split)} have partition {partition!r}")
    mf.write_manifest(ws.manifest(name), out, rows, PP_COLUMNS)
    click.echo(f"postprocess: {len(rows)} images under {out} -> {ws.manifest(name)}")


@main.command()
@click.option("--vae", "vae_source", help="A real VAE (Hub id, folder or .safetensors) instead of "
              "the seeded random demo VAE.")
@click.option("-C", "--workspace", "workspace", type=click.Path(file_okay=False, path_type=Path),
              default="demo", show_default=True, help="Workspace folder for the demo.")
@click.option("--closed", "n_closed", type=int, help="Known generators [default: 10].")
@click.option("--open", "n_open", type=int, help="Unseen generators [default: 10].")
@click.option("--per-generator", type=int, help="Images per generator [default: 40].")
@click.option("--size", type=int, help="Image side in pixels [default: 128].")
@click.option("--epochs", default=15, show_default=True, help="Training epochs.")
@_user_errors
def demo(vae_source, workspace, n_closed, n_open, per_generator, size, epochs):
    """Synthetic benchmark + every stage (encode, train, score), end to end, on a laptop CPU.

    Sizes and epochs apply when the workspace is first created; a rerun does only what is missing.
    """
    from leakpipe.stages import demo as stage

    start = time.perf_counter()
    ws = Workspace(workspace)
    spec = stage.spec_with(n_closed=n_closed, n_open=n_open, per_generator=per_generator, size=size)
    lines = stage.run(ws, lambda: ws.config(), vae_source, spec, epochs, log=_log)
    click.echo("\n".join(lines))
    click.echo(f"demo finished in {time.perf_counter() - start:.0f} s; workspace {ws.root}; "
               f"report {ws.cache / 'runs' / 'default' / 'report.md'}")


# ---------------------------------------------------------------- ledger
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON (one object per stage instance).")
@_workspace_options
def status(ws, cfg, as_json):
    """Every stage's state: up to date, or stale and why (the same check each stage makes)."""
    from leakpipe.pipeline.ledger import status as st

    items = st.entries(ws, cfg)
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
    from leakpipe.pipeline.ledger import status as st

    rows = st.run_rows(ws, cfg)
    click.echo(json.dumps(rows, indent=1) if as_json else st.format_runs(rows) if rows else
               "no trained results yet; run `leakpipe train`")


def _lock_files(ws) -> list[Path]:
    return sorted([*ws.cache.glob("latents/*/*.lock.json"), *ws.cache.glob("results/*/*.lock.json"),
                   *ws.cache.glob("results/*/embeddings/*.lock.json")])


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
        click.echo(f"{lock_path.relative_to(ws.root)}: {len(lock['outputs'])} files, "
                   + ("ok" if not found else f"{len(found)} problem(s)"))
        problems += found
    for p in problems:
        click.echo(f"  {p}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s); rerun the stage to repair them "
                                   "(it rewrites whatever does not verify)")
    click.echo(f"verified {len(lock_files)} lock(s): all checksums match")


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
@_workspace_options
def gc(ws, cfg, dry_run):
    """Remove what nothing refers to: trained results no run name points at, and latent stores (in
    cache/latents/ and under store.url) that neither the current config nor a named result uses.
    Nothing is ever removed except by this command."""
    from leakpipe.pipeline.ledger import status as st
    from leakpipe.pipeline.store import storage

    garbage = st.garbage(ws, cfg)
    for location, size in garbage:
        click.echo(f"{'would remove' if dry_run else 'removing'} {location} ({size / 2 ** 20:.1f} MiB)")
        if dry_run:
            continue
        storage.remove(location)
        if location.endswith(".zarr"):
            split, name = location.rstrip("/").split("/")[-2:]
            for kind in ("lock.json", "writer.lock"):
                ws.store_lock(split, name[:-len(".zarr")], kind).unlink(missing_ok=True)
    total = sum(s for _, s in garbage) / 2 ** 20
    click.echo(f"gc: {len(garbage)} item(s), {total:.1f} MiB " + ("would be freed" if dry_run else "freed")
               if garbage else "gc: nothing to remove")


@main.command("config")
@_workspace_options
def config_show(ws, cfg):
    """Print the effective config (defaults + leakpipe.toml + --set) as TOML."""
    from leakpipe.pipeline.config import canonical_hash, to_toml

    click.echo(to_toml(cfg))
    click.echo(f"# canonical hash {canonical_hash(cfg.to_dict())}")


if __name__ == "__main__":  # `python -m pipeline.cli`
    main()
