"""Ablations over one latent cache (paper Tables 3-5) and the comparison table of runs.

Each ablation is a run name with `--set` overrides on top of the workspace config. Nothing is
encoded: training reads the cache, and an ablation whose training config equals that of a result
already in the run cache (cache/results/) is restored from it, not trained again.
"""

from __future__ import annotations

import json
import re

from leakpipe.pipeline.config import PROFILES, Config
from leakpipe.pipeline.engine.vae import VaeError
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.report.scored import load_metrics
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.report.evaluate import HELD_OUT_NOTE
from leakpipe.pipeline.report.render import with_ci
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph
from leakpipe.workflows.pipeline import through_score

ABLATIONS: dict[str, tuple[str, ...]] = {
    # Table 3: components
    "full": (),
    "no-prototypes": ("model.prototypes=false",),
    "no-gating": ("model.gating=false",),
    "neither": ("model.prototypes=false", "model.gating=false"),
    "M2": ("model.prototypes_per_class=2",),
    "M4": ("model.prototypes_per_class=4",),
    "M6": ("model.prototypes_per_class=6",),
    # Table 4: backbones
    "resnet50": ("model.backbone=resnet50",),
    "resnet101": ("model.backbone=resnet101",),
    "efficientnet_b4": ("model.backbone=efficientnet_b4",),
    "vit_b_16": ("model.backbone=vit_b_16",),
    # Table 3: encoders (the sweep encodes their caches first); SDXL's VAE has scaling factor 0.13025
    "sdxl-vae": ("vae.source=stabilityai/sdxl-vae", "vae.subfolder=", "latent.scale=0.13025"),
    "pixels": ("vae.source=pixels",),  # the authors' latent mode off
    # the authors' released code's defaults and the paper as printed (config.PROFILES), on top of the
    # workspace config
    "authors-code": PROFILES["authors-code"],
    "paper": PROFILES["paper"],
    # leakpipe's training recipe (benchmarks/recipe.py), one piece at a time back to the paper's setting
    "stem-imagenet": ("model.stem=imagenet",),
    "lr-constant": ("train.lr_schedule=constant", "train.warmup_epochs=0"),
    "no-ema": ("train.ema_half_life=0",),
    "no-label-smoothing": ("train.label_smoothing=0",),
    "prototypes-kmeans": ("model.prototype_init=kmeans",),
    "prototype-pull": ("train.prototype_pull=0.1",),  # a candidate the recipe leaves out
    "select-val-auc": ("train.select=val_auc",),
    "no-dct-readout": ("model.dct_readout=none",),  # the readout then reads z_t alone
    "no-backbone-dropout": ("train.backbone_dropout=0",),
    "prototype-std-0.5": ("model.prototype_std=0.5",),
    "dct-stats-per-channel": ("features.dct_stats=per_channel",),
    "no-latent-readout": ("model.latent_readout=none",),
    "latent-stats-per-channel": ("features.latent_stats=per_channel",),
    # the paper's comparator (Eq. 13 on the training rows) beside the default's: the training is restored
    "maha-eq13": ("score.maha_shared=0", "score.maha_rows=train"),
    # Table 5: timesteps, schedules, DCT map
    "T0": ("diffusion.timesteps=0",),
    "T0-5": ("diffusion.timesteps=0,5",),
    "T0-10-20": ("diffusion.timesteps=0,10,20",),
    "T0-25-50": ("diffusion.timesteps=0,25,50",),
    "linear": ("diffusion.schedule=linear",),
    "scaled-linear": ("diffusion.schedule=scaled_linear",),
    "dct-lowpass": ("features.dct_map=lowpass",),
}


def select(names: str | None) -> dict[str, tuple[str, ...]]:
    """{ablation: overrides} of the named ablations, or of all of them."""
    if not names:
        return dict(ABLATIONS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in ABLATIONS]
    if unknown:
        raise UserError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}")
    return {n: ABLATIONS[n] for n in chosen}


