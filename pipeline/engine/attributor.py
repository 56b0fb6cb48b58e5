"""A trained attributor as `leakpipe attribute` uses it: the model, its comparators (Mahalanobis, the
unseen-generator KDE) and the encoder it expects, from a scored run or from an exported folder.

An exported folder is self-contained: `model.safetensors` (weights, prototypes, feature statistics),
`reference.safetensors` (the closed training embeddings the comparators are fitted on),
`gallery.safetensors` (thumbnails of the training images each prototype wins, nearest first),
`attributor.json` (classes, encoder identity, threshold, checksums of every file), `config.json`,
`metrics.json`, a model card `README.md` (Hugging Face Hub conventions), and `app.py` with
`requirements.txt`, so that the folder also runs as a Hugging Face Space (`leakpipe app`'s page).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import HASH_BYTES

FORMAT = "leakpipe-attributor-1"
FILES = ("model.safetensors", "reference.safetensors", "config.json", "metrics.json")  # needed to attribute
GALLERY = "gallery.safetensors"  # optional (a linear head has no prototypes); checksummed like FILES


@dataclass
class Attributor:
    model: object
    build: object
    classes: list[str]
    cfg: Config  # the config it was trained with (VAE, preprocessing, features)
    reference: dict  # h_bar, w (float32) and labels of the closed training rows
    threshold: dict  # metrics.json's unseen_threshold
    name: str  # "run NAME (result X)" or the folder
    result: str  # the trained result's fingerprint prefix (cache/results/<result>)
    encoder_fp: str | None = None  # recorded encoder fingerprint (exported folders)
    base: Path | None = None  # what a relative vae.source is relative to
    rows: np.ndarray | None = None  # manifest rows of the reference embeddings (scored runs)
    folder: Path | None = None  # the exported folder it was read from

    def comparators(self, cfg_score):
        """Mahalanobis (Eq. 13) and the unseen KDE, fitted on the reference embeddings."""
        from leakpipe.pipeline.math.kde import GaussianKDE
        from leakpipe.pipeline.math.mahalanobis import Mahalanobis
        from leakpipe.pipeline.report.evaluate import embedding

        h = self.reference["h_bar"].astype(np.float64)
        maha = Mahalanobis(len(self.classes), cfg_score.maha_floor).fit(h, self.reference["labels"])
        kde = GaussianKDE(bandwidth=self.threshold["bandwidth"], dtype=cfg_score.kde_dtype)
        return maha, kde.fit(embedding(h, self.reference["w"], self.threshold["embedding"]))


def _hash(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=HASH_BYTES).hexdigest()


def from_result(ws, ws_cfg: Config, run: str, device) -> Attributor:
    """The attributor of a scored run in a workspace."""
    from leakpipe.pipeline.engine.trained import load_split, load_trained
    from leakpipe.pipeline.ledger import runs
    from leakpipe.pipeline.report.evaluate import label_index

    out = runs.pointed(ws, run)
    if out is None or not (out / "metrics.json").exists():
        raise UserError(f"run {run!r} has not been scored (no metrics.json in {runs.link(ws, run)}); "
                        f"run `leakpipe score --run {run}` first (it calibrates the unseen threshold)")
    m = json.loads((out / "metrics.json").read_text())
    model, build, classes, cfg = load_trained(out, device)
    closed, _ = load_split(ws, out, ws_cfg.score.closed)
    tr = closed.select((closed.partition == "train") & np.isin(closed.labels, classes))
    reference = {"h_bar": tr.arrays["h_bar"], "w": tr.arrays["w"], "labels": label_index(tr, classes)}
    return Attributor(model, build, classes, cfg, reference, m["unseen_threshold"], f"run {run} (result {out.name})",
                      out.name, base=ws.root, rows=tr.ids["row"])


def export(ws, ws_cfg: Config, run: str, dest: Path) -> Path:
    """Write the scored run's attributor to `dest` (a new or empty folder)."""
    from safetensors.numpy import save_file

    from leakpipe.pipeline.ledger import graph, runs

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} is not empty; export into a new folder")
    att = from_result(ws, ws_cfg, run, "cpu")
    out = runs.pointed(ws, run)
    graph.trained_lock(out, deep=True)  # a damaged model is refused, never exported
    lat = graph.latents(ws, graph.run_config(out, ws_cfg), ws_cfg.score.closed)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "metrics.json"):
        shutil.copyfile(out / name, dest / name)
    save_file({k: np.ascontiguousarray(v) for k, v in att.reference.items()}, str(dest / "reference.safetensors"))
    files = list(FILES)
    if att.model.prototypes is not None:
        save_file(_gallery(att, lat.manifest), str(dest / GALLERY))
        files.append(GALLERY)
    from leakpipe.pipeline.engine import vae as vae_lib

    # where the VAE is from any folder: an absolute local path or the Hub id, never a workspace-relative path
    vae_source = vae_lib.recorded_source(att.cfg.vae.source, ws.root)
    vae_config = vae_lib.recorded_source(att.cfg.vae.config) if att.cfg.vae.config else ""
    record = {"format": FORMAT, "classes": att.classes, "run": run, "result": out.name,
              "encoder": {"vae_source": vae_source, "vae_config_file": vae_config,
                          "encoder_fingerprint": lat.encoder_fp,
                          "vae_config": vae_lib.model_config(lat.source), "preprocess": att.cfg.preprocess.__dict__,
                          "vae_dtype": att.cfg.vae.dtype, "store_dtype": att.cfg.store.dtype,
                          "random_weights": vae_lib.is_random(att.cfg.vae, ws.root)},
              "unseen_threshold": att.threshold, "score": {"maha_floor": ws_cfg.score.maha_floor,
                                                           "kde_dtype": ws_cfg.score.kde_dtype},
              "files": {name: _hash(dest / name) for name in files}}
    (dest / "attributor.json").write_text(json.dumps(record, indent=1))
    from leakpipe.pipeline.app import space_files
    from leakpipe.pipeline.report.card import model_card

    (dest / "README.md").write_text(model_card(record, json.loads((out / "metrics.json").read_text()), att.cfg))
    for name, text in space_files().items():  # not checksummed: a Space owner may edit them
        (dest / name).write_text(text)
    return dest


