"""The model card of an exported attributor: YAML front matter in the Hugging Face Hub's convention
(library_name, tags, model-index with the headline metrics), then what it was trained on and how
well it did, each number with its interval."""

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
    head = m["closed"]["raw"]["head"]
    metrics = [
        *_metric("accuracy", "closed-set top-1", head["top1"], head.get("ci", {}).get("top1")),
        *_metric("roc_auc", "closed-set macro AUC", head["macro_auc"], head.get("ci", {}).get("macro_auc")),
    ]
    for kind, r in m.get("open", {}).items():
        if kind != "dual":
            metrics += _metric("roc_auc", f"open-set AUROC ({kind})", r["auroc"], r.get("ci", {}).get("auroc"))
    enc = record["encoder"]
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
    body += [
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
        f"Unseen-generator threshold: log-density {record['unseen_threshold']['log_density_threshold']:.3f} "
        f"(keeps {record['unseen_threshold']['target_tpr']:.0%} of closed validation images).",
        "",
    ]
    return "\n".join(front + body)