def logo(ws: Workspace, cfg: Config) -> dict[str, tuple[str, ...]]:
    """The leave-one-generator-out sweep: {run name: overrides}, one run per generator of the closed
    manifest's train partition, trained without it (`train.exclude`)."""
    path = ws.manifest(cfg.train.split)
    if not path.exists():
        raise UserError(f"no manifest {path}: `sweep --logo` holds out each generator of the training split")
    labels = sorted({r["label"] for r in read_manifest(path, check_files=False).rows if r["partition"] == "train"})
    if len(labels) < 3:
        raise UserError(
            f"{path} has {len(labels)} generators with train rows; leaving one out needs at least 3 "
            "(2 to train on and 1 to hold out)"
        )
    plan: dict[str, tuple[str, ...]] = {
        f"logo-{re.sub(r'[^A-Za-z0-9._-]', '_', g)}"[:100]: (f"train.exclude={json.dumps([g])}",) for g in labels
    }
    if len(plan) < len(labels):
        raise UserError(f"{path}: generator names {', '.join(labels)} give clashing run names; rename them")
    return plan


def run(ws: Workspace, config_for, plan: dict[str, tuple[str, ...]], log=print) -> tuple[list[str], dict, dict]:
    """Encode what is missing, then train, embed and score each entry of `plan` ({run name: overrides})
    under its run name. Returns (entries done, {entry not run here: why}, {entry that failed: why}).

    `config_for(overrides)` gives the workspace config with the overrides applied. An entry whose
    training config and cache equal those of a result already in the run cache (trained under any
    name, such as `default`) is restored from it, not trained again. An entry whose encoder is not at
    hand (a Hub VAE that is not cached, offline) is not run, and says why; the others still run.
    """
    done, skipped, failed = [], {}, {}
    for name, overrides in plan.items():
        log(f"sweep {name}: {' '.join(overrides) or 'workspace config'}")
        try:
            g = graph(ws, config_for(overrides))
            for line in through_score(g, name, log):
                log(line)
            done.append(name)
        except VaeError as exc:  # its encoder cannot be had here: not run, the sweep goes on
            skipped[name] = str(exc)
            log(f"sweep {name}: NOT RUN: {exc}")
        except UserError as exc:  # one entry that cannot run does not stop the others
            failed[name] = str(exc)
            log(f"sweep {name}: FAILED: {exc}")
    if (failed or skipped) and not done:
        raise UserError("no sweep entry ran:\n" + "\n".join(f"  {k}: {v}" for k, v in {**skipped, **failed}.items()))
    return done, skipped, failed


def logo_table(ws: Workspace, names: list[str]) -> str:
    """Open-set AUROC with its 95% interval of each held-out generator, from each LOGO run's metrics."""
    lines = [
        "# Leave-one-generator-out open set",
        "",
        HELD_OUT_NOTE + ".",
        "",
        "| held-out generator | run | result | n held out | n closed | AUROC, gating off | AUROC, gating on |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    aurocs = []
    for name in names:
        out = runs.scored_result(ws, name)
        m = load_metrics(out, name)
        h, n_closed = m.get("held_out", {}), m["closed"]["raw"]["head"]["n"]
        for g, v in h.get("gating_off", {}).items():
            aurocs.append(v["auroc"])
            lines.append(
                f"| {g} | {name} | {out.name} | {v['n']} | {n_closed} | {with_ci(v, 'auroc')} | "
                f"{with_ci(h['gating_on'].get(g, {}), 'auroc')} |"
            )
        if not h.get("gating_off"):
            lines.append(
                f"| (none: its held-out generator has no test rows) | {name} | {out.name} | 0 | {n_closed} | | |"
            )
    if aurocs:
        lines += [
            "",
            f"Mean AUROC (gating off) over {len(aurocs)} held-out generators: {sum(aurocs) / len(aurocs):.3f} "
            "(chance 0.500). Each interval resamples that generator's and the closed test images.",
        ]
    return "\n".join(lines) + "\n"
