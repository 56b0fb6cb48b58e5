"""Stage three: evaluate a trained run from its saved embeddings (metrics.json, report.md, figures)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakpipe.pipeline.ledger import locks as ledger
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.config import Config, section_hash
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.locking import exclusive
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import train

CODE_VERSION = "score-2"
RANDOM_VAE_NOTE = ("This run's VAE has seeded random weights (the demo's or a test's), not a pretrained "
                   "encoder: the numbers show the pipeline working, not Proto-LeakNet's accuracy.")


@dataclass
class ScoreResult:
    run: str
    run_dir: Path
    metrics: dict
    up_to_date: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        m, head = self.metrics, f"score {self.run}: "
        raw = m["closed"]["raw"]
        lines = [head + ("up to date, nothing to do" if self.up_to_date else f"done in {self.seconds:.0f} s"),
                 f"  closed test: top-1 {raw['head']['top1']:.3f}, macro AUC {raw['head']['macro_auc']:.3f} "
                 f"(Mahalanobis {raw['mahalanobis']['top1']:.3f} / {raw['mahalanobis']['macro_auc']:.3f})"]
        for variant, r in m["closed"].items():
            if variant != "raw":
                lines.append(f"  {variant}: top-1 {r['head']['top1']:.3f}, macro AUC {r['head']['macro_auc']:.3f}")
        for kind, r in m.get("open", {}).items():
            lines.append(f"  open set, {kind}: AUROC {r['auroc']:.3f}, EER {r['eer']:.3f}, OVL {r['ovl']:.3f}")
        lines.append(f"  report: {self.run_dir / 'report.md'}")
        return "\n".join(lines)


def splits_of(cfg: Config) -> list[tuple[str, str]]:
    """(role, split) of every split that score reads."""
    return [("closed", cfg.score.closed), *(("postprocessed", s) for s in cfg.score.postprocessed),
            ("open", cfg.score.open)]


def load_split(ws: Workspace, run_dir: Path, split: str):
    """The valid rows of `split`'s embeddings with their manifest columns (evaluate.Split)."""
    from leakpipe.pipeline.store import embeddings
    from leakpipe.pipeline.report.evaluate import Split
    from leakpipe.pipeline.manifest import read_manifest

    e = embeddings.read(run_dir / "embeddings" / f"{split}.zarr")
    m = read_manifest(ws.manifest(split), check_files=False)
    if len(m) != len(e["valid"]):
        raise UserError(f"embeddings of {split!r} have {len(e['valid'])} rows but {ws.manifest(split)} has "
                        f"{len(m)}; run `leakpipe encode --split {split}` and `leakpipe score` again")
    v = e["valid"]
    col = lambda name: np.array(m.column(name) if name in m.rows[0] else [""] * len(m), dtype=object)[v]  # noqa: E731
    return Split(split, {k: e[k][v] for k in ("h_bar", "w", "a_t", "logits", "pi", "d_min")},
                 col("label"), col("partition"), col("variant"), int((~v).sum())), e["attrs"]


def score_inputs(run_dir: Path, available: list[str], cfg: Config) -> dict:
    locks = {s: ledger.read_lock(run_dir / "embeddings" / f"{s}.lock.json") for s in available}
    return {"embeddings": {s: lock["fingerprint"] for s, lock in locks.items() if lock},
            "config": section_hash(cfg, "score"), "code": CODE_VERSION}


def _available(ws: Workspace, run_dir: Path, cfg: Config, log) -> tuple[list[str], list[str]]:
    """Embed what is missing or stale, then return (splits with embeddings, notes on missing ones)."""
    closed = cfg.score.closed
    if not ws.manifest(closed).exists():
        raise UserError(f"no manifest {ws.manifest(closed)}: score needs the closed split")
    wanted = [s for _, s in splits_of(cfg) if ws.manifest(s).exists()]
    train.embed_all(ws, run_dir.name, log, splits=wanted)
    have, notes = [], []
    for role, split in splits_of(cfg):
        if (run_dir / "embeddings" / f"{split}.lock.json").exists():
            have.append(split)
        elif role == "closed":
            raise UserError(f"split {split!r} has no embeddings; run `leakpipe encode --split {split}` first")
        else:
            notes.append(f"{role} split {split!r} is not " + ("encoded" if ws.manifest(split).exists()
                         else "in manifests/") + f"; run `leakpipe encode --split {split}` to include it")
    return have, notes


