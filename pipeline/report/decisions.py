"""Decisions with a stated error rate, fitted on the validation partition and checked on the test
images: the calibrated posterior (temperature scaling), split-conformal prediction sets at level
1 - score.alpha, and conformal p-values of the unseen-generator flag.

Everything here takes arrays (evaluate.Split) and returns numbers; report/scoring.py calls it and
stages/attribute.py applies what it records (`applied`) to new images.
"""

from __future__ import annotations

import numpy as np

from leakpipe.pipeline.math import calibration as calib, conformal, metrics
from leakpipe.pipeline.report import registry
from leakpipe.pipeline.report.evaluate import Split, label_index

METHODS = ("none", "temperature", "class_temperature")  # score.calibration, each measured on every run
GUARANTEE = (
    "If a new image and the validation images are exchangeable (drawn alike, from the known "
    "generators, with no post-processing the validation images lack), its prediction set holds its "
    "true generator with probability at least {level:.0%}, and a known generator's image is flagged "
    "as unseen with probability at most {alpha:.0%}. Post-processed images and images of unseen "
    "generators are not exchangeable with them: the guarantee does not hold there, and the tables "
    "below show by how much it fails"
)


def _listed(t):
    return float(t) if np.ndim(t) == 0 else np.asarray(t, float).tolist()


def calibration(val: Split, tests: dict[str, Split], classes: list[str], cfg) -> dict:
    """Temperature scaling fitted on the validation rows by NLL (score.calibration), with every method
    of METHODS measured beside it (validation NLL; on the raw test rows NLL, ECE, top-1), the ECE and
    top-1 of the calibrated posterior per variant with their intervals, and the reliability diagram's
    bins before and after on the raw test rows."""
    yv, lv = label_index(val, classes), val.arrays["logits"].astype(np.float64)
    test = tests["raw"]
    yt, lt = label_index(test, classes), test.arrays["logits"].astype(np.float64)
    fitted = {m: calib.fit(m, lv, yv) for m in METHODS}
    measured = {}
    for m, t in fitted.items():
        p = calib.scaled_posterior(lt, t)
        measured[m] = {
            "temperature": _listed(t),
            "val_nll": calib.nll(lv, yv, t),
            "test_nll": calib.nll(lt, yt, t),
            "test_ece": metrics.point(metrics.expected_calibration_error, p, yt),
            "test_top1": float((p.argmax(1) == yt).mean()),
        }
    t = fitted[cfg.calibration]
    out = {
        "method": cfg.calibration,
        "temperature": _listed(t),
        "n_val": int(len(yv)),
        "methods": measured,
        "variants": {},
    }
    for variant, s in tests.items():
        y = label_index(s, classes)
        sample = registry.Closed(calib.scaled_posterior(s.arrays["logits"], t), y, len(classes), True)
        r = (
            registry.evaluate(
                registry.CLOSED, sample, len(classes), cfg.bootstrap, cfg.seed, s.groups, only=("top1", "ece")
            )
            if len(y)
            else {}
        )
        out["variants"][variant] = {"n": int(len(y)), **r}
    out["reliability"] = {
        "before": calib.reliability(metrics.softmax(lt), yt),
        "after": calib.reliability(calib.scaled_posterior(lt, t), yt),
    }
    if len(yv) == 0:
        out["note"] = "no validation rows: the posterior is left uncalibrated (T = 1)"
    return out


def _aps_u(n: int, seed: int) -> np.ndarray:
    """The randomisation of the calibration rows' APS scores (Romano et al. 2020), seeded by score.seed."""
    return np.random.default_rng([seed, 23]).uniform(size=n)


def fit_sets(val: Split, classes: list[str], score: str, alpha: float, mondrian: bool, seed: int) -> np.ndarray:
    """(C,) conformal thresholds from the validation rows' nonconformity under `score`, computed on the
    head's posterior pi as trained (the temperature is fitted on the same rows, so a score that used it
    would no longer be fixed before the calibration rows are seen)."""
    y = label_index(val, classes)
    probs = metrics.softmax(val.arrays["logits"].astype(np.float64))
    cal = conformal.class_scores(probs, score, _aps_u(len(y), seed))
    return conformal.thresholds(cal, y, len(classes), alpha, mondrian)


def predict_sets(logits: np.ndarray, score: str, q) -> np.ndarray:
    """(n, C) prediction sets of new rows: every class whose nonconformity is within its threshold; APS
    with u = 0, so the class that crosses the threshold is kept (MAPIE's include_last_label=True)."""
    probs = metrics.softmax(np.asarray(logits, np.float64))
    return conformal.prediction_sets(conformal.class_scores(probs, score, 0.0), np.asarray(q, np.float64))


def _sets_of(s: Split, classes: list[str], score: str, q: np.ndarray, cfg) -> dict:
    y = label_index(s, classes)
    sets = predict_sets(s.arrays["logits"], score, q)
    r = (
        registry.evaluate(
            registry.CONFORMAL, registry.Sets(sets, y, len(classes)), len(classes), cfg.bootstrap, cfg.seed, s.groups
        )
        if len(y)
        else {}
    )
    r.pop("chance", None)
    return {"n": int(len(y)), **r, "empty": float((sets.sum(1) == 0).mean()) if len(y) else float("nan")}


