"""The `leakpipe` command. Heavy libraries (torch, diffusers, zarr) are imported inside commands
that need them, so `status`, `manifest` and no-op reruns start fast."""

from __future__ import annotations

import json
from pathlib import Path

import click

from leakpipe.pipeline.cli_base import _log, _workspace_options, main


# ---------------------------------------------------------------- stage one
@main.command()
@click.option("--split", "splits", multiple=True, required=True, help="Manifest name (repeatable).")
@click.option(
    "--vae",
    "vae_source",
    help="Hub id, diffusers folder or .safetensors (vae.source). Saved in "
    "the workspace config, so later commands use this encoder's cache.",
)
@click.option("--skip-bad", is_flag=True, help="Accept the split without unreadable images.")
@click.option("--workers", type=int, help="Encode on a local dask cluster of N worker processes.")
@click.option("--scheduler", help="Encode on an existing dask cluster (scheduler address).")
@_workspace_options
def encode(ws, cfg, splits, vae_source, skip_bad, workers, scheduler, config_file, overrides, profile):
    """Stage one: encode images to z0 moments in cache/latents/SPLIT/FP12.zarr (FP12: the encoder
    fingerprint's first 12 hex digits)."""
    from leakpipe.pipeline.config_files import with_overrides
    from leakpipe.stages import encode as stage, graph

    set_vae = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "vae.source"]
    if vae_source or set_vae:  # --set vae.source=X on encode is remembered as --vae X is
        cfg = _persist_vae(
            ws,
            cfg,
            vae_source or _workspace_path(ws, set_vae[-1]),
            config_file,
            overrides,
            "--vae" if vae_source else "--set vae.source",
        )
    flags = {"encode.skip_bad": skip_bad and "true", "encode.workers": workers, "encode.scheduler": scheduler}
    cfg = with_overrides(cfg, [f"{k}={v}" for k, v in flags.items() if v not in (None, "", False)])
    g = graph(ws, cfg)
    for split in splits:
        click.echo(stage.run(g, split, log=_log).summary())


def _workspace_path(ws, source: str) -> str:
    """A config value's relative path is relative to the workspace (a --vae path, to the current folder)."""
    inside = ws.root / source
    return str(inside) if not Path(source).expanduser().is_absolute() and inside.exists() else source


def _persist_vae(ws, cfg, source: str, config_file, overrides, flag: str = "--vae"):
    """`--vae` (or `--set vae.source`) on encode is the workspace's encoder from now on: saved as
    vae.source in its config file (a local path relative to the workspace when it lies inside it), so
    train, score, status and attribute find this encoder's cache with no flag. Returns the config with it."""
    from leakpipe.pipeline.config_files import persist_setting, with_overrides
    from leakpipe.pipeline.engine.vae import resolve

    local = Path(source).expanduser()
    if local.exists():
        local = local.resolve()
        source = "./" + local.relative_to(ws.root).as_posix() if local.is_relative_to(ws.root) else str(local)
    cfg = with_overrides(cfg, [f"vae.source={source}"])
    src = resolve(cfg.vae, ws.root)  # a source that cannot be found is an error before anything is saved
    path = config_file or ws.root / "leakpipe.toml"
    was = persist_setting(path, "vae.source", source)
    if was != source:
        from leakpipe.pipeline.config import Config

        _log(
            f"note: vae.source = {source} saved in {path} by {flag} (was {was or 'the default'}): train, "
            "score, status and attribute now use this encoder's cache with no flag; `leakpipe encode --split "
            f"SPLIT --vae {was or Config().vae.source}` switches back"
        )
    if flag == "--vae" and any(o.split("=", 1)[0].strip() == "vae.source" for o in overrides):
        _log("note: --set vae.source was given as well; --vae wins for this command")
    given = any(o.split("=", 1)[0].strip() == "latent.scale" for o in overrides)
    return _follow_scale(cfg, src, path, switched=was != source and not given)


def _follow_scale(cfg, src, path, switched: bool):
    """A new VAE brings its family's latent.scale (its scaling factor, Eq. 1), saved beside vae.source,
    unless this command set latent.scale; otherwise a latent.scale that is not the family's is named."""
    from leakpipe.pipeline.config_files import persist_setting, with_overrides
    from leakpipe.pipeline.engine.vae_conventions import conventions, scale_note

    conv = conventions(src)
    note = scale_note(cfg.latent.scale, conv)
    if note and switched:
        was = persist_setting(path, "latent.scale", conv.scale)
        _log(
            f"note: latent.scale = {conv.scale:g} saved in {path} with it (was {was or 'the default'}): this VAE "
            f"family's own scaling factor, so that z0 is the latent its generators' diffusion models see; set "
            "another there by hand (train's log gives 1/std of z0)"
        )
        return with_overrides(cfg, [f"latent.scale={conv.scale}"])
    if note:
        _log(f"note: {note}")
    return cfg


