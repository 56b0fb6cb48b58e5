"""Ablations over one latent cache (paper Tables 3-5) and the comparison table of runs.

Each ablation is a run name with `--set` overrides on top of the workspace config. Nothing is
encoded: training reads the cache, and an ablation whose training config equals that of a result
already in the run cache (cache/results/) is restored from it, not trained again.
"""
from __future__ import annotations

import json
from pathlib import Path

from leakpipe.pipeline.ledger import graph, runs
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.report.render import fmt as _f, with_ci
from leakpipe.pipeline.config import PROFILES, TRAIN_SECTIONS, Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import embed, encode, score, train

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
    "prototypes-random": ("model.prototype_init=random",),
    "no-prototype-pull": ("train.prototype_pull=0",),
    "select-val-auc": ("train.select=val_auc",),
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
    import re

    from leakpipe.pipeline.manifest import read_manifest

    path = ws.manifest(cfg.train.split)
    if not path.exists():
        raise UserError(f"no manifest {path}: `sweep --logo` holds out each generator of the training split")
    labels = sorted({r["label"] for r in read_manifest(path, check_files=False).rows if r["partition"] == "train"})
    if len(labels) < 3:
        raise UserError(f"{path} has {len(labels)} generators with train rows; leaving one out needs at least 3 "
                        "(2 to train on and 1 to hold out)")
    plan = {f"logo-{re.sub(r'[^A-Za-z0-9._-]', '_', g)}"[:100]: (f"train.exclude={json.dumps([g])}",) for g in labels}
    if len(plan) < len(labels):
        raise UserError(f"{path}: generator names {', '.join(labels)} give clashing run names; rename them")
    return plan


def run(ws: Workspace, config_for, plan: dict[str, tuple[str, ...]], log=print) -> tuple[list[str], dict]:
    """Encode what is missing, then train, embed and score each entry of `plan` ({run name: overrides})
    under its run name. Returns (entries done, {entry that failed: why}).

    `config_for(overrides)` gives the workspace config with the overrides applied. An entry whose
    training config and cache equal those of a result already in the run cache (trained under any
    name, such as `default`) is restored from it, not trained again.
    """
    done, failed = [], {}
    for name, overrides in plan.items():
        cfg: Config = config_for(overrides)
        log(f"sweep {name}: {' '.join(overrides) or 'workspace config'}")
        splits = [s for _, s in graph.score_splits(cfg) if ws.manifest(s).exists()]
        try:
            for split in dict.fromkeys([cfg.train.split, *splits]):  # an entry may change the encoder
                if not graph.latents(ws, cfg, split).check().up_to_date:
                    log(encode.run(ws, split, cfg, log=log).summary())
            log(train.run(ws, cfg, name, log=log).summary())
            embed.run(ws, cfg, name, log=log, splits=splits)
            score.run(ws, cfg, name, log=log)
            done.append(name)
        except UserError as exc:  # one entry that cannot run (a VAE not at hand) does not stop the others
            failed[name] = str(exc)
            log(f"sweep {name}: FAILED: {exc}")
    if failed and not done:
        raise UserError("every sweep entry failed:\n" + "\n".join(f"  {k}: {v}" for k, v in failed.items()))
    return done, failed


