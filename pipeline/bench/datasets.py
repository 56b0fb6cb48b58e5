"""Writing image trees and their manifests: the synthetic benchmark and post-processed copies.

Work is spread over worker processes, one image per task; every image is seeded by its own
identity (generator, index or path, step), so the bytes do not depend on worker count or order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from leakpipe.pipeline import manifest as mf
from leakpipe.pipeline.bench import postprocess
from leakpipe.pipeline.bench import rendered
from leakpipe.pipeline.bench import synth

PP_COLUMNS = (*mf.REQUIRED, "ops", "group", "source")  # source: SPLIT:PATH of the image it was made from


@dataclass
class SynthSpec:
    n_closed: int = 10
    n_open: int = 10
    per_generator: int = 100
    size: int = 256
    difficulty: float = 1.0
    seed: int = 0
    steps: tuple[int, ...] = (1, 2, 3)
    # pixel: fingerprints painted in pixel space (synth.py) | decoder: latent biases rendered through a
    # real autoencoder's decoder (rendered.py), which write_benchmark is then given
    family: str = "pixel"
    latent_noise: bool = True  # decoder family: each generator adds its own latent noise level too
    variants: int = 0  # post-processed variants of each train and val image (closed-var), drawn from `steps`


def _pool_map(fn, tasks: list, workers: int) -> None:
    if workers <= 1 or len(tasks) < 8:
        for t in tasks:
            fn(t)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(fn, tasks, chunksize=8):
            pass


def _save_png(arr_or_image, path: Path) -> None:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "PNG", compress_level=1)


def _synth_task(task) -> None:
    fp, seed, index, size, path = task
    _save_png(synth.synth_image(fp, seed, index, size), path)


def _pp_task(task) -> None:
    src, dst, ops = task
    with Image.open(src) as im:
        _save_png(postprocess.apply_ops(im, ops), dst)


def generator_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


def write_generators(root: Path, names: list[str], spec: SynthSpec, workers: int, autoencoder=None) -> None:
    if spec.family == "decoder":
        return write_rendered(root, names, spec, autoencoder)
    tasks = []
    for name in names:
        fp = synth.make_fingerprint(name, spec.seed, spec.difficulty)
        tasks += [(fp, spec.seed, i, spec.size, root / name / f"{i:05d}.png") for i in range(spec.per_generator)]
    _pool_map(_synth_task, tasks, workers)


def write_rendered(root: Path, names: list[str], spec: SynthSpec, autoencoder) -> None:
    """The decoder family's images, chunk by chunk through `autoencoder` (torch's threads, no workers):
    each chunk's content encoded once, then decoded with each generator's latents."""
    import torch

    if autoencoder is None:
        raise ValueError("the decoder family needs an autoencoder with a decoder")
    autoencoder = autoencoder.to(memory_format=torch.channels_last)
    channels = rendered.latent_channels(autoencoder, spec.size)
    leaks = [rendered.make_leak(name, spec.seed, channels, spec.difficulty, spec.latent_noise) for name in names]
    for start in range(0, spec.per_generator, rendered.CHUNK):
        z = rendered.encode_chunk(autoencoder, spec.seed, start, spec.size)
        for leak in leaks:
            images = rendered.render_chunk(autoencoder, z, leak, spec.seed, start)
            for i, arr in enumerate(images[: spec.per_generator - start], start):
                _save_png(arr, root / leak.name / f"{i:05d}.png")


def _copy_row(m: mf.Manifest, row: dict, rel: str, variant: str, ops: str) -> dict:
    """The manifest row of a post-processed copy of `row` at `rel`: same label, partition and group,
    its source recorded (SPLIT:PATH), so the leakage audit treats it as that image."""
    return {
        **row,
        "path": str(Path(rel).with_suffix(".png")),
        "variant": variant,
        "ops": ops,
        "group": row.get("group", ""),
        "source": f"{m.name}:{row['path']}",
    }


def postprocess_rows(
    m: mf.Manifest, out: Path, steps, seed: int, partition: str | None, workers: int, among=postprocess.OPS
) -> list[dict]:
    """Post-processed copies of `m`'s rows (of one partition, or all) under out/step<k>/<path>, drawn
    from the operation families `among` (the variant names them when they are not all of OPS)."""
    suffix = "" if tuple(among) == postprocess.OPS else "-" + "+".join(among)

    def copies():
        for row in m.rows:
            for step in steps if partition is None or row["partition"] == partition else ():
                ops = postprocess.draw_ops(step, synth.rng_for(seed, "postprocess", step, row["path"]), among)
                yield row, f"step{step}{suffix}/{row['path']}", f"step{step}{suffix}", ops

    return _write_copies(m, out, copies(), workers)


VARIANT_PARTITIONS = ("train", "val")  # variants train the model and calibrate its decisions; never test


def variant_rows(
    m: mf.Manifest,
    out: Path,
    k: int,
    steps,
    seed: int,
    workers: int,
    among=postprocess.OPS,
    partitions: tuple[str, ...] = VARIANT_PARTITIONS,
) -> list[dict]:
    """`k` post-processed variants of each row of `m` in `partitions` (train and val, or one of them) under
    out/v<j>/<path>, for training (train.variants) and calibration (score.variants, which reads val's).
    Variant j of an image draws its step from `steps` and its operations from `among` with its own seed
    (seed, "variant", j, path): never a test row's, nor a test copy's seed (seed, "postprocess", step,
    path). The variant column is the step."""

    def copies():
        for row in m.rows:
            for j in range(k) if row["partition"] in partitions else ():
                step, ops = postprocess.draw_variant(synth.rng_for(seed, "variant", j, row["path"]), steps, among)
                yield row, f"v{j}/{row['path']}", f"step{step}", ops

    return _write_copies(m, out, copies(), workers)


def write_variants(
    out: Path, manifests: Path, k: int, steps, seed: int, workers: int, partitions=VARIANT_PARTITIONS
) -> int:
    """variant_rows of the closed split's `partitions` under out/closed-var, with their manifest closed-var;
    the number of rows."""
    m = mf.read_manifest(mf.manifest_path(manifests, "closed"))
    rows = variant_rows(m, Path(out) / "closed-var", k, steps, seed, workers, partitions=partitions)
    mf.write_manifest(mf.manifest_path(manifests, "closed-var"), Path(out) / "closed-var", rows, PP_COLUMNS)
    return len(rows)


def _write_copies(m: mf.Manifest, out: Path, copies, workers: int) -> list[dict]:
    """The rows, and the images, of the copies `copies` yields as (source row, path, variant, ops)."""
    rows, tasks = [], []
    for row, rel, variant, ops in copies:
        rows.append(_copy_row(m, row, rel, variant, ops))
        tasks.append((m.root / row["path"], out / rows[-1]["path"], ops))
    _pool_map(_pp_task, tasks, workers)
    return rows


def write_benchmark(out: Path, manifests: Path, spec: SynthSpec, workers: int | None = None, autoencoder=None) -> dict:
    """closed/, closed-pp/ (and closed-var/ with spec.variants) and open/ image trees under `out`, manifests
    in `manifests`; the decoder family renders through `autoencoder` (encode/decode in leakpipe's
    convention, engine/autoencoders)."""
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    closed, opened = generator_names("closed", spec.n_closed), generator_names("open", spec.n_open)
    write_generators(out / "closed", closed, spec, workers, autoencoder)
    tree = mf.scan_tree(out / "closed")
    rows, _ = mf.build_rows(tree, mf.partition_by_ratio(tree, seed=spec.seed))
    mf.write_manifest(mf.manifest_path(manifests, "closed"), out / "closed", rows)
    written = {"closed": len(rows)}
    if spec.steps:
        m = mf.read_manifest(mf.manifest_path(manifests, "closed"))
        pp = postprocess_rows(m, out / "closed-pp", spec.steps, spec.seed, "test", workers)
        mf.write_manifest(mf.manifest_path(manifests, "closed-pp"), out / "closed-pp", pp, PP_COLUMNS)
        written["closed-pp"] = len(pp)
    if spec.variants and spec.steps:
        written["closed-var"] = write_variants(out, manifests, spec.variants, spec.steps, spec.seed, workers)
    if opened:
        write_generators(out / "open", opened, spec, workers, autoencoder)
        rows, _ = mf.build_rows(mf.scan_tree(out / "open"), None)
        mf.write_manifest(mf.manifest_path(manifests, "open"), out / "open", rows)
        written["open"] = len(rows)
    return written
