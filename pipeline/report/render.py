"""report.md: tables laid out like the paper's Tables 1-3 (closed-set attribution, robustness to
post-processing, open set), generated from the metric registry, the decisions at level 1 - alpha
(calibration, prediction sets, unseen-generator p-values), with the notes and the figures."""

from __future__ import annotations

import math
from pathlib import Path

from leakpipe.pipeline.report import registry
from leakpipe.pipeline.store.atomic import atomic_write_text


# ---------------------------------------------------------------- report.md
def fmt(x, digits=3) -> str:
    """A number for a table, 'n/a' for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def with_ci(r: dict, key: str, index: int | None = None) -> str:
    """A table cell: the number (entry `index` of a per-class list) and its 95% bootstrap interval,
    when there is one."""
    value, ci = r.get(key), r.get("ci", {}).get(key)
    if index is not None:
        value, ci = value[index], (ci[index] if ci else None)
    lo, hi = ci or (None, None)
    return fmt(value) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None else "")


def maha_name(fit: dict | None) -> str:
    """The Mahalanobis row's name: its covariance and the rows it was fitted on (metrics.json's
    `mahalanobis`; a report scored before it has Eq. 13 on the training rows)."""
    fit = fit or {"shared": 0.0, "rows": "train"}
    w = fit["shared"]
    kind = (
        "Eq. 13, per-class diagonal"
        if w == 0
        else "one shared covariance"
        if w == 1
        else f"per-class diagonal + shared covariance, weight {w:g}"
    )
    rows = "train rows" if fit["rows"] == "train" else "train + val rows"
    return f"Mahalanobis ({kind}, fitted on {rows}{', ' + str(fit['n']) if 'n' in fit else ''})"


def report_markdown(m: dict) -> str:
    """report.md of a scored result's metrics.json: its sections (SECTIONS) in order."""
    return "\n".join(line for section in SECTIONS for line in section(m))


def _header(m: dict) -> list[str]:
    """The result, warnings and notes first, then the generators, timesteps and head."""
    lines = [
        f"# leakpipe report: result `{m['result']}`",
        "",
        f"The trained result `cache/results/{m['result']}` (its training config is its `config.json`); "
        "`leakpipe runs` lists the run names that point at it.",
        "",
    ]
    if m.get("warnings"):  # where a figure or a decision fails: first, in words (report/failures.py)
        lines += [f"> **Warning:** {w}" for w in m["warnings"]] + [""]
    if m.get("notes"):
        lines += [f"> {n}" for n in m["notes"]] + [""]
    lines += [
        f"Generators ({len(m['classes'])}): {', '.join(m['classes'])}. Timesteps T = {m['timesteps']}. "
        f"Head: {m['head']}.",
        "",
    ]
    return lines