def logo_table(ws: Workspace, names: list[str]) -> str:
    """Open-set AUROC with its 95% interval of each held-out generator, from each LOGO run's metrics."""
    from leakpipe.pipeline.report.evaluate import HELD_OUT_NOTE

    lines = ["# Leave-one-generator-out open set", "", HELD_OUT_NOTE + ".", "",
             "| held-out generator | run | result | n held out | n closed | AUROC, gating off | AUROC, gating on |",
             "|---|---|---|---:|---:|---:|---:|"]
    aurocs = []
    for name in names:
        out = runs.pointed(ws, name)
        m = json.loads((out / "metrics.json").read_text())
        h, n_closed = m.get("held_out", {}), m["closed"]["raw"]["head"]["n"]
        for g, v in h.get("gating_off", {}).items():
            aurocs.append(v["auroc"])
            lines.append(f"| {g} | {name} | {out.name} | {v['n']} | {n_closed} | {with_ci(v, 'auroc')} | "
                         f"{with_ci(h['gating_on'].get(g, {}), 'auroc')} |")
        if not h.get("gating_off"):
            lines.append(f"| (none: its held-out generator has no test rows) | {name} | {out.name} | 0 | {n_closed} | | |")
    if aurocs:
        lines += ["", f"Mean AUROC (gating off) over {len(aurocs)} held-out generators: {sum(aurocs) / len(aurocs):.3f} "
                  "(chance 0.500). Each interval resamples that generator's and the closed test images."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- compare
def _differences(cfgs: dict[str, dict]) -> dict[str, str]:
    """Per run, the training settings in which it differs from the first run (the baseline)."""
    base = next(iter(cfgs.values()))
    keys = sorted({f"{s}.{k}" for c in cfgs.values() for s in TRAIN_SECTIONS for k in c.get(s, {})})
    return {run: ", ".join(f"{k}={json.dumps(_get(c, k))}" for k in keys if _get(c, k) != _get(base, k))
            for run, c in cfgs.items()}


def _get(cfg: dict, key: str):
    section, name = key.split(".", 1)
    return cfg.get(section, {}).get(name)


def compare(ws: Workspace, names: list[str], cfg: Config | None = None) -> str:
    """A markdown table of top-1 and macro AUC (head, with their 95% intervals, and Mahalanobis), worst
    post-processing step and open-set AUROC for each run, with its settings that differ from the first
    run's and the result it points at; then each run against the first on the same test images (paired
    bootstrap). Raises naming every run that has not been scored."""
    groups = {n: runs.seed_group(ws, n) for n in names}
    names = [m for n in names for m in (groups[n] or [n])]  # a seed group is compared through its members
    results = {r: runs.pointed(ws, r) for r in names}
    missing = [r for r, out in results.items() if out is None or not (out / "metrics.json").exists()]
    if missing:
        raise UserError(f"not scored: {', '.join(missing)}; run `leakpipe score --run RUN` for each")
    metrics = {r: json.loads((out / "metrics.json").read_text()) for r, out in results.items()}
    cfgs = {r: json.loads((out / "config.json").read_text()) for r, out in results.items()}
    diffs = _differences(cfgs)
    lines = ["| run | result | differs in | top-1 | macro AUC | Mahalanobis top-1 | worst post-proc. top-1 | "
             "open AUROC (gating off / on) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in names:
        m = metrics[r]
        raw = m["closed"]["raw"]
        pp = [v["head"]["top1"] for k, v in m["closed"].items() if k != "raw"]
        o = m.get("open", {})
        lines.append(f"| {r} | {results[r].name} | {diffs[r] or '-'} | {with_ci(raw['head'], 'top1')} | "
                     f"{with_ci(raw['head'], 'macro_auc')} | {_f(raw['mahalanobis']['top1'])} | "
                     f"{_f(min(pp)) if pp else 'n/a'} | "
                     f"{with_ci(o.get('gating_off', {}), 'auroc')} / {with_ci(o.get('gating_on', {}), 'auroc')} |")
    if len(names) > 1 and cfg is not None and cfg.score.bootstrap:
        lines += ["", f"Paired against `{names[0]}` on the same test images ({cfg.score.bootstrap} paired "
                  "bootstrap resamples; p: two-sided; open AUROC with gating off, closed test vs open):", "",
                  "| run | top-1 difference | p | macro AUC difference | p | open AUROC difference | p |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        base = _predictions(ws, results[names[0]], cfg)
        base_open = _open_scores(results[names[0]])
        for r in names[1:]:
            d = paired(_predictions(ws, results[r], cfg), base, cfg)
            o = paired_auroc(_open_scores(results[r]), base_open, cfg)
            lines.append(f"| {r} | {_signed(d['top1'])} | {_f(d['top1']['p'])} | {_signed(d['macro_auc'])} | "
                         f"{_f(d['macro_auc']['p'])} | {_signed(o) if o else 'n/a'} | {_f(o['p']) if o else 'n/a'} |")
    for group, members in groups.items():
        if members and cfg is not None:
            lines += ["", seeds_table(ws, group, members, cfg).rstrip()]
    return "\n".join(lines) + "\n"


def seeds_table(ws: Workspace, group: str, members: list[str], cfg: Config) -> str:
    """Mean +- sd across the seeds of a group (training variation) and the pooled 95% interval of the
    seed-averaged metric (the seeds' predictions on the same bootstrap resamples of the same test
    images: test-sampling variation), for top-1 and macro AUC."""
    import numpy as np

    from leakpipe.pipeline.math import bootstrap

    preds = [_predictions(ws, runs.pointed(ws, r), cfg) for r in members]
    rows = sorted(set.intersection(*(set(p) for p in preds)))
    y = np.array([preds[0][r][0] for r in rows])
    probs = [np.stack([p[r][1] for r in rows]) for p in preds]
    w = bootstrap.weights(len(rows), max(cfg.score.bootstrap, 1), cfg.score.seed)
    per_seed = {"top1": [float((p.argmax(1) == y).mean()) for p in probs],
                "macro AUC": [float(bootstrap.macro_auc(p, y, np.ones((1, len(rows))))[0]) for p in probs]}
    pooled = {"top1": np.mean([bootstrap.top1(p.argmax(1) == y, w) for p in probs], axis=0),
              "macro AUC": np.mean([bootstrap.macro_auc(p, y, w) for p in probs], axis=0)}
    lines = [f"| {group}: {len(members)} seeds ({', '.join(members)}) | mean +- sd across seeds | pooled 95% interval |",
             "|---|---:|---:|"]
    for k, v in per_seed.items():
        lo, hi = bootstrap.interval(pooled[k])
        lines.append(f"| {k} | {np.mean(v):.3f} +- {np.std(v, ddof=1):.3f} | [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines) + "\n"


def _open_scores(result: Path, setting: str = "gating_off") -> dict | None:
    """{("closed" | "open", manifest row): KDE log-density} a scored result saved, or None."""
    from leakpipe.pipeline.engine.trained import load_checked_scores

    t = load_checked_scores(result)
    if t is None:
        return None
    return {**{("closed", int(r)): float(s) for r, s in zip(t["closed_rows"], t[f"{setting}.closed"])},
            **{("open", int(r)): float(s) for r, s in zip(t["open_rows"], t[f"{setting}.open"])}}


def paired_auroc(a: dict | None, b: dict | None, cfg: Config) -> dict | None:
    """Open-set AUROC of run a minus run b on the closed and open rows both scored, on the same
    bootstrap resamples: difference, 95% interval, two-sided p. None if either has no open scores."""
    import numpy as np

    from leakpipe.pipeline.math import bootstrap
    from leakpipe.pipeline.math.metrics import roc_auc

    if not a or not b:
        return None
    keys = sorted(a.keys() & b.keys())
    positive = np.array([k[0] == "closed" for k in keys])
    sa, sb = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    w = bootstrap.weights(len(keys), cfg.score.bootstrap, cfg.score.seed)
    return bootstrap.paired(roc_auc(sa, positive) - roc_auc(sb, positive),
                            bootstrap.auroc(sa, positive, w) - bootstrap.auroc(sb, positive, w))


def _signed(d: dict) -> str:
    return f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _predictions(ws: Workspace, result: Path, cfg: Config) -> dict:
    """{manifest row: (label index, posterior)} of a result's closed test rows."""
    import numpy as np

    from leakpipe.pipeline.engine.trained import load_split
    from leakpipe.pipeline.math.metrics import softmax

    split, attrs = load_split(ws, result, cfg.score.closed)
    test = split.select(split.partition == "test")
    probs = softmax(test.arrays["logits"].astype(np.float64))
    return {int(r): (attrs["classes"].index(lab), probs[k]) for k, (r, lab) in enumerate(zip(test.ids["row"], test.labels))}


def paired(a: dict, b: dict, cfg: Config) -> dict:
    """Run a minus run b on the test rows both scored: top-1 and macro AUC differences with their
    paired-bootstrap intervals and two-sided p-values (the same resamples for both runs)."""
    import numpy as np

    from leakpipe.pipeline.math import bootstrap
    from leakpipe.pipeline.math.metrics import macro_auc
    from leakpipe.pipeline.report.baselines import paired_difference

    rows = sorted(a.keys() & b.keys())
    y = np.array([a[r][0] for r in rows])
    pa, pb = (np.stack([p[r][1] for r in rows]) for p in (a, b))
    w = bootstrap.weights(len(rows), cfg.score.bootstrap, cfg.score.seed)
    return {"top1": paired_difference(pa.argmax(1) == y, pb.argmax(1) == y, w),
            "macro_auc": bootstrap.paired(macro_auc(pa, y, pa.shape[1]) - macro_auc(pb, y, pb.shape[1]),
                                          bootstrap.macro_auc(pa, y, w) - bootstrap.macro_auc(pb, y, w))}


def write_compare(path: Path, table: str) -> None:
    """Write the table unless the file already holds it (a rerun that changes nothing touches nothing)."""
    path = Path(path)
    if not (path.exists() and path.read_text() == table):
        atomic_write_text(path, table)