# ---------------------------------------------------------------- stage two
@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="Run name (ablations).")
@click.option(
    "--seeds",
    help="Comma-separated training seeds: one run NAME-seedS per seed over the same "
    "cache, recorded as the seed group NAME (score and compare then show mean +- sd).",
)
@_workspace_options
def train(ws, cfg, run_name, seeds):
    """Stage two: train from the latent cache (or resume, or restore a stored result), then embed
    every encoded split. Results are kept per config in cache/results/; RUN points at one."""
    from leakpipe.pipeline.config_files import with_overrides
    from leakpipe.pipeline.engine.ddp import launched_rank
    from leakpipe.pipeline.ledger import runs
    from leakpipe.stages import graph
    from leakpipe.stages import train as stage
    from leakpipe.workflows.pipeline import train_and_embed

    main_rank = launched_rank() == 0  # under torchrun only rank 0 reports
    seed_list = _seeds(seeds) if seeds is not None else [cfg.train.seed]
    names = [f"{run_name}-seed{s}" for s in seed_list] if seeds is not None else [run_name]
    for seed, name in zip(seed_list, names):
        g = graph(ws, with_overrides(cfg, [f"train.seed={seed}"]))
        if main_rank:
            click.echo(train_and_embed(g, name, log=_log).summary())
        else:
            stage.run(g, name, log=lambda msg: None)
    if seeds is not None and main_rank:
        runs.write_seed_group(ws, run_name, seed_list, names)
        click.echo(f"seed group {run_name}: {', '.join(names)}; `leakpipe score --run {run_name}` scores them all")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--seeds") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"got {text!r}; give at least two distinct seeds, e.g. 0,1,2", param_hint="--seeds")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:  # checked before any seed trains (train.seed takes 0 to 2**32 - 1)
        raise click.BadParameter(
            f"{', '.join(map(str, bad))}: a seed is an integer from 0 to 2**32 - 1", param_hint="--seeds"
        )
    return seeds


# ---------------------------------------------------------------- stage three
@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="Run to score.")
@click.option(
    "--dual",
    is_flag=True,
    help="Also report the paper's 'dual' open-set setting (not a detector: it uses each sample's ground-truth domain).",
)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout.")
@_workspace_options
def score(ws, cfg, run_name, dual, as_json):
    """Stage three: metrics, open-set KDE, report.md and figures from the run's embeddings."""
    from leakpipe.pipeline.config_files import with_overrides
    from leakpipe.pipeline.ledger import runs
    from leakpipe.stages import graph
    from leakpipe.stages import score as stage
    from leakpipe.workflows.compare import seeds_table

    g = graph(ws, with_overrides(cfg, ["score.dual=true"]) if dual else cfg)
    members = runs.seed_group(ws, run_name)
    for name in members or [run_name]:
        result = stage.run(g, name, log=_log)  # embeds what it reads first
        click.echo(json.dumps(result.metrics, indent=1) if as_json else result.summary())
    if members and not as_json:
        click.echo(seeds_table(ws, run_name, members, g.cfg))


@main.command()
@click.option("--run", "run_name", default="default", show_default=True, help="A trained run.")
@click.option("--split", "splits", multiple=True, help="Only these splits (repeatable) [default: every encoded one].")
@_workspace_options
def embed(ws, cfg, run_name, splits):
    """Embeddings (h_bar, w, a_t, logits) of encoded splits under a trained run; `train` and `score`
    run it too."""
    from leakpipe.stages import embed as stage, graph

    done = stage.run(graph(ws, cfg), run_name, log=_log, splits=list(splits) or None)
    click.echo(f"embed {run_name}: " + (f"embedded {', '.join(done)}" if done else "up to date, nothing to do"))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--run", "run_name", default="default", show_default=True, help="A scored run of the workspace.")
