"""`leakpipe manifest`, `synth`, `postprocess` and `demo`: getting images into a workspace."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from leakpipe.pipeline.cli_base import _friendly as _user_errors, _log, _print_summary, _workspace_options, main
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace


# ---------------------------------------------------------------- manifests
@main.group()
def manifest():
    """Build and inspect manifests (manifests/NAME.csv)."""


@manifest.command("build")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", "split", required=True, help="Manifest name, e.g. closed, closed-pp, open.")
@click.option(
    "--partition",
    type=click.Choice(["auto", "ratio", "file", "none"]),
    default="auto",
    show_default=True,
    help="auto: ROOT/Split.json if present, else seeded ratios.",
)
@click.option(
    "--split-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Split JSON {train|val|test: {class: [file names]}} (the authors' format).",
)
@click.option("--ratios", default="0.5,0.2,0.3", show_default=True, help="train,val,test per class.")
@click.option(
    "--group-by",
    help="A regex on each file name (its first group, e.g. 'prompt(\\d+)') or a CSV "
    "(path,group) giving each image a group: ratio splits keep a group in one partition, "
    "intervals resample groups, and score audits them for leakage.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the ratio split (the same seed and files give the same partitions).",
)
@click.option("--variant", default="raw", show_default=True, help="Variant column for every row.")
@_workspace_options
def manifest_build(ws, cfg, root, split, partition, split_file, ratios, seed, variant, group_by):
    """Scan a folder-per-generator tree ROOT/GENERATOR/IMAGE into manifests/SPLIT.csv."""
    from leakpipe.pipeline import manifest as mf

    tree = mf.scan_tree(root)
    mf.check_name(split)
    groups = mf.groups_of(tree, group_by) if group_by else None
    if partition == "auto":
        split_file = split_file or (root / "Split.json" if (root / "Split.json").exists() else None)
        partition = "file" if split_file else "ratio"
    if partition == "file":
        if split_file is None:
            raise click.UsageError("--partition file needs --split-file (or ROOT/Split.json)")
        parts, problems, split_notes = mf.partition_from_split_file(tree, split_file)
        if problems:
            raise mf.ManifestError(str(split_file), problems)
        for note in split_notes:
            _log(f"note: {note}")
        source = f"partitions from {split_file}"
    elif partition == "ratio":
        try:
            parts = mf.partition_by_ratio(tree, tuple(float(x) for x in ratios.split(",")), seed, groups)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ratios") from None
        source = f"partitions by seeded ratios {ratios} (seed {seed})" + (", whole groups" if groups else ", per class")
    else:
        parts, source = None, "no partitions (inference only)"
    rows, unassigned = mf.build_rows(tree, parts, variant, groups)
    out = ws.manifest(split)
    mf.write_manifest(out, root, rows, (*mf.REQUIRED, "group") if groups else mf.REQUIRED)
    m = mf.read_manifest(out)
    _print_summary(mf.summary(m), out)
    click.echo(f"  {source}" + (f"; {len({r['group'] for r in rows})} groups ({group_by})" if groups else ""))
    if unassigned:
        _log(f"note: {len(unassigned)} images are not listed in {split_file} and were left out, e.g. {unassigned[0]}")


@manifest.command("show")
@click.argument("name")
@_workspace_options
def manifest_show(ws, cfg, name):
    """Row counts per label, partition and variant of manifests/NAME.csv."""
    from leakpipe.pipeline import manifest as mf

    _print_summary(mf.summary(mf.read_manifest(ws.manifest(name))), ws.manifest(name))


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
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Image folder [default: WORKSPACE/data/synth]."
)
@click.option("--closed", "n_closed", default=10, show_default=True, help="Known generators.")
@click.option("--open", "n_open", default=10, show_default=True, help="Unseen generators.")
@click.option("--per-generator", default=100, show_default=True, help="Images per generator.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option(
    "--difficulty",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Fingerprint strength is 1/difficulty.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the images, the split and the post-processing.")
@click.option("--steps", default="1,2,3", show_default=True, help="Post-processing steps ('' for none).")
@click.option(
    "--variants",
    default=0,
    show_default=True,
    help="Post-processed variants of each train and val image (manifest closed-var; see postprocess --variants).",
)
@click.option("--workers", default=0, help="Worker processes [default: all cores].")
@click.option(
    "--family",
    type=click.Choice(["pixel", "decoder"]),
    default="pixel",
    show_default=True,
    help="pixel: fingerprints painted in pixel space; decoder: each generator's low-frequency latent bias "
    "(and latent noise), rendered through a real autoencoder's decoder (docs: Synthetic benchmark).",
)
@click.option(
    "--decoder",
    default="builtin:taef2",
    show_default=True,
    help="The autoencoder that encodes the content and decodes the decoder family (any vae.source with a decoder).",
)
@click.option(
    "--latent-noise/--no-latent-noise",
    default=True,
    show_default=True,
    help="Decoder family: each generator also adds its own latent noise level.",
)
@_workspace_options
def synth(ws, cfg, out, n_closed, n_open, per_generator, size, difficulty, seed, steps, variants, workers, **family):
    """Write a WILD-shaped synthetic benchmark and its manifests closed, closed-pp and open (and closed-var)."""
    from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
    from leakpipe.workflows.demo import rendering_autoencoder

    out = out or ws.root / "data" / "synth"
    spec = SynthSpec(
        n_closed,
        n_open,
        per_generator,
        size,
        difficulty,
        seed,
        _steps(steps),
        family=family["family"],
        latent_noise=family["latent_noise"],
        variants=variants,
    )
    start = time.perf_counter()
    ae = rendering_autoencoder(spec, family["decoder"], ws.root)
    written = write_benchmark(out, ws.manifests, spec, workers or None, ae)
    took = time.perf_counter() - start
    click.echo(f"synth: {sum(written.values())} images in {took:.1f} s under {out}")
    for name, n in written.items():
        click.echo(f"  manifests/{name}.csv: {n} rows")


@main.command()
@click.option("--split", required=True, help="Manifest to copy from.")
@click.option(
    "--partition",
    help="Rows to copy ('all' for every row) [default: test; with --variants: train and val, or one of them].",
)
@click.option(
    "--steps",
    default="1,2,3",
    show_default=True,
    help="Comma-separated steps k: each image of step k gets 1 to k distinct operations in random order, "
    "drawn from JPEG and WebP re-encoding, resize, crop, rotation, blur, brightness/contrast and "
    "greyscale; one variant (stepK) per step, each operation recorded in the ops column.",
)
@click.option(
    "--variants",
    "k",
    default=0,
    show_default=True,
    help="Write K variants of each train and val image instead (with --partition train or val: of that "
    "partition's), for training (train.variants) and calibration (score.variants, which reads val's): "
    "variant j draws its step from --steps and its operations with its own seed, never a test image's nor a "
    "test copy's.",
)
@click.option(
    "--ops",
    default="all",
    show_default=True,
    help="Operation families to draw from, comma-separated (jpeg, webp, resize, crop, rotate, blur, "
    "brightness_contrast, grayscale): hold one out of the variants, or test on it alone.",
)
@click.option("--name", help="Output manifest [default: SPLIT-pp; with --variants: SPLIT-var].")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Image folder [default: WORKSPACE/data/NAME]."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the operations and their parameters.")
@click.option("--workers", default=0, help="Worker processes [default: all cores].")
@_workspace_options
def postprocess(ws, cfg, split, partition, steps, k, ops, name, out, seed, workers):
    """Post-processed copies (steps 1-3: JPEG/WebP, resize, crop, rotation, blur, ...) of a manifest: test
    copies to score robustness, or (--variants K) training and calibration variants."""
    from leakpipe.pipeline import manifest as mf
    from leakpipe.pipeline.bench import postprocess as pp
    from leakpipe.pipeline.bench.datasets import PP_COLUMNS, VARIANT_PARTITIONS, postprocess_rows, variant_rows

    try:
        among = pp.families(ops)
    except ValueError as exc:
        raise UserError(f"--ops {ops}: {exc}") from None
    if k and partition not in (None, "train", "val"):
        raise UserError(
            f"--partition {partition} with --variants {k}: variants are made of the train and val images only "
            "(a variant of a test image would train on it); test copies come without --variants"
        )
    m = mf.read_manifest(ws.manifest(split))
    name = name or f"{split}-{'var' if k else 'pp'}"
    out, workers = out or ws.root / "data" / name, workers or os.cpu_count() or 1
    if k:  # --partition val: variants to calibrate on alone (score.variants reads val's)
        partitions = (partition,) if partition else VARIANT_PARTITIONS
        rows = variant_rows(m, out, k, _steps(steps), seed, workers, among, partitions)
    else:
        partition = partition or "test"
        rows = postprocess_rows(m, out, _steps(steps), seed, None if partition == "all" else partition, workers, among)
    if not rows:
        raise click.ClickException(
            f"no rows of {ws.manifest(split)} have partition {'train or val' if k else repr(partition)}"
        )
    mf.write_manifest(ws.manifest(name), out, rows, PP_COLUMNS)
    click.echo(f"postprocess: {len(rows)} images under {out} -> {ws.manifest(name)}")


@main.command()
@click.option(
    "--vae",
    "vae_source",
    help="The encoder [default: builtin:taef2, the pretrained FLUX.2 tiny autoencoder shipped with leakpipe]; "
    "'random' for a seeded random AutoencoderKL, or any VAE source (Hub id, folder, .safetensors).",
)
@click.option(
    "-C",
    "--workspace",
    "workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default="demo",
    show_default=True,
    help="Workspace folder for the demo.",
)
@click.option("--closed", "n_closed", type=int, help="Known generators [default: 10].")
@click.option("--open", "n_open", type=int, help="Unseen generators [default: 10].")
@click.option("--per-generator", type=int, help="Images per generator [default: 40].")
@click.option("--size", type=int, help="Image side in pixels, a multiple of 8 [default: 64; 128 with --vae random].")
@click.option("--epochs", type=int, help="Training epochs [default: 10].")
@_user_errors
def demo(vae_source, workspace, n_closed, n_open, per_generator, size, epochs):
    """Synthetic benchmark + every stage (encode, train, score), end to end, on a laptop CPU.

    Sizes and epochs apply when the workspace is first created; a rerun does only what is missing.
    """
    from leakpipe.workflows import demo as stage

    start = time.perf_counter()
    ws = Workspace(workspace)
    spec = stage.spec_with(vae_source, n_closed=n_closed, n_open=n_open, per_generator=per_generator, size=size)
    lines = stage.run(ws, lambda: ws.config(), vae_source, spec, epochs or stage.DEMO_EPOCHS, log=_log)
    click.echo("\n".join(lines))
    click.echo(
        f"demo finished in {time.perf_counter() - start:.0f} s; workspace {ws.root}; "
        f"report {ws.cache / 'runs' / 'default' / 'report.md'}"
    )


@main.group()
def vae():
    """The frozen VAE of stage one: make a random one for trying leakpipe offline, or inspect a source."""


@vae.command("random")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights (same seed, same bytes).")
@click.option(
    "--like",
    type=click.Choice(["sd21", "sdxl", "sd3", "flux1", "flux2"]),
    default="sd21",
    show_default=True,
    help="The layout of that generator's VAE: latent channels (4, 4, 16, 16, 32), 1/8 of the side, and its "
    "scaling_factor and shift_factor (FLUX.2: AutoencoderKLFlux2 with batch-norm statistics).",
)
@click.option(
    "--blocks",
    default="32,64,64,64",
    show_default=True,
    help="Widths of its blocks (the released ones are 128,256,512,512; 4 blocks keep the 1/8 downscale).",
)
@_user_errors
def vae_random(path, seed, like, blocks):
    """Save an AutoencoderKL with seeded random weights to PATH (by default the demo's: SD2.1's layout at
    a quarter of its width), for trying leakpipe offline and for tests."""
    from leakpipe.pipeline.engine.vae import save_random_vae

    if (path / "config.json").exists():
        raise UserError(f"{path} already holds a VAE (config.json); give a new folder")
    try:
        widths = tuple(int(b) for b in blocks.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {blocks!r}", param_hint="--blocks") from None
    save_random_vae(path, widths, seed=seed, like=like)
    click.echo(
        f"vae random: seeded random weights (seed {seed}, {like} layout) in {path}; use it with "
        f"`leakpipe encode --vae {path}`. Its numbers show the pipeline working, not a real encoder."
    )


@vae.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_user_errors
def vae_convert(src, dst):
    """Convert a PyTorch state dict (madebyollin's taesd_encoder.pth, taef2_decoder.pth, ...) to
    DST [default: SRC with .safetensors], the format leakpipe loads. SRC is read with
    torch.load(weights_only=True): tensors only, never code. The same SRC gives the same bytes."""
    from leakpipe.pipeline.engine import vae_files

    dst = dst or src.with_suffix(".safetensors")
    if dst.exists():
        raise UserError(f"{dst} exists; give another DST or remove it")
    try:
        vae_files.convert_pth(src, dst)
        layout = vae_files.taesd_layout(vae_files.safetensors_shapes(dst))
    except vae_files.WeightFileError as exc:
        raise UserError(str(exc)) from None
    what = (
        f"a TAESD-format {layout.part}, {layout.latent_channels} latent channels"
        + (", TAEF2's mid-block pool" if layout.pool else "")
        if layout
        else "not the TAESD layout (a state dict leakpipe does not encode with by itself)"
    )
    click.echo(f"vae convert: {src} (SHA-256 {vae_files.sha256(src)})")
    click.echo(f"  -> {dst} (SHA-256 {vae_files.sha256(dst)}): {what}")


@vae.command("info")
@click.argument("source")
@_workspace_options
def vae_info(ws, cfg, source):
    """Where SOURCE (Hub id, diffusers folder, .safetensors, TAESD-format encoder or builtin:taef2)
    resolves, its family, latents (channels, downscale, input range), scaling and shift against the
    workspace's latent.scale, parameter count and encoder fingerprint under the workspace's preprocessing."""
    from leakpipe.pipeline.config_files import with_overrides
    from leakpipe.pipeline.engine import vae as vae_lib
    from leakpipe.pipeline.engine.vae_conventions import conventions, scale_note
    from leakpipe.pipeline.store.hashing import HashCache
    from leakpipe.stages import STAGES

    cfg = with_overrides(cfg, [f"vae.source={source}"])
    src = vae_lib.resolve(cfg.vae, ws.root)
    arch = vae_lib.model_config(src)
    conv = conventions(src)
    total, encoder = vae_lib.parameter_counts(src)
    fp = vae_lib.encoder_fingerprint(cfg, src, HashCache(ws.hash_cache), STAGES["encode"].code_identity(src))
    keys = ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "mid_block_pool")
    where = src.label if src.kind == vae_lib.PIXELS else f"{src.kind} {src.location}"
    side = cfg.preprocess.size // conv.downscale
    lines = [
        f"source:         {source}",
        f"resolves to:    {where}",
        f"family:         {vae_lib.FAMILIES[src.family][1]}; latent space of {conv.generators}",
        f"weights:        {', '.join(str(w) for w in src.weights) or '(none)'}"
        + (f"; decoder {src.decoder}" if src.decoder else ""),
        "architecture:   " + ", ".join(f"{k} {arch[k]}" for k in keys if k in arch),
        f"latents:        {conv.latent_channels} channels at 1/{conv.downscale} of the side ({conv.latent_channels}"
        f" x {side} x {side} at preprocess.size {cfg.preprocess.size}); images in {conv.input_range}",
        f"scaling:        {conv.scaling}; leakpipe's latent.scale is {cfg.latent.scale:g}",
        f"parameters:     {total:,} ({encoder:,} in the encoder stage one runs)",
        f"fingerprint:    {fp} (store cache/latents/SPLIT/{fp[:12]}.zarr with preprocess.size "
        f"{cfg.preprocess.size}, vae.dtype {cfg.vae.dtype}, store.dtype {cfg.store.dtype})",
    ]
    if src.kind == "builtin":
        lines.append("shipped:        with leakpipe; its SHA-256 is checked when it is loaded")
    if note := scale_note(cfg.latent.scale, conv):
        lines.append(f"note:           {note}")
    if vae_lib.is_random(cfg.vae, ws.root):
        lines.append("note:           seeded random weights (leakpipe vae random or the demo), not a pretrained VAE")
    click.echo("\n".join(lines))
