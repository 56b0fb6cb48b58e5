"""Decisions with a stated error rate, fitted on the calibration images and checked on the test
images: the calibrated posterior (temperature scaling), split-conformal prediction sets at level
1 - score.alpha, and conformal p-values of the unseen-generator flag.

The calibration images are the val partition and, with score.variants, the val rows of the closed
split's post-processed variants: the guarantee then covers images post-processed like them, pooled or
(score.levels) at each post-processing level. `population` says which images those are, `covers`
whether a scored set is among them, and the report states both.

Everything here takes arrays (evaluate.Split) and returns numbers; report/scoring.py calls it and
stages/attribute.py applies what it records (`applied`) to new images.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from leakpipe.pipeline.bench.postprocess import parse_ops
from leakpipe.pipeline.math import bootstrap, calibration as calib, conformal, metrics
from leakpipe.pipeline.report import registry
from leakpipe.pipeline.report.evaluate import Split, label_index

METHODS = ("none", "temperature", "class_temperature")  # score.calibration, each measured on every run
RAW = "raw"  # the level of the closed split's own images, whatever their variant column says
UNSEEN_GUARANTEE = (
    "a known generator's raw image is flagged as unseen with probability at most {alpha:.0%} (the flag is "
    "calibrated on the raw validation images); images of unseen generators are not drawn like them"
)
GUARANTEE = {
    "raw": "If a new image and the validation images are exchangeable (drawn alike, from the known generators, "
    "with no post-processing the validation images lack), its prediction set holds its true generator with "
    "probability at least {level:.0%}. Post-processed images are not exchangeable with them: the guarantee does "
    "not hold there, and the tables below show by how much it fails",
    "pooled": "If a new image is drawn like the {n} calibration images ({mix}), its prediction set holds its true "
    "generator with probability at least {level:.0%}. That is a guarantee on their mixture: one level of it can "
    "fall below {level:.0%} while the mixture holds (score.levels = true holds each level). Images processed "
    "otherwise (another operation, more of them at once, stronger parameters) are not covered, and the tables "
    "below show by how much it fails there",
    "levels": "If a new image is drawn like the calibration images of one post-processing level ({mix}), its "
    "prediction set holds its true generator with probability at least {level:.0%}, whichever the level: each "
    "level has its own threshold and a new image, whose level is unknown, is held to the largest. Images "
    "processed otherwise (another operation, more of them at once, stronger parameters) are not covered, and "
    "the tables below show by how much it fails there",
}


def pooled(val: Split, variants: Split | None) -> Split:
    """The calibration images: the raw val rows (level RAW) and the val rows of `variants`, if any."""
    raw = Split(val.name, val.arrays, val.labels, val.partition, np.full(len(val), RAW, object), 0, val.ids)
    if variants is None or not len(variants):
        return raw
    cat = lambda a, b: {k: np.concatenate([a[k], b[k]]) for k in a if k in b}  # noqa: E731
    pad = {**variants.ids, "ops": variants.ids.get("ops", np.full(len(variants), "", object))}
    ids = {**raw.ids, "ops": raw.ids.get("ops", np.full(len(raw), "", object))}
    return Split(
        f"{val.name} + {variants.name}",
        cat(raw.arrays, variants.arrays),
        np.r_[raw.labels, variants.labels],
        np.r_[raw.partition, variants.partition],
        np.r_[raw.variant, variants.variant],
        0,
        cat(ids, pad),
    )


def _processing(ops) -> list[list[str]]:
    """Each distinct ops text as its list of operation names."""
    return [[name for name, _ in parse_ops(text)] for text in set(ops)]


def population(cal: Split, split: str, levels: bool, drawn=()) -> dict:
    """What the calibration images are: how many at each level (raw, step1, ...), and (`drawn`: the ops
    column of the variants' manifest, `split`) the operation families their post-processing draws from
    and the most operations of one image."""
    done = _processing(drawn) if split else []
    return {
        "split": split,
        "mode": "levels" if levels and split else "pooled" if split else "raw",
        "n": int(len(cal)),
        "per_level": dict(sorted(Counter(cal.variant.tolist()).items())),
        "families": sorted({name for names in done for name in names}),
        "most_ops": max((len(names) for names in done), default=0),
    }


def covers(pop: dict, s: Split, raw: bool = False) -> bool:
    """Whether the calibration images `pop` describes include images processed as `s`'s rows are: the raw
    closed test (`raw`) always; a post-processed set when its ops column names only calibrated families,
    no more of them at once than a calibration image had (a set without an ops column: never)."""
    if raw:
        return True
    if not pop["families"] or "ops" not in s.ids or not all(s.ids["ops"]):
        return False
    done = _processing(s.ids["ops"])
    return all(len(names) <= pop["most_ops"] and set(names) <= set(pop["families"]) for names in done)


def guarantee(pop: dict, level: float, alpha: float) -> str:
    """The guarantee, in words, for the calibration images `pop` describes."""
    mix = ", ".join(f"{n} {lv}" for lv, n in pop["per_level"].items())
    if pop["families"]:
        mix += (
            f"; post-processed by up to {pop['most_ops']} of {', '.join(pop['families'])} as "
            f"`leakpipe postprocess --variants` draws them ({pop['split']})"
        )
    text = GUARANTEE[pop["mode"]].format(level=level, n=pop["n"], mix=mix)
    return f"{text}. The unseen-generator flag: {UNSEEN_GUARANTEE.format(alpha=alpha)}"


def _listed(t):
    return float(t) if np.ndim(t) == 0 else np.asarray(t, float).tolist()


def calibration(val: Split, tests: dict[str, Split], classes: list[str], cfg) -> dict:
    """Temperature scaling fitted on the calibration rows `val` by NLL (score.calibration), with every
    method of METHODS measured beside it (validation NLL; on the raw test rows NLL, ECE, top-1), the ECE
    and top-1 of the calibrated posterior per variant with their intervals, and the reliability diagram's
    bins before and after on the raw test rows. The posterior applied (`used`, `temperature`) is the
    uncalibrated one when calibrating made the validation rows' cross-validated ECE worse."""
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
    before, after = calib.cross_validated_ece(lv, yv, cfg.calibration, cfg.seed)
    used = "none" if after > before else cfg.calibration  # NaN (too few rows) compares False: calibrated
    t = fitted[used]
    out = {
        "method": cfg.calibration,
        "used": used,
        "temperature": _listed(t),
        "fitted_temperature": _listed(fitted[cfg.calibration]),
        "cross_validated_ece": {"before": before, "after": after, "folds": calib.CV_FOLDS},
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
    out["test_ece_change"] = ece_change(lt, yt, t, cfg, test.groups)
    if len(yv) == 0:
        out["note"] = "no validation rows: the posterior is left uncalibrated (T = 1)"
    return out


def ece_change(logits: np.ndarray, y: np.ndarray, t, cfg, groups) -> dict | None:
    """The applied posterior's ECE minus the uncalibrated one's on the same test rows, paired on the same
    resamples (None without rows or resamples)."""
    if not len(y) or not cfg.bootstrap:
        return None
    after, before = calib.scaled_posterior(logits, t), metrics.softmax(logits)
    ece = metrics.expected_calibration_error
    terms = [metrics.calibration_terms(p, y) for p in (after, before)]  # once for every block of resamples
    diff = bootstrap.Resamples(cfg.bootstrap, cfg.seed, groups).of(
        lambda w: metrics.ece_of(terms[0], w) - metrics.ece_of(terms[1], w), len(y)
    )
    return bootstrap.paired(metrics.point(ece, after, y) - metrics.point(ece, before, y), diff)


def _aps_u(n: int, seed: int) -> np.ndarray:
    """The randomisation of the calibration rows' APS scores (Romano et al. 2020), seeded by score.seed."""
    return np.random.default_rng([seed, 23]).uniform(size=n)


def fit_sets(
    val: Split, classes: list[str], score: str, alpha: float, mondrian: bool, seed: int, levels: bool = False
) -> tuple[np.ndarray, dict]:
    """((C,) conformal thresholds, {level: (C,) thresholds}) from the calibration rows' nonconformity
    under `score`, computed on the head's posterior pi as trained (the temperature is fitted on the same
    rows, so a score that used it would no longer be fixed before the calibration rows are seen). With
    `levels`, each level (the variant column) has its own and the one applied is the largest."""
    y = label_index(val, classes)
    probs = metrics.softmax(val.arrays["logits"].astype(np.float64))
    cal = conformal.class_scores(probs, score, _aps_u(len(y), seed))
    if not levels:
        return conformal.thresholds(cal, y, len(classes), alpha, mondrian), {}
    at = {lv: val.variant == lv for lv in sorted(set(val.variant.tolist()))}
    per = {lv: conformal.thresholds(cal[sel], y[sel], len(classes), alpha, mondrian) for lv, sel in at.items()}
    return np.max(np.stack(list(per.values())), axis=0), per


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


def prediction_sets(
    val: Split, tests: dict[str, Split], opened: Split | None, classes: list[str], cfg, pop: dict | None = None
) -> dict:
    """Split-conformal prediction sets at level 1 - alpha (score.conformal, score.mondrian, score.levels)
    fitted on the calibration rows `val` (`pop` describes them; default: the raw val partition): per
    variant the coverage, mean set size and per-class coverage with intervals, and whether the guarantee
    covers it; the sets' size on unseen generators' images (no set can hold their generator); and every
    score and Mondrian choice measured on the raw test rows (points)."""
    alpha, score, mondrian = cfg.alpha, cfg.conformal, cfg.mondrian
    pop = pop or population(val, "", False)
    levels = pop["mode"] == "levels"
    q, per_level = fit_sets(val, classes, score, alpha, mondrian, cfg.seed, levels)
    y = label_index(val, classes)
    counts = np.bincount(y, minlength=len(classes))
    out = {
        "alpha": alpha,
        "level": 1 - alpha,
        "score": score,
        "mondrian": mondrian,
        "posterior": "the head's posterior pi, uncalibrated (fixed before the validation rows are seen)",
        "thresholds": q.tolist(),
        "level_thresholds": {lv: t.tolist() for lv, t in per_level.items()},
        "n_val": int(len(y)),
        "n_val_per_class": counts.tolist(),
        "population": pop,
        "guarantee": guarantee(pop, 1 - alpha, alpha),
        "variants": {
            v: {**_sets_of(s, classes, score, q, cfg), "covered": covers(pop, s, raw=v == RAW)}
            for v, s in tests.items()
        },
        "notes": [],
    }
    if opened is not None and len(opened):
        sets = predict_sets(opened.arrays["logits"], score, q)
        out["open"] = {
            "n": int(len(opened)),
            "set_size": float(sets.sum(1).mean()),
            "empty": float((sets.sum(1) == 0).mean()),
        }
    out["methods"] = _every_score(val, tests["raw"], classes, alpha, cfg.seed, levels)
    out["notes"] += _too_few_notes(classes, counts, pop, alpha, mondrian, levels)
    return out


def _every_score(val: Split, raw: Split, classes: list[str], alpha: float, seed: int, levels: bool) -> dict:
    """Coverage and mean set size (points) on the raw test rows of every score, with and without Mondrian."""
    yt = label_index(raw, classes)
    out = {}
    for sc in conformal.SCORES:
        for mo in (False, True):
            sets = predict_sets(raw.arrays["logits"], sc, fit_sets(val, classes, sc, alpha, mo, seed, levels)[0])
            out[sc + ("_mondrian" if mo else "")] = {
                "coverage": metrics.point(metrics.coverage, sets, yt),
                "set_size": metrics.point(metrics.set_size, sets),
            }
    return out


def _too_few_notes(classes: list[str], counts, pop: dict, alpha: float, mondrian: bool, levels: bool) -> list[str]:
    """A note when the calibration rows (all, of a level, or of a class under Mondrian) are too few for a
    finite threshold: every prediction set then holds every generator (or that class)."""
    notes: list[str] = []
    need = int(np.ceil(1 / alpha - 1 - 1e-12))  # rows for a finite threshold: (n + 1)(1 - alpha) <= n
    if counts.sum() < need:
        notes.append(
            f"only {int(counts.sum())} validation images, fewer than the {need} that level {1 - alpha:.0%} "
            "needs: every prediction set holds every generator"
        )
    elif levels and min(pop["per_level"].values()) < need:
        short = [lv for lv, n in pop["per_level"].items() if n < need]
        notes.append(
            f"levels: {', '.join(short)} {'has' if len(short) == 1 else 'have'} fewer than {need} calibration "
            "images, so every prediction set holds every generator"
        )
    elif mondrian and (counts < need).any():
        short = [c for c, n in zip(classes, counts) if n < need]
        notes.append(
            f"Mondrian: {', '.join(short)} {'has' if len(short) == 1 else 'have'} fewer than {need} "
            f"validation images, so {'its' if len(short) == 1 else 'their'} threshold is infinite "
            "and every prediction set holds them"
        )
    return notes


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
        "calibration": {"method": c.get("used", c["method"]), "temperature": c["temperature"]},
        "conformal": {
            "score": s["score"],
            "mondrian": s["mondrian"],
            "thresholds": s["thresholds"],
            "level": s["level"],
        },
        "population": s.get("guarantee", ""),
        "warnings": m.get("warnings", []),
    }


def notes(m: dict) -> list[str]:
    """Plain-words notes on the decisions: too few calibration images for the level (where a figure or a
    guarantee fails is said by `failures.warnings`)."""
    c, u = m["conformal"], m["unseen_threshold"]
    out = [f"Prediction sets: {n}." for n in c["notes"]]
    if "note" in u:
        out.append(f"Unseen-generator p-values: {u['note']}.")
    return out