def evaluate(ws: Workspace, run_dir: Path, cfg: Config, have: list[str], notes: list[str]) -> tuple[dict, dict]:
    """(metrics, figure data)."""
    from leakpipe.pipeline.report import evaluate as ev
    from leakpipe.pipeline.engine.vae import is_random

    run_cfg = train.run_config(run_dir)
    if is_random(run_cfg.vae):
        notes = [RANDOM_VAE_NOTE, *notes]
    closed, attrs = load_split(ws, run_dir, cfg.score.closed)
    classes = attrs["classes"]
    by_part = {p: closed.select(closed.partition == p) for p in ("train", "val", "test")}
    tests = {"raw": by_part["test"]}
    for name in (s for s in cfg.score.postprocessed if s in have):
        pp, _ = load_split(ws, run_dir, name)
        clash = sorted(set(pp.variant) & tests.keys())
        if clash:
            raise UserError(f"{ws.manifest(name)}: variant(s) {', '.join(clash)} also come from another "
                            "scored manifest; give each post-processing step its own variant name")
        tests.update({v: pp.select(pp.variant == v) for v in sorted(set(pp.variant))})
    if len(by_part["test"]) == 0:
        raise UserError(f"{ws.manifest(cfg.score.closed)} has no valid test rows to score")
    try:
        m = {"run": run_dir.name, "classes": classes, "timesteps": attrs["timesteps"], "notes": notes,
             "head": "prototypes" if run_cfg.model.prototypes else "linear",
             "closed": ev.closed_set(by_part["train"], tests, classes, cfg.score.maha_floor),
             "attention": ev.attention_by_class(by_part["test"], classes),
             "invalid_rows": {cfg.score.closed: closed.n_invalid}}
    except ValueError as exc:
        raise UserError(f"run {run_dir.name}: {exc}") from None
    figs = {"test": by_part["test"], "classes": classes, "open": None}
    kind = cfg.score.kde_embedding
    key = ev.SETTING_OF[kind]
    if cfg.score.open in have:
        opened, _ = load_split(ws, run_dir, cfg.score.open)
        res = ev.open_set(by_part["train"], by_part["test"], opened, cfg.score)
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
    return m, figs


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
    names = [f for f in report.FIGURES if f != "kde_scores.png"]
    if "kde_scores" in figs:
        report.kde_figure(figs["kde_scores"], m["open"], m["unseen_threshold"], fig_dir / "kde_scores.png")
        names.append("kde_scores.png")
    for stale in set(p.name for p in fig_dir.glob("*.png")) - set(names):
        (fig_dir / stale).unlink()
    m["figures"] = sorted(names)
    atomic_write_json(run_dir / "metrics.json", m)
    report.write_report(run_dir / "report.md", m)
    return [run_dir / "metrics.json", run_dir / "report.md", *(fig_dir / n for n in m["figures"])]


def run(ws: Workspace, cfg: Config, run: str = "default", log=print) -> ScoreResult:
    """Embed missing or stale splits, then evaluate (or do nothing if metrics are up to date)."""
    out = train.run_dir(ws, run)
    if not (out / "model.safetensors").exists():
        raise UserError(f"run {run!r} has no trained model in {out}; run `leakpipe train --run {run}` first")
    trained_up, why = train.status(ws, run)
    if not trained_up:
        log(f"score {run}: note: the run's training is stale ({'; '.join(why)}); scoring the model it has")
    with exclusive(out / ".writer.lock", f"run {run}"):
        have, notes = _available(ws, out, cfg, log)
        inputs = score_inputs(out, have, cfg)
        lock_path = out / "score.lock.json"
        up, reasons = ledger.stage_state(lock_path, inputs)
        if up:
            return ScoreResult(run, out, json.loads((out / "metrics.json").read_text()), up_to_date=True)
        if ledger.read_lock(lock_path) is not None:
            log(f"score {run}: rescoring because " + "; ".join(reasons))
        if cfg.score.dual:
            from leakpipe.pipeline.report.evaluate import DUAL_WARNING

            log(f"WARNING: {DUAL_WARNING}.")
        start = time.perf_counter()
        m, figs = evaluate(ws, out, cfg, have, notes)
        files = write_outputs(out, m, figs, cfg)
        ledger.write_lock(lock_path, "score", inputs, files, run=run)
    return ScoreResult(run, out, m, seconds=time.perf_counter() - start)


def status(ws: Workspace, cfg: Config, run: str) -> tuple[bool, list[str]]:
    out = train.run_dir(ws, run)
    names = [s for _, s in splits_of(cfg) if (out / "embeddings" / f"{s}.lock.json").exists()]
    return ledger.stage_state(out / "score.lock.json", score_inputs(out, names, cfg))
