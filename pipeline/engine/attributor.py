"""A trained attributor as `leakpipe attribute` uses it: the model, its comparators (Mahalanobis, the
unseen-generator KDE) and the encoder it expects, from a scored run or from an exported folder.

An exported folder is self-contained: `model.safetensors` (weights, prototypes, feature statistics),
`reference.safetensors` (the closed training embeddings the comparators are fitted on),
`calibration.safetensors` (the closed validation images' KDE log-densities, for unseen p-values),
`gallery.safetensors` (thumbnails of the training images each prototype wins, nearest first),
`attributor.json` (classes, encoder identity, threshold, decisions: temperature, conformal thresholds
and level; code identity, checksums of every file),
`config.json`, `metrics.json`, a model card `README.md` (Hugging Face Hub conventions), and `app.py`
with `requirements.txt`, so that the folder also runs as a Hugging Face Space (`leakpipe app`'s page).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.config_files import from_dict
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import hash_file
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.math.mahalanobis import Mahalanobis

# 2: the code identity of the encode and embed stages; 3: the decisions (temperature, conformal
# thresholds, the unseen flag's level in attributor.json, the validation KDE scores in CALIBRATION)
FORMAT = "leakpipe-attributor-3"
FORMATS = ("leakpipe-attributor-1", "leakpipe-attributor-2", FORMAT)  # 1 is read as exported by unrecorded code
FILES = ("model.safetensors", "reference.safetensors", "config.json", "metrics.json")  # needed to attribute
CALIBRATION = "calibration.safetensors"  # needed from format 3 on: what an image's p-value ranks against
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
    code: dict | None = None  # the stages' code identities it was exported with (exported folders)
    rows: np.ndarray | None = None  # manifest rows of the reference embeddings (scored runs)
    folder: Path | None = None  # the exported folder it was read from
    # report/decisions.applied: alpha, calibration (method, temperature), conformal (score, mondrian,
    # thresholds, level); None for an attributor exported before them (format 1 or 2)
    decisions: dict | None = None
    val_scores: np.ndarray | None = None  # the closed validation images' KDE log-densities, sorted

    def comparators(self, cfg_score):
        """Mahalanobis (Eq. 13) and the unseen KDE, fitted on the reference embeddings."""
        from leakpipe.pipeline.math.kde import GaussianKDE
        from leakpipe.pipeline.math.kde import embedding

        h = self.reference["h_bar"].astype(np.float64)
        maha = Mahalanobis(len(self.classes), cfg_score.maha_floor).fit(h, self.reference["labels"])
        ref = self.threshold.get("kde_reference", {})  # the reference rows the threshold was calibrated on
        kde = GaussianKDE(
            bandwidth=self.threshold["bandwidth"],
            dtype=cfg_score.kde_dtype,
            max_reference=ref.get("max_reference", 0),
            seed=ref.get("seed", 0),
        )
        return maha, kde.fit(embedding(h, self.reference["w"], self.threshold["embedding"]))


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
        raise UserError(
            f"--model {model}: no such folder, and the Hub repository could not be fetched ({exc})"
        ) from None


def from_folder(folder: Path, device) -> Attributor:
    """An exported attributor, every file checked against attributor.json before it is used."""
    from safetensors.numpy import load_file

    from leakpipe.pipeline.engine.trained import model_from
    from leakpipe.pipeline.store.checkpoint import read_safetensors

    record_path = folder / "attributor.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{record_path}: not readable ({exc}); --model needs a folder written by `leakpipe export`"
        ) from None
    if record.get("format") not in FORMATS:
        raise UserError(f"{record_path}: format {record.get('format')!r}, expected one of {', '.join(FORMATS)}")
    listed = record.get("files", {})
    needed = [*FILES, CALIBRATION] if record["format"] == FORMAT else FILES
    bad = [
        n
        for n in dict.fromkeys([*needed, *listed])
        if n not in listed or not (folder / n).is_file() or hash_file(folder / n) != listed[n]
    ]
    if bad:
        raise UserError(
            f"{folder}: {', '.join(bad)} missing or damaged (checksum mismatch with attributor.json); export it again"
        )
    tensors, meta = read_safetensors((folder / "model.safetensors").read_bytes())
    cfg = from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    model, build, classes, cfg = model_from(tensors, meta, cfg, device)
    # where the VAE is: absolute or a Hub id since exports record it so (older ones: as trained)
    cfg = dataclasses.replace(
        cfg,
        vae=dataclasses.replace(
            cfg.vae,
            source=record["encoder"]["vae_source"],
            config=record["encoder"].get("vae_config_file", cfg.vae.config),
        ),
    )
    val = load_file(str(folder / CALIBRATION))["unseen_val_scores"] if record["format"] == FORMAT else None
    return Attributor(
        model,
        build,
        classes,
        cfg,
        load_file(str(folder / "reference.safetensors")),
        record["unseen_threshold"],
        f"attributor {folder}",
        record["result"],
        record["encoder"]["encoder_fingerprint"],
        Path.cwd(),
        record.get("code", {}),
        folder=folder,
        decisions=record.get("decisions"),
        val_scores=val,
    )


def with_vae(att: Attributor, vae: str) -> Attributor:
    """The attributor with its VAE looked for at `vae` (relative to the working folder)."""
    return dataclasses.replace(
        att, cfg=dataclasses.replace(att.cfg, vae=dataclasses.replace(att.cfg.vae, source=vae)), base=Path.cwd()
    )


def gallery(att: Attributor) -> dict | None:
    """The exported gallery (checked with the folder by from_folder), or None."""
    from safetensors.numpy import load_file

    if att.folder is None or not (att.folder / GALLERY).is_file():
        return None
    return load_file(str(att.folder / GALLERY))


def check_encoder(att: Attributor, encode_code) -> None:
    """Refuse a VAE whose encoder fingerprint (under this leakpipe's encode code, `encode_code`)
    differs from the one the attributor was trained on."""
    import tempfile

    if att.encoder_fp is None:
        return
    src = vae_lib.resolve(att.cfg.vae, att.base)
    with tempfile.TemporaryDirectory() as tmp:
        fp = vae_lib.encoder_fingerprint(att.cfg, src, HashCache(Path(tmp) / "hashes.json"), encode_code)
    if fp != att.encoder_fp:
        raise UserError(
            f"the VAE at hand ({att.cfg.vae.source}) has encoder fingerprint {fp[:12]}, but {att.name} "
            f"was trained on latents of encoder {att.encoder_fp[:12]}; its numbers would mean nothing. "
            "Give the same VAE (weights, config and dtype) with --vae, or use the leakpipe version "
            "that exported it if its encode code differs from this one's"
        )
