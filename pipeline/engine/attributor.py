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
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.attributor_schema import (
    calibration_problems,
    config_problems,
    record_problems,
    relation_problems,
)
from leakpipe.pipeline.math.mahalanobis import Mahalanobis
from leakpipe.pipeline.store.hashing import HashCache, hash_bytes

# 2: the code identity of the encode and embed stages; 3: the decisions (temperature, conformal
# thresholds, the unseen flag's level in attributor.json, the validation KDE scores in CALIBRATION);
# 4: attributor.json's checksum of itself
FORMAT = "leakpipe-attributor-4"
OLD_FORMATS = ("leakpipe-attributor-1", "leakpipe-attributor-2", "leakpipe-attributor-3")  # no own checksum: refused
CALIBRATION = "calibration.safetensors"  # what an image's unseen p-value ranks against
# needed to attribute
FILES = ("model.safetensors", "reference.safetensors", "config.json", "metrics.json", CALIBRATION)
GALLERY = "gallery.safetensors"  # optional (a linear head has no prototypes); checksummed like FILES
# the model card and the Space's entry point and requirements: checksummed like FILES (exports made
# before they were are read without them)
SPACE_FILES = ("README.md", "app.py", "requirements.txt")


def record_checksum(record: dict) -> str:
    """attributor.json's checksum of itself: blake2b-128 of its canonical JSON without the `checksum` key."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hash_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _fits_model(record: dict, classes: list[str], embed_dim: int, reference: dict) -> list[str]:
    """attributor.json's classes, decisions and the reference embeddings against the model's classes and shapes."""
    out = []
    if record["classes"] != list(classes):
        out.append(
            f"attributor.json lists {len(record['classes'])} classes ({', '.join(record['classes'])}) but "
            f"model.safetensors was trained on {len(classes)} ({', '.join(classes)})"
        )
    out += relation_problems(record, len(classes))
    h, w, labels = (reference.get(k) for k in ("h_bar", "w", "labels"))
    if h is None or w is None or labels is None:
        return out + ["reference.safetensors lacks h_bar, w or labels"]
    if h.ndim != 2 or h.shape[1] != embed_dim or w.shape != h.shape or labels.shape != (len(h),) or not len(h):
        out.append(
            f"reference.safetensors: h_bar {tuple(h.shape)}, w {tuple(w.shape)}, labels {tuple(labels.shape)}; "
            f"expected (n, {embed_dim}) twice and (n,) for the model's {embed_dim}-dimensional embeddings"
        )
    elif not (np.isfinite(h).all() and np.isfinite(w).all()) or labels.min() < 0 or labels.max() >= len(classes):
        out.append(f"reference.safetensors: embeddings must be finite and labels in 0..{len(classes) - 1}")
    return out + _val_rows_problems(reference, embed_dim, len(classes))


def _val_rows_problems(reference: dict, embed_dim: int, n_classes: int) -> list[str]:
    """The closed validation rows (val_h_bar, val_labels) that score.maha_rows = train_val fits the
    Mahalanobis comparator on too: both or neither (an export made before them has neither)."""
    h, labels = reference.get("val_h_bar"), reference.get("val_labels")
    if h is None and labels is None:
        return []
    if h is None or labels is None or h.ndim != 2 or h.shape[1] != embed_dim or labels.shape != (len(h),):
        shapes = [tuple(x.shape) if x is not None else "missing" for x in (h, labels)]
        return [
            f"reference.safetensors: val_h_bar {shapes[0]}, val_labels {shapes[1]}; expected (m, {embed_dim}) "
            "and (m,), both or neither"
        ]
    if not np.isfinite(h).all() or (len(labels) and (labels.min() < 0 or labels.max() >= n_classes)):
        return [f"reference.safetensors: val_h_bar must be finite and val_labels in 0..{n_classes - 1}"]
    return []


@dataclass
class Attributor:
    model: object
    build: object
    classes: list[str]
    cfg: Config  # the config it was trained with (VAE, preprocessing, features)
    # h_bar, w (float32) and labels of the closed training rows; val_h_bar and val_labels of the closed
    # validation rows (absent from an export made before them), for score.maha_rows = train_val
    reference: dict
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
    gallery: dict | None = None  # the exported prototype gallery, from the bytes checked with the folder
    score: dict | None = None  # the comparators' score settings it was scored with (exported folders)

    def comparators(self, cfg_score):
        """The Mahalanobis comparator of `cfg_score` (on the training rows, and the validation rows for
        maha_rows = train_val where the reference has them) and the unseen KDE (training rows). An exported
        attributor's own settings (attributor.json's `score`) replace those of `cfg_score`."""
        from leakpipe.pipeline.math.kde import GaussianKDE
        from leakpipe.pipeline.math.kde import embedding

        cfg_score = dataclasses.replace(cfg_score, **self.score) if self.score else cfg_score

        r = self.reference
        h, labels = r["h_bar"].astype(np.float64), r["labels"]
        if cfg_score.maha_rows == "train_val" and "val_h_bar" in r:
            fit = np.concatenate([h, r["val_h_bar"].astype(np.float64)]), np.concatenate([labels, r["val_labels"]])
        else:
            fit = h, labels
        maha = Mahalanobis(len(self.classes), cfg_score.maha_floor, cfg_score.maha_shared).fit(*fit)
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
    """An exported attributor, every file checked against attributor.json, and attributor.json against
    its own checksum, before it is used; its values are validated (the threshold, the bandwidth, the
    classes and the reference embeddings against the model's classes and shapes)."""
    from safetensors.numpy import load

    from leakpipe.pipeline.engine.trained import model_from
    from leakpipe.pipeline.store.checkpoint import read_safetensors

    again = "export the run again (`leakpipe export DIR --run RUN` in its workspace)"
    record = _checked_record(folder / "attributor.json", again)
    data = _checked_files(folder, record["files"], again)
    tensors, meta = read_safetensors(data["model.safetensors"])
    try:
        cfg = from_dict(json.loads(data["config.json"]), str(folder / "config.json"))
        model, build, classes, cfg = model_from(tensors, meta, cfg, device)
    except (KeyError, RuntimeError, ValueError) as exc:  # a model that does not fit its config
        raise UserError(f"{folder}: model.safetensors does not fit config.json ({exc}); {again}") from None
    reference = {k: v for k, v in load(data["reference.safetensors"]).items()}
    val = load(data[CALIBRATION]).get("unseen_val_scores")
    if val is None or val.ndim != 1 or not np.isfinite(val).all():
        raise UserError(f"{folder}: {CALIBRATION} lacks finite unseen_val_scores; {again}")
    problems = [
        *_fits_model(record, classes, cfg.model.embed_dim, reference),
        *config_problems(record, cfg),
        *calibration_problems(record, val),
    ]
    if problems:
        raise UserError(f"{folder}: {'; '.join(problems)}; {again}")
    return Attributor(
        model,
        build,
        classes,
        _recorded_vae(cfg, record),
        reference,
        record["unseen_threshold"],
        f"attributor {folder}",
        record["result"],
        record["encoder"]["encoder_fingerprint"],
        Path.cwd(),
        record.get("code", {}),
        folder=folder,
        decisions=record.get("decisions"),
        val_scores=val,
        gallery=load(data[GALLERY]) if GALLERY in data else None,
        score=record.get("score"),
    )


def _recorded_vae(cfg, record: dict):
    """`cfg` with the VAE where the record says it is: absolute or a Hub id since exports record it so
    (older ones: as trained)."""
    return dataclasses.replace(
        cfg,
        vae=dataclasses.replace(
            cfg.vae,
            source=record["encoder"]["vae_source"],
            config=record["encoder"].get("vae_config_file", cfg.vae.config),
        ),
    )


def _checked_record(record_path: Path, again: str) -> dict:
    """attributor.json, read and checked: an object of this format that matches its own checksum and
    whose values are valid (attributor_schema.py)."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{record_path}: not readable ({exc}); --model needs a folder written by `leakpipe export`"
        ) from None
    if not isinstance(record, dict):
        raise UserError(
            f"{record_path} holds a JSON {type(record).__name__}, not an object; --model needs a folder "
            "written by `leakpipe export`"
        )
    fmt = record.get("format")
    if fmt in OLD_FORMATS:
        raise UserError(
            f"{record_path}: format {fmt!r}, written by an older leakpipe, carries no checksum of itself, "
            f"so its threshold and classes cannot be checked; {again} with this version"
        )
    if fmt != FORMAT:
        raise UserError(
            f"{record_path}: format {fmt!r}, expected {FORMAT!r}; --model needs a folder written by `leakpipe export`"
        )
    if record.get("checksum") != record_checksum(record):
        raise UserError(
            f"{record_path} does not match its own checksum: it was edited by hand or damaged after "
            f"export, so nothing in the folder was used; {again}"
        )
    problems = record_problems(record)
    if problems:
        raise UserError(f"{record_path}: {'; '.join(problems)}; {again}")
    return record


def _checked_files(folder: Path, listed: dict, again: str) -> dict[str, bytes]:
    """The bytes of the folder's files, each required one listed and each listed one matching its checksum."""
    data = {n: (folder / n).read_bytes() for n in dict.fromkeys([*FILES, *listed]) if (folder / n).is_file()}
    bad = [
        n
        for n in dict.fromkeys([*FILES, *listed])
        if n not in listed or n not in data or hash_bytes(data[n]) != listed[n]
    ]
    if bad:
        raise UserError(
            f"{folder}: {', '.join(bad)} missing or damaged (checksum mismatch with attributor.json); {again}"
        )
    return data


def with_vae(att: Attributor, vae: str) -> Attributor:
    """The attributor with its VAE looked for at `vae` (relative to the working folder)."""
    return dataclasses.replace(
        att, cfg=dataclasses.replace(att.cfg, vae=dataclasses.replace(att.cfg.vae, source=vae)), base=Path.cwd()
    )


def check_encoder(att: Attributor, encode_code) -> None:
    """Refuse a VAE whose encoder fingerprint (under this leakpipe's encode code for that VAE,
    `encode_code(source)`) differs from the one the attributor was trained on."""
    import tempfile

    if att.encoder_fp is None:
        return
    src = vae_lib.resolve(att.cfg.vae, att.base)
    with tempfile.TemporaryDirectory() as tmp:
        fp = vae_lib.encoder_fingerprint(att.cfg, src, HashCache(Path(tmp) / "hashes.json"), encode_code(src))
    if fp != att.encoder_fp:
        raise UserError(
            f"the VAE at hand ({att.cfg.vae.source}) has encoder fingerprint {fp[:12]}, but {att.name} "
            f"was trained on latents of encoder {att.encoder_fp[:12]}; its numbers would mean nothing. "
            "Give the same VAE (weights, config and dtype) with --vae, or use the leakpipe version "
            "that exported it if its encode code differs from this one's"
        )
