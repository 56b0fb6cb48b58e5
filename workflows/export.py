"""`leakpipe export DIR`: a scored run as a self-contained attributor folder, for `attribute --model`
and the Hugging Face Hub: model.safetensors (weights, prototypes and the feature path it was trained
with), reference.safetensors (the closed training embeddings the comparators are fitted on),
calibration.safetensors (the closed validation images' KDE log-densities: the unseen p-values),
attributor.json (classes, the encoder's identity, the threshold, the decisions: temperature,
conformal thresholds and level; the code identity of the encode and embed stages and a checksum of
every file), gallery.safetensors (the report's prototype gallery),
config.json, metrics.json, a model card README.md, and app.py with requirements.txt (a Hugging Face
Space that serves `leakpipe app`'s page).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from leakpipe.pipeline.engine import attributor as att_lib
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.ledger.graph import Graph, run_config, trained_lock
from leakpipe.pipeline.report.card import model_card
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


def export(g: Graph, run: str, dest: Path, log=print) -> Exported:
    """Write the scored run's attributor to `dest` (a new or empty folder)."""
    start = time.perf_counter()
    ws, ws_cfg = g.ws, g.cfg
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} is not empty; export into a new folder")
    log(f"export {run}: reading the result and its closed training embeddings")
    att = from_result(g, run, "cpu")
    out = runs.pointed(ws, run)
    log(f"export {run}: checking result {out.name[:12]} against its lock")
    trained_lock(out, deep=True)  # a damaged model is refused, never exported
    lat = g.plan("encode", ws_cfg.score.closed, cfg=run_config(out, ws_cfg)).data
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "metrics.json"):
        shutil.copyfile(out / name, dest / name)
    save_file({k: np.ascontiguousarray(v) for k, v in att.reference.items()}, str(dest / "reference.safetensors"))
    save_file(
        {"unseen_val_scores": np.ascontiguousarray(att.val_scores, dtype=np.float64)}, str(dest / att_lib.CALIBRATION)
    )
    files = [*att_lib.FILES, att_lib.CALIBRATION]
    if att.model.prototypes is not None:
        log(f"export {run}: the prototype gallery (the training images each prototype wins, from {lat.manifest.name})")
        save_file(_gallery(att, lat.manifest), str(dest / att_lib.GALLERY))
        files.append(att_lib.GALLERY)
    # where the VAE is from any folder: an absolute local path or the Hub id, never a workspace-relative path
    vae_source = vae_lib.recorded_source(att.cfg.vae.source, ws.root)
    vae_config = vae_lib.recorded_source(att.cfg.vae.config, ws.root) if att.cfg.vae.config else ""
    record = {
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
            "random_weights": vae_lib.is_random(att.cfg.vae, ws.root),
        },
        "code": code_identity(),
        "unseen_threshold": att.threshold,
        "decisions": att.decisions,
        "score": {"maha_floor": ws_cfg.score.maha_floor, "kde_dtype": ws_cfg.score.kde_dtype},
        "files": {name: att_lib.hash_file(dest / name) for name in files},
    }
    (dest / "attributor.json").write_text(json.dumps(record, indent=1))
    (dest / "README.md").write_text(model_card(record, json.loads((out / "metrics.json").read_text()), att.cfg))
    for name, text in space_files().items():  # not checksummed: a Space owner may edit them
        (dest / name).write_text(text)
    return Exported(run, out.name, dest, sorted(p.name for p in dest.iterdir()), time.perf_counter() - start)


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
