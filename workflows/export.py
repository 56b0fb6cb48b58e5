"""`leakpipe export DIR`: a scored run as a self-contained attributor folder, for `attribute --model`
and the Hugging Face Hub: model.safetensors (weights, prototypes and the feature path it was trained
with), reference.safetensors (the closed training embeddings the comparators are fitted on, and the
validation embeddings for score.maha_rows = train_val),
calibration.safetensors (the closed validation images' KDE log-densities: the unseen p-values),
attributor.json (classes, the encoder's identity, the threshold, the decisions: temperature,
conformal thresholds and level; the code identity of the encode and embed stages and a checksum of
every file), gallery.safetensors (the report's prototype gallery),
config.json, metrics.json, a model card README.md, and app.py with requirements.txt (a Hugging Face
Space that serves `leakpipe app`'s page).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from leakpipe.pipeline.engine import attributor as att_lib
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.images import allow_pixels
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.ledger.graph import Graph, run_config, trained_lock
from leakpipe.pipeline.ledger.results import metrics_bytes, trained_bytes
from leakpipe.pipeline.report.scored import load_metrics
from leakpipe.pipeline.report.card import model_card
from leakpipe.pipeline.store.atomic import atomic_write_bytes, atomic_write_text
from leakpipe.pipeline.store.hashing import hash_file
from leakpipe.stages.attribute import code_identity, from_result
from leakpipe.workflows.app import space_files


@dataclass
class Exported:
    """What `export` wrote: the folder, its files, and how long it took."""

    run: str
    result: str
    dest: Path
    files: list[str]
    seconds: float

    def summary(self) -> str:
        size = sum((self.dest / f).stat().st_size for f in self.files)
        return (
            f"export {self.run}: result {self.result[:12]} -> {self.dest}, {len(self.files)} files "
            f"({', '.join(self.files)}), {size / 1e6:.1f} MB in {self.seconds:.1f} s; attribute with "
            f"`leakpipe attribute --model {self.dest} IMAGE...`, serve a web page with `leakpipe app "
            f"--model {self.dest}`, or push the folder as a Hugging Face Space (see the docs' user guide)"
        )


def check_target(dest: Path) -> None:
    """DEST must be a new folder or an empty one: every other case is said, with what to do."""
    if dest.is_symlink() and not dest.exists():
        raise UserError(
            f"{dest} is a symbolic link to {os.readlink(dest)}, which does not exist; remove the link "
            "or export into another folder"
        )
    for parent in [dest, *dest.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(
                f"{dest}: {parent} is a file, not a folder; export into a folder"
                + ("" if parent == dest else " whose parents are folders")
            )
    if dest.is_dir() and any(dest.iterdir()):
        what = "an attributor exported before" if (dest / "attributor.json").exists() else "other files"
        raise UserError(f"{dest} is not empty (it holds {what}); export into a new folder, or remove it first")


def _partial(dest: Path) -> Path:
    """Where this process builds the export: a hidden sibling named by its pid, renamed onto DEST last."""
    return dest.with_name(f".{dest.name}.export-{os.getpid()}.tmp")


def _sweep_partials(dest: Path, log) -> None:
    """Remove what killed exports into DEST left beside it (their process is gone), saying so."""
    for old in dest.parent.glob(f".{dest.name}.export-*.tmp"):
        pid = old.name.rsplit("-", 1)[-1].removesuffix(".tmp")
        try:
            os.kill(int(pid), 0)
            continue  # another export into DEST is running: its folder is its own
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(old, ignore_errors=True)
        log(f"export: removed {old}, a partial export left by a killed export (pid {pid}); it never was {dest}")


def export(g: Graph, run: str, dest: Path, log=lambda msg: None, requirement: str | None = None) -> Exported:
    """Write the scored run's attributor to `dest` (a new or empty folder), atomically: it is built in a
    hidden sibling folder and renamed onto `dest`, so a partial export never exists under that name. The
    run must be up to date (see stages.attribute.from_result); every file copied from the run is checked
    against its lock as it is read, and attributor.json records a checksum of every file and of itself."""
    start = time.perf_counter()
    ws, ws_cfg = g.ws, g.cfg
    dest = Path(dest).absolute()
    check_target(dest)
    log(f"export {run}: reading the result and its closed training embeddings")
    att = from_result(g, run, "cpu")  # the run's checks: scored, up to date, metrics checked and validated
    out = runs.scored_result(ws, run)
    log(f"export {run}: checking result {out.name[:12]} against its lock")
    trained_lock(out, deep=True)  # a damaged model is refused, never exported
    allow_pixels(att.cfg.preprocess.max_pixels)  # the gallery's thumbnails
    lat = g.plan("encode", ws_cfg.score.closed, cfg=run_config(out, ws_cfg)).data
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(dest, log)
    tmp = _partial(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(att, run, out, lat, tmp, ws.root, ws_cfg, code_identity(g.stages), log, requirement)
        os.replace(tmp, dest)  # onto a new name or an empty folder: atomic
    except OSError:
        if dest.is_dir() and any(dest.iterdir()):
            raise UserError(
                f"{dest} was filled by another process while this export ran; nothing of this one was kept"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(run, out.name, dest, sorted(p.name for p in dest.iterdir()), time.perf_counter() - start)


def _write(att, run: str, out: Path, lat, dest: Path, root: Path, ws_cfg, code: dict, log, requirement=None) -> None:
    """The attributor's files in `dest`: those of the run as their locks vouch for them, the rest made here.
    Every file is written through the one writer (store/atomic.py): the umask's permissions, fsync'ed."""
    for name, data in (
        ("model.safetensors", trained_bytes(out, "model.safetensors")),
        ("config.json", trained_bytes(out, "config.json")),
        ("metrics.json", metrics_bytes(out, run)),
        ("reference.safetensors", save({k: np.ascontiguousarray(v) for k, v in att.reference.items()})),
        (att_lib.CALIBRATION, save({"unseen_val_scores": np.ascontiguousarray(att.val_scores, dtype=np.float64)})),
    ):
        atomic_write_bytes(dest / name, data)
    files = list(att_lib.FILES)
    if att.model.prototypes is not None:
        log(f"export {run}: the prototype gallery (the training images each prototype wins, from {lat.manifest.name})")
        atomic_write_bytes(dest / att_lib.GALLERY, save(_gallery(att, lat.manifest)))
        files.append(att_lib.GALLERY)
    record = _record(att, run, out, lat, root, ws_cfg, code)
    # the model card, the Space's entry point and its requirements are checksummed with the rest: app.py
    # is the code a Space runs and the card states the numbers (a Space owner who edits them exports again)
    atomic_write_text(dest / "README.md", model_card(record, load_metrics(out, run), att.cfg))
    for name, text in space_files(requirement).items():
        atomic_write_text(dest / name, text)
    record["files"] = {name: hash_file(dest / name) for name in [*files, *att_lib.SPACE_FILES]}
    record["checksum"] = att_lib.record_checksum(record)
    atomic_write_text(dest / "attributor.json", json.dumps(record, indent=1))


def _record(att, run: str, out: Path, lat, root: Path, ws_cfg, code: dict) -> dict:
    """attributor.json without its file checksums and its own checksum (see engine/attributor.SCHEMA)."""
    # where the VAE is from any folder: an absolute local path or the Hub id, never a workspace-relative path
    vae_source = vae_lib.recorded_source(att.cfg.vae.source, root)
    vae_config = vae_lib.recorded_source(att.cfg.vae.config, root) if att.cfg.vae.config else ""
    return {
        "format": att_lib.FORMAT,
        "classes": att.classes,
        "run": run,
        "result": out.name,
        "encoder": {
            "vae_source": vae_source,
            "vae_config_file": vae_config,
            "encoder_fingerprint": lat.encoder_fp,
            "vae_config": vae_lib.model_config(lat.source),
            "preprocess": att.cfg.preprocess.__dict__,
            "vae_dtype": att.cfg.vae.dtype,
            "store_dtype": att.cfg.store.dtype,
            "random_weights": vae_lib.is_random(att.cfg.vae, root),
        },
        "code": code,
        "unseen_threshold": att.threshold,
        "decisions": att.decisions,
        "score": {k: getattr(ws_cfg.score, k) for k in ("maha_shared", "maha_rows", "maha_floor", "kde_dtype")},
    }


def _gallery(att, manifest) -> dict:
    """The report's prototype gallery as tensors: `thumbnails` (C, M, K, THUMB, THUMB, 3) uint8, the
    training images each prototype wins (nearest first), and `count` (C, M), how many of K are real."""
    from leakpipe.pipeline.report.explain_figures import THUMB, nearest_to_prototypes, prototype_thumbnails
    from leakpipe.pipeline.report.scoring import GALLERY_K

    protos = att.model.prototypes.detach().float().cpu().numpy()
    near = nearest_to_prototypes(att.reference["h_bar"], att.reference["w"], att.reference["labels"], protos, GALLERY_K)
    pictures = prototype_thumbnails(near, lambda i: manifest.abspath(int(att.rows[i])), att.cfg.preprocess)
    thumbs = np.full((*near.shape, THUMB, THUMB, 3), 255, np.uint8)
    count = np.zeros(near.shape[:2], np.int64)
    for c, per_class in enumerate(pictures):
        for m, images in enumerate(per_class):
            count[c, m] = len(images)
            for j, im in enumerate(images):
                thumbs[c, m, j] = im
    return {"thumbnails": thumbs, "count": count}
