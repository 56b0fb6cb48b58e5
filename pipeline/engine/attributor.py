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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import CHOICES, Config
from leakpipe.pipeline.config_files import from_dict
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.math.conformal import cut
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
EMBEDDINGS = CHOICES["score.kde_embedding"]


def record_checksum(record: dict) -> str:
    """attributor.json's checksum of itself: blake2b-128 of its canonical JSON without the `checksum` key."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hash_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _within(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False):
    """A check: a finite number in [lo, hi] (an open end excludes it)."""
    return lambda v: _finite(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)


def _one_of(choices):
    return lambda v: isinstance(v, str) and v in choices


def _hex(n: int):
    return lambda v: isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


def _text(v) -> bool:
    return isinstance(v, str) and bool(v)


def _cut(v) -> bool:
    """A log-density cut: finite and of a size a KDE gives, or -inf (too few validation images for a
    p-value at alpha: nothing is ever flagged, conformal.cut)."""
    return v == -math.inf or (_finite(v) and abs(v) <= 1e12)


def _temperatures(v) -> bool:
    """One temperature or one per class, each within the bounds the fit searches (math/calibration.py):
    dividing the logits by 1e-320 overflows the posterior to NaN."""
    from leakpipe.pipeline.math.calibration import LOG_T_BOUNDS  # scipy: not on the light commands' path

    low, high = (math.exp(b) for b in LOG_T_BOUNDS)
    vs = v if isinstance(v, list) else [v]
    return bool(vs) and all(_finite(t) and low * (1 - 1e-9) <= t <= high * (1 + 1e-9) for t in vs)


def _conformal_thresholds(v) -> bool:
    """Nonconformity thresholds (LAC and APS scores lie in [0, 1]), or +inf: fewer validation images
    than the level needs, so every prediction set holds every generator (conformal.quantile)."""
    return isinstance(v, list) and bool(v) and all(x == math.inf or (_finite(x) and -1e-9 <= x <= 1 + 1e-9) for x in v)


# attributor.json, every field `attribute --model` reads: (dotted key, check, what it must be, required).
# One table, so a field that is accepted is a field that is used, within the range its math can use.
SCHEMA = (
    ("run", _text, "the exported run's name", True),
    ("result", _text, "the trained result's name", True),
    ("encoder.vae_source", _text, "where the VAE is: a Hub id or a path", True),
    ("encoder.vae_config_file", lambda v: isinstance(v, str), "a path, or empty", False),
    ("encoder.encoder_fingerprint", _hex(64), "64 hex digits", True),
    ("encoder.vae_config", lambda v: isinstance(v, dict), "the VAE's config, an object", True),
    ("encoder.preprocess", lambda v: isinstance(v, dict), "the preprocess section of config.json", True),
    ("encoder.vae_dtype", _one_of(CHOICES["vae.dtype"]), f"one of {CHOICES['vae.dtype']}", True),
    ("encoder.store_dtype", _one_of(CHOICES["store.dtype"]), f"one of {CHOICES['store.dtype']}", True),
    ("encoder.random_weights", lambda v: isinstance(v, bool), "true or false", False),
    ("code", lambda v: isinstance(v, dict), "the stages' code identities, an object", False),
    ("unseen_threshold.alpha", _within(0, 1, True, True), "in (0, 1), equal to decisions.alpha", True),
    ("unseen_threshold.p_min", _within(0, 1, True), "1 / (n + 1) of the n validation scores", True),
    ("unseen_threshold.log_density_threshold", _cut, "a finite log-density (or -inf: never flagged)", True),
    ("unseen_threshold.bandwidth", _within(0, math.inf, True, True), "a finite number > 0", True),
    ("unseen_threshold.embedding", _one_of(EMBEDDINGS), f"one of {', '.join(EMBEDDINGS)}", True),
    ("unseen_threshold.kde_reference.max_reference", _within(0, 2**62), "an integer >= 0", False),
    ("unseen_threshold.kde_reference.seed", _within(0, 2**62), "an integer >= 0", False),
    ("decisions.alpha", _within(0, 1, True, True), "in (0, 1)", True),
    ("decisions.calibration.method", _one_of(CHOICES["score.calibration"]), "a known method", True),
    ("decisions.calibration.temperature", _temperatures, "within [0.001, 1000], where the fit searches", True),
    ("decisions.conformal.score", _one_of(CHOICES["score.conformal"]), f"one of {CHOICES['score.conformal']}", True),
    ("decisions.conformal.mondrian", lambda v: isinstance(v, bool), "true or false", True),
    ("decisions.conformal.thresholds", _conformal_thresholds, "a list of numbers in [0, 1] or +inf", True),
    ("decisions.conformal.level", _within(0, 1, True, True), "1 - decisions.alpha", True),
    ("score", lambda v: isinstance(v, dict), "the comparators' score settings, an object", False),
)
SCORE_KEYS = ("maha_shared", "maha_rows", "maha_floor", "kde_dtype")  # what `score` records of the comparators


def _get(record: dict, key: str):
    for part in key.split("."):
        if not isinstance(record, dict) or part not in record:
            return _MISSING
        record = record[part]
    return record


_MISSING = object()


def _integral(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def threshold_problems(u) -> list[str]:
    """What is wrong with an unseen-generator threshold (metrics.json's or attributor.json's
    `unseen_threshold`): SCHEMA's unseen_threshold rows (alpha and p_min where present: metrics of
    every version have the others)."""
    if not isinstance(u, dict):
        return [f"unseen_threshold is {type(u).__name__}, expected an object"]
    out = []
    for key, ok, what, required in SCHEMA:
        if key.startswith("unseen_threshold."):
            v = _get({"unseen_threshold": u}, key)
            if v is _MISSING and not (required and key.split(".")[1] not in ("alpha", "p_min")):
                continue
            if v is _MISSING or not ok(v) or (key.endswith(("max_reference", "seed")) and not _integral(v)):
                out.append(f"{key} = {_shown(v)}: must be {what}")
    return out


def _shown(v) -> str:
    return "(missing)" if v is _MISSING else repr(v)


def _schema_problems(record: dict) -> list[str]:
    """Every SCHEMA field that is missing (where required) or outside what it must be, with the reason;
    the score settings and the preprocessing checked by the config's own validator."""
    out = []
    for key, ok, what, required in SCHEMA:
        v = _get(record, key)
        if v is _MISSING and not required:
            continue
        if v is _MISSING or not ok(v) or (key.endswith(("max_reference", "seed")) and not _integral(v)):
            out.append(f"{key} = {_shown(v)}: must be {what}")
    for section, value, keys in (
        ("score", record.get("score"), SCORE_KEYS),
        ("preprocess", _get(record, "encoder.preprocess"), None),
    ):
        if isinstance(value, dict):
            if keys is not None and set(value) - set(keys):
                out.append(f"{section}: unknown key(s) {', '.join(sorted(set(value) - set(keys)))}")
                continue
            try:
                from_dict({section: value}, f"attributor.json's {section}")
            except UserError as exc:
                out.append(str(exc))
    return out