def _gallery(att: Attributor, manifest) -> dict:
    """The report's prototype gallery as tensors: `thumbnails` (C, M, K, THUMB, THUMB, 3) uint8, the
    training images each prototype wins (nearest first), and `count` (C, M), how many of K are real."""
    from leakpipe.pipeline.report.explain_figures import THUMB, nearest_to_prototypes, prototype_thumbnails
    from leakpipe.stages.score import GALLERY_K

    protos = att.model.prototypes.detach().float().cpu().numpy()
    near = nearest_to_prototypes(att.reference["h_bar"], att.reference["w"], att.reference["labels"], protos,
                                 GALLERY_K)
    pictures = prototype_thumbnails(near, lambda i: manifest.abspath(int(att.rows[i])), att.cfg.preprocess)
    thumbs = np.full((*near.shape, THUMB, THUMB, 3), 255, np.uint8)
    count = np.zeros(near.shape[:2], np.int64)
    for c, per_class in enumerate(pictures):
        for m, images in enumerate(per_class):
            count[c, m] = len(images)
            for j, im in enumerate(images):
                thumbs[c, m, j] = im
    return {"thumbnails": thumbs, "count": count}


def gallery(att: Attributor) -> dict | None:
    """The exported gallery (checked with the folder by from_folder), or None."""
    from safetensors.numpy import load_file

    if att.folder is None or not (att.folder / GALLERY).is_file():
        return None
    return load_file(str(att.folder / GALLERY))


def locate(model: str) -> Path:
    """A local folder, or a Hugging Face Hub repository id fetched into the local cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or model.startswith((".", "/", "~")):
        raise UserError(f"--model {model}: not a folder written by `leakpipe export`")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as exc:
        raise UserError(f"--model {model}: no such folder, and the Hub repository could not be fetched ({exc})") from None


def from_folder(folder: Path, device) -> Attributor:
    """An exported attributor, every file checked against attributor.json before it is used."""
    from safetensors.numpy import load_file
    from safetensors.torch import load

    from leakpipe.pipeline.engine.trained import model_from
    from leakpipe.pipeline.ledger.graph import run_config

    record_path = folder / "attributor.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{record_path}: not readable ({exc}); --model needs a folder written by `leakpipe export`") from None
    if record.get("format") != FORMAT:
        raise UserError(f"{record_path}: format {record.get('format')!r}, expected {FORMAT!r}")
    listed = record.get("files", {})
    bad = [n for n in dict.fromkeys([*FILES, *listed])
           if n not in listed or not (folder / n).is_file() or _hash(folder / n) != listed[n]]
    if bad:
        raise UserError(f"{folder}: {', '.join(bad)} missing or damaged (checksum mismatch with attributor.json); "
                        "export it again")
    data = (folder / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    cfg = run_config(folder)
    model, build, classes, cfg = model_from(load(data), {k: json.loads(v) for k, v in header.items()}, cfg, device)
    cfg.vae.source = record["encoder"]["vae_source"]  # absolute or a Hub id (older exports: as trained)
    cfg.vae.config = record["encoder"].get("vae_config_file", cfg.vae.config)
    return Attributor(model, build, classes, cfg, load_file(str(folder / "reference.safetensors")),
                      record["unseen_threshold"], f"attributor {folder}", record["result"],
                      record["encoder"]["encoder_fingerprint"], Path.cwd(), folder=folder)


def load_exported(model: str, vae: str | None, device, log=lambda msg: None) -> Attributor:
    """An exported attributor (folder or Hub id), with its VAE (`vae` overrides the recorded one)
    checked against the recorded encoder fingerprint: what `attribute --model` and `app` use."""
    log(f"reading attributor {model} (checksums of every file)")
    att = from_folder(locate(model), device)
    if vae:
        att.cfg.vae.source, att.base = vae, Path.cwd()
    log(f"checking the VAE {att.cfg.vae.source} (encoder fingerprint)")
    check_encoder(att)
    return att


def check_encoder(att: Attributor) -> None:
    """Refuse a VAE whose encoder fingerprint differs from the one the attributor was trained on."""
    import tempfile

    from leakpipe.pipeline.engine import vae as vae_lib
    from leakpipe.pipeline.store.hashing import HashCache

    if att.encoder_fp is None:
        return
    src = vae_lib.resolve(att.cfg.vae, att.base)
    with tempfile.TemporaryDirectory() as tmp:
        fp = vae_lib.encoder_fingerprint(att.cfg, src, HashCache(Path(tmp) / "hashes.json"))
    if fp != att.encoder_fp:
        raise UserError(f"the VAE at hand ({att.cfg.vae.source}) has encoder fingerprint {fp[:12]}, but {att.name} "
                        f"was trained on latents of encoder {att.encoder_fp[:12]}; its numbers would mean nothing. "
                        "Give the same VAE (weights, config and dtype) with --vae")