@click.option(
    "--model",
    help="An exported attributor instead of a run: a folder written by `leakpipe export`, "
    "or a Hugging Face Hub repository id holding one; works outside any workspace.",
)
@click.option(
    "--vae",
    "vae_source",
    help="Where the attributor's VAE is on this machine (Hub id, folder or "
    ".safetensors) [default: the recorded source]; it must have the recorded encoder fingerprint.",
)
@click.option("--top", default=3, show_default=True, help="How many generators (and gated features) to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--allow-code-change",
    is_flag=True,
    help="Attribute with an exported attributor whose code (encode "
    "and embed stages) differs from this leakpipe's; each result says so.",
)
@_workspace_options
def attribute(
    ws, cfg, images, run_name, model, vae_source, top, as_json, allow_code_change, config_file, overrides, profile
):
    """Which generator made IMAGE? Top generators, Mahalanobis, unseen-generator flag, explanation.
    The attributor's own preprocessing is used; --set preprocess.max_pixels raises its size guard."""
    from leakpipe.stages import attribute as stage, graph

    results = stage.run(graph(ws, cfg), list(images), run_name, top, model, vae_source, allow_code_change, overrides)
    click.echo(json.dumps(results, indent=1) if as_json else stage.format_text(results))


@main.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--run", "run_name", default="default", show_default=True, help="The scored run to export.")
@_workspace_options
def export(ws, cfg, dest, run_name):
    """Write a scored run as a self-contained attributor folder DEST (weights, reference embeddings,
    threshold, encoder identity, metrics, model card) for `leakpipe attribute --model`."""
    from leakpipe.stages import graph
    from leakpipe.workflows.export import export as do_export

    click.echo(do_export(graph(ws, cfg), run_name, dest, log=_log).summary())


@main.command()
@click.option(
    "--model",
    required=True,
    help="The attributor: a folder written by `leakpipe export`, or a Hugging Face Hub repository id holding one.",
)
@click.option(
    "--vae",
    "vae_source",
    help="Where the attributor's VAE is on this machine (Hub id, folder or "
    ".safetensors) [default: the recorded source]; it must have the recorded encoder fingerprint.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; the default serves this machine only (0.0.0.0: every network interface).",
)
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--top", default=3, show_default=True, help="How many generators (and gated features) to show.")
@_workspace_options
def app(ws, cfg, model, vae_source, host, port, top):
    """A web page for an attributor: drop images, see the top generators, the unseen-generator verdict
    and the explanation (needs the `app` extra: pip install 'leakpipe[app]')."""
    from leakpipe.workflows.app import serve

    serve(model, vae_source, host, port, cfg, top, log=_log, echo=click.echo)


@main.command()
@click.option("--only", help="Comma-separated ablations [default: all of them].")
@click.option(
    "--logo",
    is_flag=True,
    help="Leave-one-generator-out instead of the ablations: one run per known "
    "generator, trained without it, its test images scored as an unseen generator (AUROC per generator).",
)
@click.option("--list", "list_only", is_flag=True, help="List the runs the sweep would make and their settings.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Result table [default: WORKSPACE/cache/sweep.md, or cache/sweep-logo.md with --logo].",
)
@_workspace_options
def sweep(ws, cfg, only, logo, list_only, out):
    """Ablations of the paper's Tables 3-5 over one latent cache (train + score each, then compare), or
    with --logo the leave-one-generator-out open set."""
    from leakpipe.workflows import sweep as stage
    from leakpipe.workflows.compare import compare as compare_runs, write_compare

    if logo and only:
        raise click.UsageError("--logo makes its own runs (one per generator); leave out --only")
    plan = stage.logo(ws, cfg) if logo else stage.select(only)
    if list_only:
        for n, overrides in plan.items():
            click.echo(f"{n:<18} {' '.join(overrides) or '(workspace config)'}")
        return
    params = click.get_current_context().params  # the workspace's --config and --set come first
    names, skipped, failed = stage.run(
        ws,
        lambda extra: ws.config(params["config_file"], [*params["overrides"], *extra], params["profile"]),
        plan,
        log=_log,
    )
    table = stage.logo_table(ws, names) if logo else compare_runs(ws, names, cfg)
    table += "".join(
        f"\n{title} (the rest of the sweep ran):\n\n" + "".join(f"- {k}: {v}\n" for k, v in part.items())
        for title, part in (("Not run here", skipped), ("Failed", failed))
        if part
    )
    out = out or ws.cache / ("sweep-logo.md" if logo else "sweep.md")
    write_compare(out, table)
    click.echo(table + f"-> {out}")
    if failed:
        raise SystemExit(1)


@main.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table (markdown) here.")
@_workspace_options
def compare(ws, cfg, runs, out):
    """Top-1 and macro AUC (head, Mahalanobis), post-processing and open set, one row per scored RUN."""
    from leakpipe.workflows import compare as stage

    table = stage.compare(ws, list(runs), cfg)
    if out:
        stage.write_compare(out, table)
    click.echo(table + (f"-> {out}" if out else ""))


# the other commands register themselves on `main`
from leakpipe.pipeline import cli_data, cli_ledger  # noqa: E402,F401


if __name__ == "__main__":  # `python -m pipeline.cli`
    main()
