"""Where a result's figures and decisions fail, said in words: a figure whose 95% interval lies wholly on
the wrong side of chance, a guarantee whose measured rate lies outside what it allows, a calibration
that made the ECE worse, and prediction sets too large to inform.

`warnings(m)` reads a result's metrics (metrics.json) only; the report prints its sentences first and
`attribute` prints them with every image, so a reader of one verdict sees what its run cannot do.
"""

from __future__ import annotations

import numpy as np

NAN2 = [np.nan, np.nan]


def _ci(r: dict, key: str) -> list[float]:
    return r.get("ci", {}).get(key, NAN2)


def wrong_side(m: dict) -> list[str]:
    """Headline figures whose whole interval lies below chance: closed-set top-1 and macro AUC, the
    open-set AUROC of each embedding and of each held-out generator."""
    out, raw = [], m["closed"]["raw"]["head"]
    for key, name in (("top1", "top-1"), ("macro_auc", "macro AUC")):
        (lo, hi), chance = _ci(raw, key), raw.get("chance", {}).get(key)
        if chance is not None and hi < chance:
            out.append(
                f"The closed-set {name} ({raw[key]:.3f}, 95% interval {lo:.3f} to {hi:.3f}) lies wholly below "
                f"chance ({chance:.3f}): the model attributes these test images worse than guessing would, so its "
                "attributions mislead. The test images differ from the training images (source, processing) in "
                "a way the model reads as another generator's."
            )
    auroc = [(f"open set, {k}", r) for k, r in m.get("open", {}).items() if k != "dual"]
    auroc += [(f"held-out generator {g}", r) for g, r in m.get("held_out", {}).get("gating_off", {}).items()]
    for name, r in auroc:
        lo, hi = _ci(r, "auroc")
        if hi < 0.5:
            out.append(
                f"The open-set AUROC ({name}: {r['auroc']:.3f}, 95% interval {lo:.3f} to {hi:.3f}) lies wholly "
                "below chance (0.5): the unseen generators' images look more like the training images than the "
                "known generators' test images do, so the unseen-generator flag fires on known images first. "
                "Do not read its verdicts as evidence of an unseen generator."
            )
    return out


def broken(m: dict) -> list[str]:
    """Guarantees whose measured rate lies outside what they allow: the unseen flag's false alarms (whole
    interval above alpha) and the prediction sets' coverage (whole interval below the level), said
    apart for images the guarantee covers and for those it does not."""
    out, u, s = [], m.get("unseen_threshold", {}), m.get("conformal")
    lo, hi = _ci(u, "false_alarm_rate")
    if "false_alarm_rate" in u and lo > u["alpha"]:
        out.append(
            f"The unseen-generator flag fired on {u['false_alarm_rate']:.3f} (95% interval {lo:.3f} to {hi:.3f}) of "
            f"the known generators' test images, where at most {u['alpha']:g} is guaranteed: the guarantee does not "
            f"hold on these images, which are not drawn like the {u.get('n_val', 'validation')} validation images "
            "it was calibrated on (another source, date or processing). Here a flag says little."
        )
    if not s:
        return out
    mode = s.get("population", {}).get("mode", "raw")
    for v, r in s["variants"].items():
        lo, hi = _ci(r, "coverage")
        if not hi < s["level"]:
            continue
        said = (
            f"On {v} the {s['level']:.0%} prediction sets held the true generator of {r['coverage']:.3f} of the images"
        )
        said += f" (95% interval {lo:.3f} to {hi:.3f})"
        if not r.get("covered", v == "raw"):
            out.append(
                f"{said}: these images are processed unlike any calibration image, so the guarantee does not "
                "cover them."
            )
        elif mode == "pooled" and v != "raw":
            out.append(
                f"{said}: the guarantee holds on the calibration images' mixture, not on each level; "
                "score.levels = true holds each level."
            )
        else:
            out.append(
                f"{said}: the guarantee is broken on images it claims to cover, so these test images are not drawn "
                "like the calibration images (another source, date or processing). Do not rely on the sets here."
            )
    return out


def ece_worse(m: dict) -> list[str]:
    """A calibration that made the raw closed test's ECE worse (paired 95% interval above 0), with what
    `attribute` reports instead, or why it does not."""
    c = m.get("calibration") or {}
    d = c.get("test_ece_change")
    if not d or not d["ci"][0] > 0:
        return []
    before, after = m["closed"]["raw"]["head"]["ece"], c["variants"]["raw"]["ece"]
    cv = c.get("cross_validated_ece", {})
    return [
        f"Calibration ({c.get('used', c['method'])}, T = {_t(c['temperature'])}) made the ECE of the closed test "
        f"worse: {before:.3f} -> {after:.3f} (paired difference {d['difference']:+.3f}, 95% interval "
        f"{d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}). On the {c['n_val']} calibration images, cross-validated, it helped "
        f"({cv.get('before', np.nan):.3f} -> {cv.get('after', np.nan):.3f}), and choosing the posterior on the test "
        "images would make them no test, so `attribute` reports the calibrated posterior: its probabilities are "
        "off on images like these test images. Set score.calibration = none to report the posterior as trained."
    ]


def _t(t) -> str:
    return f"{t:.3f}" if isinstance(t, float) else f"{min(t):.2f} to {max(t):.2f} per class"


def too_large(m: dict) -> list[str]:
    """Prediction sets that hold most generators on the raw closed test: their coverage says little."""
    s = m.get("conformal")
    if not s:
        return []
    r, n = s["variants"]["raw"], len(m["classes"])
    size = r.get("set_size", np.nan)
    if not size >= max(1.5, n / 2):
        return []
    return [
        f"The {s['level']:.0%} prediction sets hold {size:.1f} of the {n} generators on average (closed test): a set "
        f"of most generators says little about which one made an image, and its coverage ({r['coverage']:.3f}) is "
        "met by size, not by attribution. The model does not separate these generators well enough at this level."
    ]


def warnings(m: dict) -> list[str]:
    """Every failure above, in words, in the order a reader should meet them."""
    return [*wrong_side(m), *broken(m), *ece_worse(m), *too_large(m)]
