"""Stage three: evaluate a trained run from its saved embeddings (metrics.json, report.md, figures)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine.trained import load_split
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import graph, locks, runs
from leakpipe.pipeline.math.prototypes import usage as prototype_usage
from leakpipe.pipeline.store.atomic import atomic_write_json, sweep_orphans
from leakpipe.pipeline.store.locking import exclusive
from leakpipe.pipeline.workspace import Workspace

RANDOM_VAE_NOTE = ("This run's VAE has seeded random weights (the demo's or a test's), not a pretrained "
                   "encoder: the numbers show the pipeline working, not Proto-LeakNet's accuracy.")


def _ci(r: dict, key: str) -> str:
    """'0.758 [0.702, 0.811]': a number with its 95% interval when there is one."""
    lo, hi = r.get("ci", {}).get(key, [None, None])
    return f"{r[key]:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


@dataclass
class ScoreResult:
    run: str
    run_dir: Path
    metrics: dict
    up_to_date: bool = False
    seconds: float = 0.0
    latents: str = ""  # "VAE ..., store ..." of the closed split the result was scored on

    def summary(self) -> str:
        m, head = self.metrics, f"score {self.run}: "
        raw = m["closed"]["raw"]
        h = raw["head"]
        lines = [head + ("up to date, nothing to do" if self.up_to_date else f"done in {self.seconds:.0f} s"),
                 f"  closed test: top-1 {_ci(h, 'top1')} (chance {h['chance']['top1']:.3f}), macro AUC "
                 f"{_ci(h, 'macro_auc')} (Mahalanobis {raw['mahalanobis']['top1']:.3f} / "
                 f"{raw['mahalanobis']['macro_auc']:.3f})"]
        for variant, r in m["closed"].items():
            if variant != "raw":
                lines.append(f"  {variant}: top-1 {r['head']['top1']:.3f}, macro AUC {r['head']['macro_auc']:.3f}")
        for kind, r in m.get("open", {}).items():
            lines.append(f"  open set, {kind}: AUROC {_ci(r, 'auroc')}, EER {_ci(r, 'eer')}, OVL {_ci(r, 'ovl')}")
        for g, r in m.get("held_out", {}).get("gating_off", {}).items():
            lines.append(f"  held-out generator {g} (never trained on) vs closed test: AUROC {_ci(r, 'auroc')}")
        lines += [f"  NOTE: {n}" for n in m.get("notes", []) if "includes chance" in n or n.startswith("Leakage")]
        if self.latents:
            lines.append(f"  on {self.latents}")
        lines.append(f"  report: {self.run_dir / 'report.md'} (cache/runs/{self.run} -> results/{self.run_dir.name})")
        return "\n".join(lines)


def _available(ws: Workspace, run_dir: Path, cfg: Config) -> tuple[list[str], list[str]]:
    """(splits whose embeddings are up to date, notes on the others); the closed split must be."""
    closed = cfg.score.closed
    if not ws.manifest(closed).exists():
        raise UserError(f"no manifest {ws.manifest(closed)}: score needs the closed split")
    have, notes = [], []
    for role, split in graph.score_splits(cfg):
        verdict = graph.embedding(ws, run_dir, split, cfg).check(deep=True) if ws.manifest(split).exists() else None
        if verdict is not None and verdict.up_to_date:
            have.append(split)
        elif role == "closed":
            raise UserError(f"the embeddings of {split!r} under {run_dir} are not up to date "
                            f"({'; '.join(verdict.reasons) if verdict else 'no manifest'}); run "
                            f"`leakpipe embed --run RUN`, or `leakpipe score`, which embeds first")
        elif verdict is None:
            notes.append(f"{role} split {split!r} is not in manifests/; build it and run "
                         f"`leakpipe encode --split {split}` to include it")
        elif verdict.blocked:
            notes.append(f"{role} split {split!r} is left out: {'; '.join(verdict.reasons)}; run "
                         f"`{verdict.blocked[0]}` to include it")
        else:
            notes.append(f"{role} split {split!r} has stale embeddings ({'; '.join(verdict.reasons)}); "
                         "run `leakpipe score` to embed it")
    return have, notes


def evaluate(ws: Workspace, run_dir: Path, cfg: Config, have: list[str], notes: list[str]) -> tuple[dict, dict]:
    """(metrics, figure data)."""
    from leakpipe.pipeline.report import evaluate as ev
    from leakpipe.pipeline.engine.vae import is_random

    run_cfg = graph.run_config(run_dir)
    if is_random(run_cfg.vae, ws.root):
        notes = [RANDOM_VAE_NOTE, *notes]
    def split_of(name):  # with each row's file hash, for the leakage audit
        return load_split(ws, run_dir, name, graph.latents(ws, graph.run_config(run_dir, cfg), name).file_hashes)

    closed, attrs = split_of(cfg.score.closed)
    classes, held_out = attrs["classes"], run_cfg.train.exclude
    trained_on = ~np.isin(closed.labels, held_out)  # a held-out generator's rows are never trained on
    by_part = {p: closed.select((closed.partition == p) & trained_on) for p in ("train", "val", "test")}
    seen, leakage = ev.seen_in_training(by_part["train"], by_part["val"]), {}

    def clean(s, name):
        """The rows the model never saw in any form; the others are counted and left out."""
        mask, leakage[name] = ev.leaked(s, seen)
        return s.select(~mask)

    tests = {"raw": clean(by_part["test"], "raw")}
    for name in (s for s in cfg.score.postprocessed if s in have):
        pp, _ = split_of(name)
        clash = sorted(set(pp.variant) & tests.keys())
        if clash:
            raise UserError(f"{ws.manifest(name)}: variant(s) {', '.join(clash)} also come from another "
                            "scored manifest; give each post-processing step its own variant name")
        pp = pp.select(~np.isin(pp.labels, held_out))
        tests.update({v: clean(pp.select(pp.variant == v), v) for v in sorted(set(pp.variant))})
    if len(tests["raw"]) == 0:
        raise UserError(f"{ws.manifest(cfg.score.closed)} has no valid test rows to score"
                        + (f" ({leakage['raw']['rows']} test rows were seen in training and left out)"
                           if leakage["raw"]["rows"] else ""))
    try:
        m = {"result": run_dir.name, "classes": classes, "timesteps": attrs["timesteps"], "notes": notes,
             "head": "prototypes" if run_cfg.model.prototypes else "linear",
             "closed": ev.closed_set(by_part["train"], tests, classes, cfg.score.maha_floor, cfg.score.bootstrap,
                                     cfg.score.seed),
             "attention": ev.attention_by_class(tests["raw"], classes),
             "invalid_rows": {cfg.score.closed: closed.n_invalid}}
    except ValueError as exc:
        raise UserError(f"run {run_dir.name}: {exc}") from None
    figs = {"test": tests["raw"], "classes": classes, "open": None}
    kind = cfg.score.kde_embedding
    key = ev.SETTING_OF[kind]
    if held_out:
        left_out = clean(closed.select((closed.partition == "test") & ~trained_on), "held_out")
        m["held_out"] = ev.held_out(by_part["train"], tests["raw"], left_out, cfg.score)
    if cfg.score.open in have:
        opened = clean(split_of(cfg.score.open)[0], cfg.score.open)
        correct = tests["raw"].arrays["logits"].argmax(1) == ev.label_index(tests["raw"], classes)
        res = ev.open_set(by_part["train"], tests["raw"], opened, cfg.score, correct)
        m["open"], kde = res.metrics, res.kdes[key]
        figs.update(open=opened, kde_scores=res.scores)
    else:
        m["open_missing"] = next((n for n in notes if n.startswith("open")), "no open split")
        kde = ev.kde_for(by_part["train"], kind, cfg.score)
    try:
        unseen = ev.calibrate_unseen(kde, by_part["val"], kind, cfg.score.unseen_tpr)
    except ValueError as exc:
        raise UserError(f"{ws.manifest(cfg.score.closed)}: {exc}") from None
    if "kde_scores" in figs:
        s = figs["kde_scores"][key]
        unseen["open_flagged"] = float((s["open"] < unseen["log_density_threshold"]).mean())
        unseen["closed_test_passed"] = float((s["closed"] >= unseen["log_density_threshold"]).mean())
    m["unseen_threshold"] = unseen
    if cfg.score.baselines:
        from leakpipe.pipeline.report import baselines

        m["baselines"] = _baselines(ws, run_dir, cfg, by_part["train"], tests["raw"], classes)
        m["notes"] = [*m["notes"], *baselines.notes(m["baselines"])]
    m["leakage"] = leakage
    leaks = {k: v["rows"] for k, v in leakage.items() if v["rows"]}
    if leaks:
        m["notes"] = [*m["notes"], "Leakage audit: rows the model saw in training in some form (the same file, "
                      "group or source image) were left out of every metric: " +
                      ", ".join(f"{k}: {n}" for k, n in leaks.items()) + "."]
    m["notes"] = [*m["notes"], *ev.chance_notes(m)]
    prototypes = _prototypes(run_dir)
    if prototypes is not None and len(by_part["train"]):
        tr = by_part["train"]
        m["prototypes"] = prototype_usage(tr.arrays["h_bar"], tr.arrays["w"], ev.label_index(tr, classes), prototypes)
    figs.update(_explanation_data(ws, run_dir, cfg, by_part["train"], tests["raw"], classes, prototypes))
    return m, figs


def _prototypes(result: Path) -> np.ndarray | None:
    """The trained prototypes (C, M, D), read from the checked model file; None for the linear head."""
    from leakpipe.pipeline.engine.trained import load_checked

    tensors, _ = load_checked(result, "model.safetensors")
    return tensors["prototypes"].numpy() if "prototypes" in tensors else None


FIG3_ROWS = 2000  # closed test rows drawn in the per-stage maps (evenly spaced), enough for a 2-D map
GALLERY_K = 3  # training images shown per prototype


def _explanation_data(ws: Workspace, run_dir: Path, cfg: Config, train, test, classes: list[str],
                      prototypes: np.ndarray | None) -> dict:
    """Data of the explanation figures: per-stage features of the closed test rows (Fig. 3) and, with
    prototypes, the training images each one wins, nearest first (gallery)."""
    from leakpipe.pipeline.engine.trained import stage_features
    from leakpipe.pipeline.engine.vae import resolve_device
    from leakpipe.pipeline.manifest import read_manifest
    from leakpipe.pipeline.report.evaluate import label_index
    from leakpipe.pipeline.report.explain_figures import nearest_to_prototypes, prototype_thumbnails

    pick = np.unique(np.linspace(0, len(test) - 1, min(len(test), FIG3_ROWS)).astype(int))
    lat = graph.latents(ws, graph.run_config(run_dir, cfg), cfg.score.closed)
    out = {"stages": stage_features(run_dir, lat.store, test.ids["row"][pick], resolve_device(cfg.compute.device),
                                    cfg.compute.eval_batch_size),
           "stage_labels": label_index(test, classes)[pick]}
    if prototypes is not None and len(train):
        near = nearest_to_prototypes(train.arrays["h_bar"], train.arrays["w"], label_index(train, classes),
                                     prototypes, GALLERY_K)
        manifest = read_manifest(ws.manifest(cfg.score.closed), check_files=False)
        out["gallery"] = prototype_thumbnails(near, lambda i: manifest.abspath(int(train.ids["row"][i])),
                                              cfg.preprocess)
    return out


def _baselines(ws: Workspace, run_dir: Path, cfg: Config, train, test, classes: list[str]) -> dict:
    """Chance, the forensic pixel baseline and a linear probe on z0, fitted on the closed training rows and
    scored, paired with the model, on the same (leakage-audited) test rows."""
    from leakpipe.pipeline.engine.images import BadImage
    from leakpipe.pipeline.manifest import read_manifest
    from leakpipe.pipeline.math import bootstrap
    from leakpipe.pipeline.report import baselines as bl
    from leakpipe.pipeline.report.evaluate import label_index
    from leakpipe.pipeline.store import latent_store

    ytr, yte = label_index(train, classes), label_index(test, classes)
    m = read_manifest(ws.manifest(cfg.score.closed), check_files=False)
    store = latent_store.open_store(graph.latents(ws, graph.run_config(run_dir, cfg), cfg.score.closed).store)
    try:
        pixels = [bl.forensic_matrix([m.abspath(int(i)) for i in s.ids["row"]], cfg.score.baseline_max_side,
                                     cfg.preprocess.max_pixels) for s in (train, test)]
        z0 = [latent_store.read_rows(store, s.ids["row"])["mean"].reshape(len(s), -1) for s in (train, test)]
    except (OSError, BadImage, latent_store.DamagedRows) as exc:
        return {"chance": 1 / len(classes), "skipped": f"baselines left out: {exc}"}
    w = bootstrap.weights(len(yte), cfg.score.bootstrap, cfg.score.seed, test.groups) if cfg.score.bootstrap else None
    right = {"head": test.arrays["logits"].argmax(1) == yte,
             "forensic": bl.probe(pixels[0], ytr, pixels[1]) == yte, "z0_probe": bl.probe(z0[0], ytr, z0[1]) == yte}
    out = {"chance": 1 / len(classes), "forensic_max_side": cfg.score.baseline_max_side,
           "z0_is_pixels": graph.run_config(run_dir).vae.source == "pixels",
           **{k: bl.scored(v, w) for k, v in right.items()}}
    if w is not None:
        for a, b in (("head", "forensic"), ("head", "z0_probe"), ("z0_probe", "forensic")):
            out[f"{a}_minus_{b}"] = bl.paired_difference(right[a], right[b], w)
    return out


def write_outputs(run_dir: Path, m: dict, figs: dict, cfg: Config) -> list[Path]:
    from leakpipe.pipeline.math import metrics
    from leakpipe.pipeline.report import render as report
    from leakpipe.pipeline.report.evaluate import label_index

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    test, classes = figs["test"], figs["classes"]
    y = label_index(test, classes)
    report.confusion_figure(m["closed"]["raw"]["head"]["confusion"], classes,
                            f"confusion, closed test (raw), {m['head']} head", fig_dir / "confusion.png")
    report.roc_figure(metrics.softmax(test.arrays["logits"].astype(np.float64)), y, classes, "one-vs-rest ROC, closed test (raw)", fig_dir / "roc.png")
    opened = figs["open"].embedding("h_bar") if figs["open"] is not None else np.zeros((0, test.arrays["h_bar"].shape[1]))
    report.embedding_figure(test.embedding("h_bar"), y, classes, opened, cfg.score.embedding_map, cfg.score.seed,
                            fig_dir / "embedding_map.png")
    report.postprocessing_figure(m["closed"], len(classes), fig_dir / "postprocessing.png")
    report.attention_figure(m["attention"], classes, m["timesteps"], fig_dir / "attention.png")
    from leakpipe.pipeline.report import explain_figures as xf

    xf.stage_maps_figure(figs["stages"], figs["stage_labels"], classes, fig_dir / "stage_maps.png")
    xf.class_step_figure(m["closed"], classes, fig_dir / "class_by_step.png")
    names = [f for f in report.FIGURES if f not in ("kde_scores.png", "prototype_gallery.png")]
    if "gallery" in figs:
        xf.gallery_figure(figs["gallery"], classes, fig_dir / "prototype_gallery.png")
        names.append("prototype_gallery.png")
    if "kde_scores" in figs:
        report.kde_figure(figs["kde_scores"], m["open"], m["unseen_threshold"], fig_dir / "kde_scores.png")
        names.append("kde_scores.png")
    for stale in set(p.name for p in fig_dir.glob("*.png")) - set(names):
        (fig_dir / stale).unlink()
    m["figures"] = sorted(names)
    if cfg.log.tensorboard:
        from leakpipe.pipeline.engine import tboard
        from leakpipe.pipeline.engine.trained import load_checked

        board = tboard.writer(run_dir / "tensorboard" / "score", fresh=True)
        opened = figs["open"]
        protos = load_checked(run_dir, "model.safetensors")[0].get("prototypes")
        tboard.score(board, metrics.softmax(test.arrays["logits"].astype(np.float64)), y, classes,
                     test.arrays["h_bar"], opened.arrays["h_bar"] if opened is not None else np.zeros((0, 1)),
                     opened.labels if opened is not None else [], None if protos is None else protos.numpy(),
                     fig_dir / "roc.png")
        board.close()
    atomic_write_json(run_dir / "metrics.json", m)
    report.write_report(run_dir / "report.md", m)
    files = [run_dir / "metrics.json", run_dir / "report.md", *(fig_dir / n for n in m["figures"])]
    if "kde_scores" in figs:  # for paired open-set comparisons between runs (`leakpipe compare`)
        import torch

        from leakpipe.pipeline.store.checkpoint import save_tensors

        rows = {"closed_rows": test.ids["row"], "open_rows": figs["open"].ids["row"]}
        scores = {f"{k}.{side}": v[side] for k, v in figs["kde_scores"].items() for side in ("closed", "open")}
        save_tensors(run_dir / "open_scores.safetensors",
                     {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64 if "." in k else np.int64))
                      for k, v in {**rows, **scores}.items()})
        files.append(run_dir / "open_scores.safetensors")
    else:
        (run_dir / "open_scores.safetensors").unlink(missing_ok=True)
    return files


def run(ws: Workspace, cfg: Config, run: str = "default", log=print) -> ScoreResult:
    """Score the result run `run` points at from its embeddings (the embed stage runs first), or do
    nothing if its metrics are up to date."""
    out = runs.pointed(ws, run)
    if out is None or locks.read_lock(out / "train.lock.json") is None:
        raise UserError(f"run {run!r} has no trained result; run `leakpipe train --run {run}` first")
    graph.trained_lock(out, deep=True)  # a damaged model is refused, never scored
    trained = graph.training(ws, cfg, run).check()
    if not trained.up_to_date:
        log(f"score {run}: note: scoring the result {run!r} points at ({out.name}); `leakpipe train --run "
            f"{run}` would not keep it: {'; '.join(trained.reasons)}")
    with exclusive(out / ".writer.lock", f"result {out.name}"):
        sweep_orphans(out)  # a killed writer's leftovers; none can be alive under this lock
        have, notes = _available(ws, out, cfg)
        plan = graph.scoring(ws, out, cfg)
        verdict = plan.check(deep=True)
        if verdict.up_to_date:
            return ScoreResult(run, out, json.loads((out / "metrics.json").read_text()), up_to_date=True,
                               latents=_latents_of(ws, out, cfg))
        log(f"score {run}: scoring because " + "; ".join(verdict.reasons))
        if cfg.score.dual:
            from leakpipe.pipeline.report.evaluate import DUAL_WARNING

            log(f"WARNING: {DUAL_WARNING}.")
        start = time.perf_counter()
        m, figs = evaluate(ws, out, cfg, have, notes)
        files = write_outputs(out, m, figs, cfg)
        locks.write_lock(plan.lock, "score", plan.inputs, files)
    return ScoreResult(run, out, m, seconds=time.perf_counter() - start, latents=_latents_of(ws, out, cfg))


def _latents_of(ws: Workspace, result: Path, cfg: Config) -> str:
    lat = graph.latents(ws, graph.run_config(result, cfg), cfg.score.closed)
    return f"latents of {lat.split} (VAE {lat.source.label}, store {lat.store})"