def _closed_set(m: dict) -> list[str]:
    """Table 1: closed-set attribution with intervals and chance, then per-class AUC."""
    closed = m["closed"]
    cols = registry.tabled(registry.CLOSED)
    lines = [
        "## Table 1. Closed-set attribution (test partition, raw images)",
        "",
        "Each number with its 95% bootstrap interval over the test images; chance beside it.",
        "",
        "| scorer | n | " + " | ".join(m.label for m in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for scorer, name in (("head", "Proto-LeakNet head"), ("mahalanobis", maha_name(m.get("mahalanobis")))):
        r = closed["raw"][scorer]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(with_ci(r, m.key) for m in cols) + " |")
    chance = closed["raw"]["head"].get("chance", {})
    lines.append("| chance | | " + " | ".join(fmt(chance.get(m.key)) if m.key in chance else "" for m in cols) + " |")
    lines += [
        "",
        "Per-class one-vs-rest AUC (head on the posterior pi / Mahalanobis on s_c):",
        "",
        "| generator | " + " | ".join(closed) + " |",
        "|---|" + "---:|" * len(closed),
    ]
    for c, name in enumerate(m["classes"]):
        cells = [
            " / ".join(with_ci(closed[v][scorer], "per_class_auc", c) for scorer in ("head", "mahalanobis"))
            for v in closed
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _baselines(m: dict) -> list[str]:
    """Chance, the forensic pixel baseline, the probe on z0 and the reconstruction baseline beside the model."""
    lines = []
    b = m.get("baselines")
    if b and "skipped" not in b:
        lines += [
            "",
            "Beside the model, on the same test images: chance, a forensic pixel baseline (logistic regression on "
            "8 x 8 block-DCT statistics on the JPEG grid, noise residuals of fixed high-pass filters, the "
            "power spectrum and colour means, from each original file at its native resolution, a centre crop "
            f"of at most {b.get('forensic_max_side', 512)} px), a linear probe on the cached z0 (did stage one "
            "keep the signal?)" + (" and a reconstruction baseline (below)" if "reconstruction" in b else "") + ":",
            "",
            "| | top-1 | model minus this (paired) | p |",
            "|---|---:|---:|---:|",
            f"| chance | {fmt(b['chance'])} | | |",
        ]
        rows = (("forensic", "forensic pixel baseline"), ("z0_probe", "linear probe on z0"))
        for key, name in rows + ((("reconstruction", "reconstruction baseline"),) if "reconstruction" in b else ()):
            d = b.get(f"head_minus_{key}")
            diff = f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else ""
            lines.append(f"| {name} | {with_ci(b[key], 'top1')} | {diff} | {fmt(d['p']) if d else ''} |")
        lines.append(f"| Proto-LeakNet head | {with_ci(b['head'], 'top1')} | | |")
        lines += reconstruction_lines(b)
    elif b:
        lines += ["", f"Baselines: {b['skipped']}."]
    return lines


def _prototypes_and_attention(m: dict) -> list[str]:
    """What the prototypes hold (when saved) and the attention over timesteps."""
    lines = []
    if m.get("prototypes"):
        lines += prototype_lines(m["prototypes"], m["classes"])
    lines += attention_lines(m["attention"], m["timesteps"])
    return lines


def _robustness(m: dict) -> list[str]:
    """Table 2: the headline metrics per post-processing variant."""
    closed = m["closed"]
    pair = registry.headline(registry.CLOSED)
    lines = [
        "",
        f"## Table 2. Robustness to post-processing ({' / '.join(m.label for m in pair)}, each with its 95% interval)",
        "",
        "| scorer | " + " | ".join(closed) + " |",
        "|---|" + "---:|" * len(closed),
    ]
    for scorer, name in (("head", "Proto-LeakNet head"), ("mahalanobis", "Mahalanobis")):
        lines.append(
            f"| {name} | "
            + " | ".join(" / ".join(with_ci(closed[v][scorer], m.key) for m in pair) for v in closed)
            + " |"
        )
    return lines


def _open_set(m: dict) -> list[str]:
    """Table 3: closed test against unseen generators (Eq. 16-17), OSCR, per generator, the dual warning."""
    lines = ["", "## Table 3. Open set: closed test vs unseen generators (KDE log-density, Eq. 16-17)", ""]
    if m.get("open"):
        cols = registry.tabled(registry.OPEN)
        lines += [
            "| embedding | n closed | n open | bandwidth | " + " | ".join(c.label for c in cols) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(cols),
        ]
        for kind, r in m["open"].items():
            bw = fmt(r.get("bandwidth"), 4) if "bandwidth" in r else "-"
            lines.append(
                f"| {kind} | {r['n_closed']} | {r['n_open']} | {bw} | "
                + " | ".join(with_ci(r, c.key) for c in cols)
                + " |"
            )
        lines.append(
            "| chance | | | | " + " | ".join(fmt(c.chance(2)) if c.chance(2) is not None else "" for c in cols) + " |"
        )
        lines += kde_cap_lines(m["open"]) + open_baseline_lines(m["open"])
        oscr = {k: r["oscr"]["area"] for k, r in m["open"].items() if "oscr" in r}
        if oscr:
            lines += [
                "",
                "Area under the open-set classification rate curve (closed images accepted *and* correctly "
                "attributed, against open images accepted; 1 = perfect): "
                + ", ".join(f"{k} {fmt(a)}" for k, a in oscr.items())
                + ".",
            ]
        for kind, r in m["open"].items():
            if r.get("per_generator"):
                lines += [
                    "",
                    f"Open-set AUROC of each unseen generator against the closed test set ({kind}):",
                    "",
                    "| unseen generator | n | AUROC |",
                    "|---|---:|---:|",
                ]
                lines += [f"| {g} | {v['n']} | {with_ci(v, 'auroc')} |" for g, v in r["per_generator"].items()]
        if "dual" in m["open"]:
            lines += [
                "",
                f"**Warning:** {m['open']['dual']['warning']}. Its honest replacement on known "
                "generators is `leakpipe sweep --logo` (leave-one-generator-out).",
            ]
    else:
        lines.append(f"No open set: {m.get('open_missing', 'not available')}.")
    return lines


def _decisions_and_held_out(m: dict) -> list[str]:
    """The decisions an examiner can sign, and the generators held out of training."""
    lines = []
    if m.get("conformal"):
        lines += decision_lines(m)
    if m.get("held_out"):
        lines += held_out_lines(m["held_out"])
    return lines


def _leakage(m: dict) -> list[str]:
    """Scored rows left out because the model saw them in training or selection."""
    lines = []
    if m.get("leakage"):
        lines += [
            "",
            "## Leakage audit",
            "",
            "Scored rows the model saw while it was trained or selected, in some form, are left out of every "
            "number above.",
            "",
            "| scored set | left out | same file | same group | copy of a training image |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {v['rows']} | {v['content']} | {v['group']} | {v['source']} |" for k, v in m["leakage"].items()
        ]
    return lines


def _figures(m: dict) -> list[str]:
    """The figures, each embedded by its file name."""
    lines = ["", "## Figures", ""]
    for fig in m["figures"]:
        lines += [f"![{fig}](figures/{fig})", ""]
    return lines


# report.md, section by section: each renders from metrics.json alone and is empty when it does not apply
SECTIONS = (
    _header,
    _closed_set,
    _baselines,
    _prototypes_and_attention,
    _robustness,
    _open_set,
    _decisions_and_held_out,
    _leakage,
    _figures,
)


def decision_lines(m: dict) -> list[str]:
    """The decisions an examiner can sign: the calibrated posterior (ECE before and after, per variant),
    the prediction sets' coverage and size against their guaranteed level (per variant and per class),
    and the unseen-generator flag's false alarms and detections at level alpha."""
    return calibration_lines(m) + prediction_set_lines(m) + class_coverage_lines(m) + unseen_lines(m)


def calibration_lines(m: dict) -> list[str]:
    """The calibrated posterior: ECE before and after per variant, and every calibration method."""
    c, s, closed = m["calibration"], m["conformal"], m["closed"]
    level = s["level"]
    t = c.get("fitted_temperature", c["temperature"])
    temp = f"T = {t:.3f}" if isinstance(t, float) else "T per class " + ", ".join(f"{x:.2f}" for x in t)
    lines = [
        "",
        f"## Decisions at {level:.0%}: calibrated posterior, prediction sets, unseen-generator p-values",
        "",
        f"{s['guarantee']}.",
        "",
        f"**Calibrated posterior** (`score.calibration = {c['method']}`, fitted on {c['n_val']} calibration images by "
        f"negative log-likelihood; {temp}). {used_line(c)} ECE (15 bins) and top-1, each with its 95% interval:",
        "",
        "| variant | n | ECE before | ECE after | top-1 after |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, r in c["variants"].items():
        lines.append(
            f"| {v} | {r['n']} | {with_ci(closed[v]['head'], 'ece')} | {with_ci(r, 'ece')} | {with_ci(r, 'top1')} |"
        )
    lines += [
        "",
        "Every calibration method on the same images (validation NLL is what each minimises; NLL, ECE and "
        "top-1 on the raw closed test):",
        "",
        "| method | T | validation NLL | test NLL | test ECE | test top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in c["methods"].items():
        tt = r["temperature"]
        tt = fmt(tt) if isinstance(tt, float) else f"{fmt(min(tt), 2)} to {fmt(max(tt), 2)}"
        mark = " (used)" if name == c["method"] else ""
        lines.append(
            f"| {name}{mark} | {tt} | {fmt(r['val_nll'])} | {fmt(r['test_nll'])} | {fmt(r['test_ece'])} | "
            f"{fmt(r['test_top1'])} |"
        )
    lines += [
        "",
        "The reliability diagram (figures/reliability.png) shows the same before and after, per confidence bin.",
    ]
    return lines


def prediction_set_lines(m: dict) -> list[str]:
    """The prediction sets' coverage and size against their guaranteed level, per variant."""
    s, level = m["conformal"], m["conformal"]["level"]
    lines = [
        "",
        f"**Prediction sets** (split conformal, `score.conformal = {s['score']}`"
        + (", Mondrian: one threshold per class" if s["mondrian"] else "")
        + (", one threshold per post-processing level, the largest applied" if s.get("level_thresholds") else "")
        + f", on the head's uncalibrated posterior; {s['n_val']} calibration images). Coverage is the fraction of "
        f"images whose set holds their true generator: {level:.0%} or more is guaranteed on the images the "
        "guarantee above covers only, so the rows it does not cover show how far it falls without that:",
        "",
        "| variant | n | covered by the guarantee | coverage | shortfall | mean set size | empty sets |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for v, r in s["variants"].items():
        short = level - r["coverage"] if r.get("coverage") is not None else None
        lines.append(
            f"| {v} | {r['n']} | {'yes' if r.get('covered', v == 'raw') else 'no'} | {with_ci(r, 'coverage')} | "
            f"{fmt(max(short, 0.0)) if short is not None else 'n/a'} | {with_ci(r, 'set_size')} | {fmt(r['empty'])} |"
        )
    if s.get("level_thresholds"):
        lines += ["", "Thresholds per level (nonconformity; the largest is applied): " + level_text(s) + "."]
    if "open" in s:
        lines += [
            "",
            f"On the {s['open']['n']} open-set images (unseen generators, whose true generator no set can "
            f"hold) the sets have mean size {fmt(s['open']['set_size'])} ({fmt(s['open']['empty'])} empty).",
        ]
    return lines


def class_coverage_lines(m: dict) -> list[str]:
    """The prediction sets' coverage per class, and every conformal score with and without Mondrian."""
    s = m["conformal"]
    lines = []
    raw = s["variants"]["raw"]
    if raw.get("per_class_coverage") is not None:
        lines += [
            "",
            "Coverage per generator, closed test (raw); the marginal guarantee does not bound any one "
            "class unless `score.mondrian = true`:",
            "",
            "| generator | calibration images | coverage |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {g} | {s['n_val_per_class'][k]} | {with_ci(raw, 'per_class_coverage', k)} |"
            for k, g in enumerate(m["classes"])
        ]
    lines += [
        "",
        "Every score, with and without Mondrian thresholds, on the raw closed test (points):",
        "",
        "| score | coverage | mean set size |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {k}{' (used)' if k == s['score'] + ('_mondrian' if s['mondrian'] else '') else ''} | "
        f"{fmt(r['coverage'])} | {fmt(r['set_size'])} |"
        for k, r in s["methods"].items()
    ]
    return lines


def unseen_lines(m: dict) -> list[str]:
    """The unseen-generator flag's false alarms and detections at level alpha."""
    u = m["unseen_threshold"]
    cut = u["log_density_threshold"]
    lines = [
        "",
        f"**Unseen-generator p-values.** An image's p-value is {u['p_value']} of its KDE log-density s on "
        f"`{u['embedding']}` against the {u['n_val']} closed validation images; `leakpipe attribute` flags it as "
        f"from an unseen generator when p <= {u['alpha']:g} (log-density below {fmt(cut)}), which bounds the "
        f"false-alarm rate on known generators by {u['alpha']:g}.",
        "",
        "| | n | flagged |",
        "|---|---:|---:|",
        f"| closed test (known generators: false alarms, at most {u['alpha']:g} guaranteed) | {u['n_closed']} | "
        f"{with_ci(u, 'false_alarm_rate')}{above(u)} |",
    ]
    if u.get("n_open"):
        lines.append(f"| open set (unseen generators: detected) | {u['n_open']} | {with_ci(u, 'detection_rate')} |")
    if "note" in u:
        lines += ["", f"Note: {u['note']}."]
    return lines


def level_text(s: dict) -> str:
    """'raw 0.41, step1 0.62, ...': each level's threshold (its range over classes under Mondrian)."""
    span = lambda t: fmt(t[0]) if min(t) == max(t) else f"{fmt(min(t))} to {fmt(max(t))}"  # noqa: E731
    return ", ".join(f"{lv} {span(t)}" for lv, t in s["level_thresholds"].items())


def used_line(c: dict) -> str:
    """Which posterior `attribute` reports: the calibrated one, or (when calibrating made the calibration
    images' cross-validated ECE worse) the one as trained."""
    cv = c.get("cross_validated_ece", {})
    if c.get("used", c["method"]) == c["method"]:
        return "`leakpipe attribute` reports this posterior."
    return (
        f"Fitted on part of the calibration images, it made the ECE of the others worse ({fmt(cv.get('before'))} -> "
        f"{fmt(cv.get('after'))}, {cv.get('folds')}-fold), so `leakpipe attribute` reports the posterior as trained "
        "(T = 1), and the columns after are that posterior's."
    )


def above(u: dict) -> str:
    """' (above the guarantee)' when the false alarms' whole interval lies above alpha."""
    lo = u.get("ci", {}).get("false_alarm_rate", [math.nan])[0]
    return " (**above the guarantee**: see the warning)" if lo > u["alpha"] else ""


OPEN_BASELINE_NOTE = (
    "Rows mahalanobis and max_softmax are open-set baselines on the same images, not the KDE: minus the "
    "Mahalanobis distance of h_bar to the nearest class mean with one shared Ledoit-Wolf covariance fitted on "
    "the training rows (Lee et al., NeurIPS 2018), and the head's largest class posterior (Hendrycks and "
    "Gimpel, ICLR 2017). The unseen-generator flag reads the KDE (score.kde_embedding). Where a baseline is "
    "far above the KDE, h_bar does tell unseen generators apart and the KDE does not read it: its isotropic "
    "kernel weighs every direction of h_bar alike, those that carry an image's content as much as those that "
    "carry its generator (measured on TAEF2 latents in benchmarks/RESULTS.md)."
)


def open_baseline_lines(open_set: dict) -> list[str]:
    """What the baseline rows of Table 3 are, when it has them."""
    return ["", OPEN_BASELINE_NOTE] if "mahalanobis" in open_set or "max_softmax" in open_set else []


def kde_cap_lines(open_set: dict) -> list[str]:
    """One sentence when the KDE's reference was a subsample (score.kde_max_reference)."""
    ref = next((r["kde_reference"] for r in open_set.values() if r.get("kde_reference")), None)
    if not ref or ref["used"] >= ref["rows"]:
        return []
    return [
        "",
        f"The KDE reference is a seeded subsample of {ref['used']:,} of the {ref['rows']:,} closed "
        f"training embeddings (score.kde_max_reference = {ref['max_reference']:,}, seed {ref['seed']}); "
        "its error against the exact KDE is measured in benchmarks/RESULTS.md (section Scale).",
    ]


def reconstruction_lines(b: dict) -> list[str]:
    """What the reconstruction baseline read, or why it was left out."""
    if "reconstruction_skipped" in b:
        return ["", f"Reconstruction baseline: {b['reconstruction_skipped']}."]
    if "reconstruction_of" not in b:
        return []
    r = b["reconstruction_of"]
    return [
        "",
        f"The reconstruction baseline (the idea of AEROBLADE, Ricker et al., CVPR 2024) reads each file's distances "
        f"to its round trip through {', '.join(r['autoencoders'])}, on a centre crop of at most "
        f"{b['reconstruction_max_side']} px, never resized: {r['features']}.",
    ]


def prototype_lines(p: dict, classes: list[str]) -> list[str]:
    """Whether each class's prototypes stand for different modes of its training images."""
    n_m, rows = p["per_class_count"], p["per_class"]
    won = sum(r["winning"] for r in rows)
    lines = [
        "",
        f"Prototypes: {won} of {n_m * len(rows)} ({p['winning_fraction']:.0%}) win at least one training "
        f"image of their class (are its nearest by d_cm, Eq. 9); median separation {fmt(p['median_separation'])} "
        "(mean squared distance between two prototypes of a class over the mean squared distance of its images "
        "from their mean; near 0: collapsed onto one point, about 1: as far apart as the images are spread).",
    ]
    if won < n_m * len(rows):
        lines += ["", "| generator | prototypes winning | separation |", "|---|---:|---:|"]
        lines += [f"| {c} | {r['winning']} of {n_m} | {fmt(r['separation'])} |" for c, r in zip(classes, rows)]
    if n_m > 1 and p["median_separation"] < COLLAPSED:
        lines += ["", collapsed_words(p)]
    return lines


COLLAPSED = 0.05  # a median separation below this: a class's prototypes sit on one point


def collapsed_words(p: dict) -> str:
    """The plain statement a collapsed head needs: its explanation is one prototype per class, and why."""
    n_m = p["per_class_count"]
    head = (
        f"**The explanation is one prototype per class.** The {n_m} prototypes of each class sit on one point "
        f"(median separation {fmt(p['median_separation'])}), so an image is explained by its class's one point, in "
        f"effect the class's centre under the gate w, not by one of {n_m} modes of its class; which of them an "
        "image is nearest to turns on differences too small to mean anything, so the gallery's columns are not "
        "modes either. "
    )
    if p.get("init") == "kmeans":
        return (
            head
            + "They were placed apart, at k-means centres of the class's embeddings, and training drew them together."
        )
    return head + (
        f"They start together (N(0, {p.get('std', 0.01):g}^2), model.prototype_std, the authors' initialisation), and "
        f"the soft minimum of Eq. 10 then gives each prototype of a class the same share (its responsibility, Eq. 15, "
        f"1/{n_m} while they coincide) of every image's pull, so they move as one. `model.prototype_init = kmeans` "
        "places them apart, at k-means centres of each class's embeddings after the warm-up epoch."
    )


UNIFORM_ATTENTION = 0.01  # every class's mean a_t within this of 1/T reads as uniform


def attention_lines(a_t: list, timesteps: list) -> list[str]:
    """What the temporal attention weights show, in words: nothing to choose with one timestep; when they
    are uniform, that h_bar is the plain mean of the h_t and says nothing about which timestep matters."""
    t = len(timesteps)
    if t == 1:
        return [
            "",
            f"Temporal attention: one timestep (t = {timesteps[0]}), so a_t = 1 and h_bar = h_t; it plays no part.",
        ]
    gap = max((abs(x - 1 / t) for row in a_t for x in row), default=float("nan"))
    steps = ", ".join(str(x) for x in timesteps)
    if gap <= UNIFORM_ATTENTION:
        return [
            "",
            f"Temporal attention (Eq. 6-7) is uniform: every generator's mean a_t is 1/{t} = {1 / t:.3f} within "
            f"{gap:.3f} at t = {steps}. Uniform weights make h_bar the plain mean of the h_t: the model does not "
            "tell these timesteps apart (their noised copies of z0 differ by little), so the weights say nothing "
            "about which timestep carries a generator's trace; attention.png shows it.",
        ]
    return [
        "",
        f"Temporal attention (Eq. 6-7): the generators' mean a_t are up to {gap:.3f} from uniform (1/{t} = "
        f"{1 / t:.3f}) at t = {steps}; attention.png shows them per generator.",
    ]


def held_out_lines(h: dict) -> list[str]:
    """The leave-one-generator-out table: each held-out generator against the trained generators' test
    images, gating off and on."""
    lines = [
        "",
        "## Held-out generators (leave-one-generator-out)",
        "",
        h["note"] + ".",
        "",
        "| held-out generator | n | AUROC, gating off | AUROC, gating on |",
        "|---|---:|---:|---:|",
    ]
    for g, v in h["gating_off"].items():
        lines.append(f"| {g} | {v['n']} | {with_ci(v, 'auroc')} | {with_ci(h['gating_on'].get(g, {}), 'auroc')} |")
    if not h["gating_off"]:
        lines.append("| (the held-out generators have no test rows) | 0 | | |")
    return lines


def write_report(path: Path, m: dict) -> None:
    atomic_write_text(path, report_markdown(m))
