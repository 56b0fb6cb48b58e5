"""The model card of an exported attributor: YAML front matter in the Hugging Face Hub's convention
(library_name, tags, model-index with the headline metrics), then what it was trained on and how
well it did, each number with its interval, and the decisions it makes (calibrated posterior,
prediction sets, unseen p-values) with their guarantee."""

from __future__ import annotations

import json

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.report.render import with_ci


def _metric(kind: str, name: str, value, ci) -> list[str]:
    lines = [f"      - type: {kind}", f"        name: {json.dumps(name)}", f"        value: {value:.4f}"]
    return lines + ([f"        args: {{ci95_low: {ci[0]:.4f}, ci95_high: {ci[1]:.4f}}}"] if ci else [])


def _gradio_version() -> str | None:
    """The installed gradio's version (the Space then runs the one the page was tried with), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return None


def model_card(record: dict, m: dict, cfg: Config) -> str:
    """README.md of an exported attributor: the Hub's front matter (model-index metrics, the Space keys),
    what the model is, how well it did with intervals and chance, and how to use it."""
    return "\n".join(_front_matter(record, m, cfg) + _summary(record, m, cfg) + _use(record, m))


def _card_metrics(m: dict) -> list[str]:
    """The model-index metrics: closed-set top-1 and macro AUC, open-set AUROC, prediction-set coverage."""
    head = m["closed"]["raw"]["head"]
    metrics = [
        *_metric("accuracy", "closed-set top-1", head["top1"], head.get("ci", {}).get("top1")),
        *_metric("roc_auc", "closed-set macro AUC", head["macro_auc"], head.get("ci", {}).get("macro_auc")),
    ]
    for kind, r in m.get("open", {}).items():
        if kind != "dual":
            metrics += _metric("roc_auc", f"open-set AUROC ({kind})", r["auroc"], r.get("ci", {}).get("auroc"))
    sets = m.get("conformal", {}).get("variants", {}).get("raw")
    if sets:
        metrics += _metric(
            "coverage",
            f"prediction-set coverage at {m['conformal']['level']:.0%}",
            sets["coverage"],
            sets.get("ci", {}).get("coverage"),
        )
    return metrics


def _front_matter(record: dict, m: dict, cfg: Config) -> list[str]:
    """The Hub's YAML front matter."""
    metrics = _card_metrics(m)
    # the Space keys (sdk, app_file) let the folder be pushed as a Hugging Face Space unchanged (app.py)
    front = [
        "---",
        f"title: {json.dumps('leakpipe ' + record['result'][:12])}",
        "sdk: gradio",
        *([f"sdk_version: {_gradio_version()}"] if _gradio_version() else []),
        "app_file: app.py",
        "library_name: leakpipe",
        "pipeline_tag: image-classification",
        "tags: [image-forensics, generator-attribution, proto-leaknet, open-set]",
        "model-index:",
        f"  - name: {json.dumps('leakpipe attributor ' + record['result'])}",
        "    results:",
        "      - task: {type: image-classification, name: generator attribution}",
        f"        dataset: {{type: custom, name: {json.dumps(cfg.train.split)}}}",
        "        metrics:",
        *["  " + x for x in metrics],
        "---",
        "",
    ]
    return front


def _summary(record: dict, m: dict, cfg: Config) -> list[str]:
    """What the attributor is and how well it did (the random-VAE warning first, when it applies)."""
    enc = record["encoder"]
    head = m["closed"]["raw"]["head"]
    warn = (
        [
            "> **Random-weight VAE.** The encoder this was trained with has seeded random weights (the demo's "
            "or a test's): the numbers show the pipeline working, not Proto-LeakNet's accuracy.",
            "",
        ]
        if enc.get("random_weights")
        else []
    )
    body = [
        f"# leakpipe attributor `{record['result']}`",
        "",
        *warn,
        "Which generator made an image: a Proto-LeakNet model (Giusti, Guarnera, Battiato, 2025) trained "
        "with leakpipe on latents of a frozen VAE, with an unseen-generator flag.",
        "",
        f"- Generators ({len(record['classes'])}): {', '.join(record['classes'])}.",
        f"- Encoder: `{enc['vae_source']}` (fingerprint `{enc['encoder_fingerprint'][:12]}`), images "
        f"{cfg.preprocess.size} px ({cfg.preprocess.resize} resize, {cfg.preprocess.crop} crop), VAE dtype "
        f"{enc['vae_dtype']}. `leakpipe attribute --model` refuses any other encoder.",
        f"- Model: {cfg.model.backbone}, D = {cfg.model.embed_dim}, "
        f"{cfg.model.prototypes_per_class if cfg.model.prototypes else 'no'} prototypes per class, gating "
        f"{'on' if cfg.model.gating else 'off'}, timesteps {cfg.diffusion.timesteps} ({cfg.diffusion.schedule}).",
        f"- Trained on the train partition of manifest `{cfg.train.split}`"
        + (f", without {', '.join(cfg.train.exclude)}" if cfg.train.exclude else "")
        + ".",
        "",
        "## How well it did (test partition; 95% bootstrap intervals)",
        "",
        "| metric | value | chance |",
        "|---|---:|---:|",
        f"| closed-set top-1 | {with_ci(head, 'top1')} | {head['chance']['top1']:.3f} |",
        f"| closed-set macro AUC | {with_ci(head, 'macro_auc')} | 0.500 |",
    ]
    for kind, r in m.get("open", {}).items():
        if kind != "dual":
            body.append(f"| open-set AUROC, {kind.replace('_', ' ')} | {with_ci(r, 'auroc')} | 0.500 |")
    return body + decision_rows(m)


