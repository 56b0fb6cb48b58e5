"""attributor.json's schema: every field `attribute --model` reads, the check it must pass and why.

One table (SCHEMA), so that a field that is accepted is a field that is used, within the range its
math can use, and each refusal names the field, its value and what it must be. Besides each field on
its own: what must hold between fields (relation_problems), against the validation scores in
calibration.safetensors (calibration_problems) and against config.json (config_problems). What
`score` legitimately writes is accepted: conformal thresholds of +inf (too few validation images for
the level) and a log-density cut of -inf (no p-value can reach alpha).
"""

from __future__ import annotations

import math

import numpy as np

from leakpipe.pipeline.config import CHOICES, Config
from leakpipe.pipeline.config_files import from_dict
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.math.conformal import cut

EMBEDDINGS = CHOICES["score.kde_embedding"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def relation_problems(record: dict, n_classes: int) -> list[str]:
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


def record_problems(record) -> list[str]:
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


def calibration_problems(record: dict, val: np.ndarray) -> list[str]:
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


def config_problems(record: dict, cfg: Config) -> list[str]:
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