def _relation_problems(record: dict, n_classes: int) -> list[str]:
    """What must hold between fields: one level for both decisions, one temperature (or one per class),
    one threshold per class (all equal unless Mondrian)."""
    d, u = record["decisions"], record["unseen_threshold"]
    c, s = d["calibration"], d["conformal"]
    out = []
    if u["alpha"] != d["alpha"]:
        out.append(f"unseen_threshold.alpha = {u['alpha']!r} differs from decisions.alpha = {d['alpha']!r}")
    if not math.isclose(s["level"], 1 - d["alpha"], abs_tol=1e-9):
        out.append(f"decisions.conformal.level = {s['level']!r}: must be 1 - decisions.alpha = {1 - d['alpha']!r}")
    t = c["temperature"]
    want_t = {"none": "1.0", "temperature": "one number", "class_temperature": f"a list of {n_classes}"}[c["method"]]
    if (
        (c["method"] == "none" and t != 1.0)
        or (c["method"] == "temperature" and isinstance(t, list))
        or (c["method"] == "class_temperature" and (not isinstance(t, list) or len(t) != n_classes))
    ):
        out.append(f"decisions.calibration.temperature = {t!r}: method {c['method']} takes {want_t}")
    q = s["thresholds"]
    if len(q) != n_classes or (not s["mondrian"] and len(set(q)) > 1):
        out.append(
            f"decisions.conformal.thresholds = {q!r}: one per class ({n_classes})"
            + ("" if s["mondrian"] else ", all equal without Mondrian")
        )
    return out