def _use(record: dict, m: dict) -> list[str]:
    """The notes, then how to attribute with it and serve it."""
    enc = record["encoder"]
    return [
        "",
        *[f"> {n}" for n in m.get("notes", [])],
        "",
        "## Use",
        "",
        "```",
        f"leakpipe attribute --model THIS_FOLDER_OR_HUB_ID --vae {enc['vae_source']} IMAGE...",
        "```",
        "",
        "A web page for it: `leakpipe app --model THIS_FOLDER_OR_HUB_ID` (needs `leakpipe[app]`); pushed "
        "as a Hugging Face Space, the folder's `app.py` serves the same page.",
        "",
        *decision_use(record),
        "",
    ]


def decision_rows(m: dict) -> list[str]:
    """The card's table rows on the decisions: ECE before and after calibration, the prediction sets'
    coverage and size, the unseen flag's false alarms and detections."""
    c, s, u = m.get("calibration"), m.get("conformal"), m.get("unseen_threshold", {})
    if not c or not s:
        return []
    raw, level = s["variants"]["raw"], f"{s['level']:.0%}"
    rows = [
        f"| ECE of the posterior, uncalibrated | {with_ci(m['closed']['raw']['head'], 'ece')} | |",
        f"| ECE of the posterior, {c['method'].replace('_', ' ')} | {with_ci(c['variants']['raw'], 'ece')} | |",
        f"| prediction-set coverage ({s['score']}, guaranteed >= {level}) | {with_ci(raw, 'coverage')} | |",
        f"| mean prediction-set size | {with_ci(raw, 'set_size')} | |",
        f"| unseen flag at p <= {u['alpha']:g}: false alarms on known generators | {with_ci(u, 'false_alarm_rate')} | |",  # noqa: E501
    ]
    if "detection_rate" in u:
        rows.append(
            f"| unseen flag at p <= {u['alpha']:g}: unseen generators detected | {with_ci(u, 'detection_rate')} | |"
        )
    worst = min(
        (v for k, v in s["variants"].items() if k != "raw" and v.get("coverage") is not None),
        key=lambda v: v["coverage"],
        default=None,
    )
    if worst is not None:
        rows.append(f"| prediction-set coverage, worst post-processing step | {with_ci(worst, 'coverage')} | |")
    return rows


def decision_use(record: dict) -> list[str]:
    """What `attribute` decides with this attributor, and the guarantee it states."""
    d, u = record.get("decisions"), record["unseen_threshold"]
    if not d:
        return [f"Unseen-generator threshold: log-density {u['log_density_threshold']:.3f}."]
    t = d["calibration"]["temperature"]
    temp = f"T = {t:.3f}" if isinstance(t, float) else "one T per class, " + ", ".join(f"{x:.2f}" for x in t)
    return [
        f"Each image gets a calibrated posterior ({d['calibration']['method'].replace('_', ' ')}, {temp}, fitted on "
        f"the validation images), a prediction set at {d['conformal']['level']:.0%} (split conformal, "
        f"{d['conformal']['score']}{', Mondrian' if d['conformal']['mondrian'] else ''}) and an unseen-generator "
        f"p-value against {u['n_val']} closed validation images, flagged at p <= {d['alpha']:g}. The set holds the "
        f"true generator with probability at least {d['conformal']['level']:.0%}, and a known generator's image is "
        f"flagged with probability at most {d['alpha']:g}, only for images exchangeable with the validation "
        "images: post-processed images and unseen generators' break it (the table above shows by how much)."
    ]