def prediction_sets(val: Split, tests: dict[str, Split], opened: Split | None, classes: list[str], cfg) -> dict:
    """Split-conformal prediction sets at level 1 - alpha (score.conformal, score.mondrian) fitted on the
    validation rows: per variant the coverage, mean set size and per-class coverage with intervals; the
    sets' size on unseen generators' images (no set can hold their generator); and every score and
    Mondrian choice measured on the raw test rows (points)."""
    alpha, score, mondrian = cfg.alpha, cfg.conformal, cfg.mondrian
    q = fit_sets(val, classes, score, alpha, mondrian, cfg.seed)
    y = label_index(val, classes)
    counts = np.bincount(y, minlength=len(classes))
    out = {
        "alpha": alpha,
        "level": 1 - alpha,
        "score": score,
        "mondrian": mondrian,
        "posterior": "the head's posterior pi, uncalibrated (fixed before the validation rows are seen)",
        "thresholds": q.tolist(),
        "n_val": int(len(y)),
        "n_val_per_class": counts.tolist(),
        "guarantee": GUARANTEE.format(level=1 - alpha, alpha=alpha),
        "variants": {v: _sets_of(s, classes, score, q, cfg) for v, s in tests.items()},
        "notes": [],
    }
    if opened is not None and len(opened):
        sets = predict_sets(opened.arrays["logits"], score, q)
        out["open"] = {
            "n": int(len(opened)),
            "set_size": float(sets.sum(1).mean()),
            "empty": float((sets.sum(1) == 0).mean()),
        }
    raw = tests["raw"]
    yt = label_index(raw, classes)
    out["methods"] = {}
    for sc in conformal.SCORES:
        for mo in (False, True):
            sets = predict_sets(raw.arrays["logits"], sc, fit_sets(val, classes, sc, alpha, mo, cfg.seed))
            out["methods"][sc + ("_mondrian" if mo else "")] = {
                "coverage": metrics.point(metrics.coverage, sets, yt),
                "set_size": metrics.point(metrics.set_size, sets),
            }
    need = int(np.ceil(1 / alpha - 1 - 1e-12))  # rows for a finite threshold: (n + 1)(1 - alpha) <= n
    if len(y) < need:
        out["notes"].append(
            f"only {len(y)} validation images, fewer than the {need} that level {1 - alpha:.0%} "
            "needs: every prediction set holds every generator"
        )
    elif mondrian and (counts < need).any():
        short = [c for c, n in zip(classes, counts) if n < need]
        out["notes"].append(
            f"Mondrian: {', '.join(short)} {'has' if len(short) == 1 else 'have'} fewer than {need} "
            f"validation images, so {'its' if len(short) == 1 else 'their'} threshold is infinite "
            "and every prediction set holds them"
        )
    return out


def unseen(val_scores: np.ndarray, closed: np.ndarray, opened: np.ndarray | None, cfg) -> dict:
    """The unseen-generator flag at conformal p <= alpha, p = (1 + #{validation <= s}) / (n + 1) of each
    image's KDE log-density s against the closed validation images': its false-alarm rate on the closed
    test images (at most alpha under exchangeability) and its detection rate on the open set, with
    intervals; the equivalent log-density cut; a note when n < 1 / alpha makes the p-values coarse."""
    alpha, n = cfg.alpha, len(val_scores)
    flags = registry.Flags(
        conformal.p_values(val_scores, closed) <= alpha,
        np.zeros(0, bool) if opened is None else conformal.p_values(val_scores, opened) <= alpha,
    )
    r = registry.evaluate(registry.UNSEEN, flags, 2, cfg.bootstrap, cfg.seed)
    r.pop("chance", None)
    out = {
        "alpha": alpha,
        "p_value": "(1 + #{closed validation log-densities <= s}) / (n + 1)",
        "p_min": 1 / (n + 1),
        "log_density_threshold": conformal.cut(val_scores, alpha),
        "n_closed": int(len(closed)),
        "n_open": int(len(flags.opened)),
        **r,
    }
    if n < 1 / alpha:
        out["note"] = (
            f"only {n} closed validation images: p-values come in steps of 1/{n + 1} = {1 / (n + 1):.3f}"
            + (f", so none can reach {alpha:g} and no image is ever flagged" if 1 / (n + 1) > alpha else "")
            + f"; {int(np.ceil(1 / alpha))} or more make a flag at {alpha:g} meaningful"
        )
    return out


def applied(m: dict) -> dict:
    """What `attribute` applies to a new image, from a result's metrics.json: the temperature(s), the
    conformal thresholds and level, and the unseen flag's level."""
    c, s = m["calibration"], m["conformal"]
    return {
        "alpha": s["alpha"],
        "calibration": {"method": c["method"], "temperature": c["temperature"]},
        "conformal": {
            "score": s["score"],
            "mondrian": s["mondrian"],
            "thresholds": s["thresholds"],
            "level": s["level"],
        },
    }


def notes(m: dict) -> list[str]:
    """Plain-words notes on the decisions: too few validation images for the level, and a closed-test
    coverage whose whole interval lies below the guaranteed level (validation and test rows are then
    not exchangeable)."""
    c, u = m["conformal"], m["unseen_threshold"]
    out = [f"Prediction sets: {n}." for n in c["notes"]]
    if "note" in u:
        out.append(f"Unseen-generator p-values: {u['note']}.")
    hi = c["variants"]["raw"].get("ci", {}).get("coverage", [np.nan, np.nan])[1]
    if hi < c["level"]:
        out.append(
            f"The closed test's prediction-set coverage (95% interval up to {hi:.3f}) is below the guaranteed "
            f"{c['level']:.0%}: the test images are not exchangeable with the validation images they were "
            "calibrated on (another source, date or processing), and the guarantee does not hold for them."
        )
    return out