def _record_problems(record) -> list[str]:
    """attributor.json's own values against SCHEMA: the keys attribute reads, each of the expected type
    and within the range its math can use."""
    if not isinstance(record, dict):
        return [f"it holds a JSON {type(record).__name__}, not an object"]
    want = {"classes": list, "files": dict, "encoder": dict, "unseen_threshold": dict, "decisions": dict}
    out = [
        f"key {k!r} is missing" if k not in record else f"{k!r} is {type(record[k]).__name__}, expected {t.__name__}"
        for k, t in want.items()
        if not isinstance(record.get(k), t)
    ]
    if isinstance(record.get("classes"), list):
        c = record["classes"]
        if not c or not all(isinstance(x, str) and x for x in c) or len(set(c)) != len(c):
            out.append(f"classes = {c!r}: must be distinct generator names, at least one")
    if isinstance(record.get("files"), dict) and not all(_hex(32)(v) for v in record["files"].values()):
        out.append("files: every checksum must be 32 hex digits (blake2b-128)")
    if out:
        return out
    return _schema_problems(record)


def _calibration_problems(record: dict, val: np.ndarray) -> list[str]:
    """The unseen flag's recorded p_min and log-density cut against the validation scores they come from."""
    u, out = record["unseen_threshold"], []
    if not math.isclose(u["p_min"], 1 / (len(val) + 1), rel_tol=1e-9):
        out.append(f"unseen_threshold.p_min = {u['p_min']!r}: {len(val)} validation scores give 1 / {len(val) + 1}")
    want = cut(val, u["alpha"])
    if not (want == u["log_density_threshold"] or math.isclose(want, u["log_density_threshold"], rel_tol=1e-9)):
        out.append(
            f"unseen_threshold.log_density_threshold = {u['log_density_threshold']!r}: the validation scores "
            f"give {want!r} at alpha {u['alpha']!r}"
        )
    return out


def _fits_model(record: dict, classes: list[str], embed_dim: int, reference: dict) -> list[str]:
    """attributor.json's classes, decisions and the reference embeddings against the model's classes and shapes."""
    out = []
    if record["classes"] != list(classes):
        out.append(
            f"attributor.json lists {len(record['classes'])} classes ({', '.join(record['classes'])}) but "
            f"model.safetensors was trained on {len(classes)} ({', '.join(classes)})"
        )
    out += _relation_problems(record, len(classes))
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

    record_path = folder / "attributor.json"
    again = "export the run again (`leakpipe export DIR --run RUN` in its workspace)"
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
    problems = _record_problems(record)
    if problems:
        raise UserError(f"{record_path}: {'; '.join(problems)}; {again}")
    listed = record["files"]
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
        *_config_problems(record, cfg),
        *_calibration_problems(record, val),
    ]
    if problems:
        raise UserError(f"{folder}: {'; '.join(problems)}; {again}")
    # where the VAE is: absolute or a Hub id since exports record it so (older ones: as trained)
    cfg = dataclasses.replace(
        cfg,
        vae=dataclasses.replace(
            cfg.vae,
            source=record["encoder"]["vae_source"],
            config=record["encoder"].get("vae_config_file", cfg.vae.config),
        ),
    )
    return Attributor(
        model,
        build,
        classes,
        cfg,
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


def _config_problems(record: dict, cfg: Config) -> list[str]:
    """What attributor.json says of the encoder against config.json, which attribute preprocesses and
    encodes with: a record that disagrees would be accepted and ignored."""
    enc, out = record["encoder"], []
    for key, want in (
        *((f"preprocess.{k}", v) for k, v in vars(cfg.preprocess).items()),
        ("vae_dtype", cfg.vae.dtype),
        ("store_dtype", cfg.store.dtype),
    ):
        section, name = key.split(".") if "." in key else ("", key)
        have = enc["preprocess"].get(name, _MISSING) if section else enc.get(name)
        if have != want:
            out.append(f"encoder.{key} = {_shown(have)}, but config.json has {want!r}")
    return out


def with_vae(att: Attributor, vae: str) -> Attributor:
    """The attributor with its VAE looked for at `vae` (relative to the working folder)."""
    return dataclasses.replace(
        att, cfg=dataclasses.replace(att.cfg, vae=dataclasses.replace(att.cfg.vae, source=vae)), base=Path.cwd()
    )


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
