"""Stage two: train Proto-LeakNet from the latent cache into the run cache.

Declared inputs: the `latent`, `diffusion`, `features`, `model` and `train` settings (and the precision),
the latents of `train.split` (their encode lock), its labels and partitions, the latents of its
post-processed variants with their sources (train.variants), and the `model.init` file;
its code is every module that defines the weights (math, nn, the feature path and the epoch loop in
engine/fit.py). A result is stored under its training fingerprint (cache/results/<fp12>) and the run
name points at it: retraining a name under another config keeps the earlier result, and a config
trained before is restored, not trained again.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
import time
from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.config import TRAIN_SECTIONS, Config
from leakpipe.pipeline.engine.ddp import launched_rank
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.graph import (
    Graph,
    Latents,
    init_file,
    label_rows,
    ready_latents,
    resolved,
    section_keys,
    values,
)
from leakpipe.pipeline.ledger.locks import Inputs, Verdict
from leakpipe.pipeline.ledger.stage import Done, Instance, Plan, Stage, run as run_stage
from leakpipe.pipeline.store.atomic import atomic_write_json, sweep_orphans
from leakpipe.pipeline.store.hashing import hash_file
from leakpipe.pipeline.store.locking import shared
from leakpipe.pipeline.workspace import Workspace

KEYS = (*section_keys(*TRAIN_SECTIONS), "compute.precision")
CODE = ("leakpipe.stages.train:work",)  # its code: what `work` reaches (ledger/code.py)


@dataclass
class TrainResult:
    run: str
    run_dir: Path  # the result folder in the run cache
    latents: str = ""  # "VAE ... , store ..." of the cache it trained on
    up_to_date: bool = False
    restored: bool = False
    epochs: int = 0
    best_epoch: int = 0
    val_macro_auc: float = float("nan")
    resumed_from: int = 0
    seconds: float = 0.0
    world_size: int = 1  # processes that trained it (torchrun); recorded, not fingerprinted

    def summary(self) -> str:
        where = f"on {self.latents} -> {self.run_dir} (cache/runs/{self.run} points at it)"
        if self.up_to_date or self.restored:
            done = "up to date, nothing to do" if self.up_to_date else "restored a stored result, no training"
            return f"train {self.run}: {done}; {where}"
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return (
            f"train {self.run}: {self.epochs} epochs{resumed} in {self.seconds:.0f} s; best epoch "
            f"{self.best_epoch}, validation macro AUC {self.val_macro_auc:.4f}; {where}"
        )


def run_dir(ws: Workspace, run: str) -> Path:
    """The run name's folder (a link to its result in the run cache)."""
    return runs.link(ws, run)


@dataclass
class Training:
    """What a train plan carries: the run name, the latents it reads, the result the current config
    trains, and the one the name points at now."""

    run: str
    latents: Latents
    result: Path
    current: Path | None
    init: Path | None  # model.init, resolved
    variants: Latents | None = None  # train.variants, resolved
    ws: Workspace | None = None


def _restore(t: Training, inputs: Inputs):
    """A result stored under this config but not pointed at by the name is restored, not retrained; an
    interrupted training of it resumes from its checkpoint."""

    def check(stored: Verdict) -> Verdict:
        if stored.up_to_date and t.current == t.result:
            return stored
        if stored.up_to_date:
            had = t.current / "train.lock.json" if t.current else None
            old = locks.read_lock(had) if had else None
            why = locks.explain(old["inputs"], inputs) if old else [f"run {t.run!r} is new"]
            return Verdict(
                False,
                why
                + [
                    f"a result trained with this config is stored (cache/results/"
                    f"{t.result.name}, {stored.lock.get('written', '?')}); train restores it "
                    "without training"
                ],
                stored.lock,
                restore=True,
            )
        ckpt = t.result / "checkpoint" / "checkpoint.safetensors"
        if ckpt.exists():
            stored.reasons.append(f"an interrupted training of this config resumes from {ckpt.parent}")
        return stored

    return check


def plan(graph: Graph, cfg: Config, run: str) -> Plan:
    """Stage two's plan for run name `run` under `cfg`."""
    ws = graph.ws
    cfg = resolved(cfg, ws)  # train.variants = auto: SPLIT-var when it exists
    current, command = runs.pointed(ws, runs.check_name(run)), f"leakpipe train --run {run}"
    lat_plan, verdict = ready_latents(graph, cfg.train.split, cfg)
    var_plan, var_verdict = ready_latents(graph, cfg.train.variants, cfg) if cfg.train.variants else (None, None)
    upstream = [p for p in (lat_plan, var_plan) if p]
    if lat_plan is None and not ws.manifest(cfg.train.split).exists():
        verdict.reasons[0] = f"train.split = {cfg.train.split}: {verdict.reasons[0]}"
    if var_verdict is not None and not var_verdict.up_to_date:
        var_verdict.reasons[0] = f"train.variants = {cfg.train.variants}: {var_verdict.reasons[0]}"
        verdict = var_verdict if verdict.up_to_date else verdict
    if not verdict.up_to_date:
        return Plan.not_ready(
            STAGE, run, verdict, command, upstream=upstream, facts={"result": current.name if current else None}
        )
    lat = lat_plan.data
    ups = {f"latents of {cfg.train.split}": lat.identity()}
    files = {f"labels and partitions of {lat.split}": label_rows(lat.manifest)}
    if var_plan is not None:  # which image each variant copies decides what it trains as
        ups[f"latents of {cfg.train.variants}"] = var_plan.data.identity()
        files[f"labels, partitions and sources of {cfg.train.variants}"] = label_rows(
            var_plan.data.manifest, ("source",)
        )
    init = init_file(ws, cfg) if cfg.model.init else None
    if init:  # the starting weights are an input: a changed file retrains ([[path, hash]], like every file list)
        files["model.init file"] = [[cfg.model.init, hash_file(init)]]
    inputs = Inputs(values(cfg, KEYS), ups, files, STAGE.code_identity())
    result = runs.result_dir(ws, inputs.fingerprint())
    t = Training(run, lat, result, current, init, var_plan.data if var_plan else None, ws)

    def finish():
        shutil.rmtree(result / "checkpoint", ignore_errors=True)  # kept, it would quadruple every result
        runs.point(ws, run, result)

    had = current / "train.lock.json" if current and current != result else None
    return Plan(
        STAGE,
        run,
        inputs,
        result / "train.lock.json",
        result / ".writer.lock",
        lambda: sweep_orphans(result),
        upstream,
        command=command,
        previous=had,
        facts={"result": current.name if current else None, "current_config_result": result.name},
        extra_checks=[_restore(t, inputs)],
        finish=finish,
        writes=launched_rank() == 0,
        data=t,
    )


def check_exclude(t: Training, exclude: list[str]) -> None:
    """`train.exclude` must leave 2 generators with train rows and 2 with val rows: said of that key,
    before any training (the trainer's own messages speak of the manifest)."""
    if not exclude:
        return
    m = t.latents.manifest
    for part in ("train", "val"):
        have = sorted({label for label, p in zip(m.column("label"), m.column("partition")) if p == part})
        left = [g for g in have if g not in exclude]
        if have and len(left) < 2:
            raise UserError(
                f"train.exclude = {json.dumps(exclude)} leaves {len(left)} of the {len(have)} generators "
                f"with {part} rows in {m.source} ({', '.join(left) or 'none'}); training needs at least 2. "
                "Exclude fewer generators (`sweep --logo` holds out one at a time)"
            )


def work(plan: Plan, cfg: Config, log, verdict: Verdict) -> Done:
    from leakpipe.pipeline.engine.fit import fit  # torch: imported when a training runs, not by status
    from leakpipe.pipeline.engine.variants import DamagedVariants
    from leakpipe.pipeline.store.latent_store import DamagedRows

    t: Training = plan.data
    cfg = resolved(cfg, t.ws)  # as fingerprinted: config.json records the variants trained on, not "auto"
    check_exclude(t, cfg.train.exclude)
    result = TrainResult(t.run, t.result, t.latents.described)
    if verdict.restore:
        log(f"train {t.run}: restoring the stored result {t.result}: " + "; ".join(verdict.reasons[:-1]))
        result.restored = True
        return Done(None, result=result)
    kept = f"; its earlier result stays at {t.current}" if t.current and t.current != t.result else ""
    log(f"train {t.run}: training because " + "; ".join(verdict.reasons) + kept)
    start = time.perf_counter()
    variants = shared(t.variants.writer_lock, f"latent store {t.variants.store}") if t.variants else nullcontext()
    with shared(t.latents.writer_lock, f"latent store {t.latents.store}"), variants:
        try:
            fitted = fit(t.latents, cfg, t.result, plan.inputs.fingerprint(), log, t.init, t.variants)
        except DamagedVariants as exc:
            raise t.variants.report_damage(exc.rows, "train") from None
        except DamagedRows as exc:
            raise t.latents.report_damage(exc.rows, "train") from None
    result.seconds = time.perf_counter() - start
    result.epochs, result.best_epoch, result.val_macro_auc = fitted.epochs, fitted.best_epoch, fitted.val_macro_auc
    result.resumed_from, result.world_size = fitted.resumed_from, fitted.world_size
    if not plan.writes:
        return Done(None, result=result)
    atomic_write_json(t.result / "config.json", cfg.to_dict())
    return Done(
        [t.result / "model.safetensors", t.result / "config.json", t.result / "history.json"],
        {
            "stores": [str(t.latents.store), *([str(t.variants.store)] if t.variants else [])],
            "vae": t.latents.source.label,
            "world_size": fitted.world_size,
            "seconds": round(result.seconds, 1),
        },
        result,
    )


def instances(graph: Graph) -> list[Instance]:
    """One instance per run name, with what is wrong with the name itself (a dangling link, a folder
    standing in for one)."""
    out = []
    for name in runs.names(graph.ws):
        bad = runs.problem(graph.ws, name)
        out.append(Instance(name, (name,), problems=(bad,) if bad else ()))
    return out


STAGE = Stage("train", KEYS, CODE, plan, work, instances=instances)


def run(graph: Graph, run: str = "default", log=print, cfg: Config | None = None) -> TrainResult:
    """Train under run name `run` (or resume it, or restore a stored result, or do nothing) and point
    the name at the result. Embedding is the next stage (stages/embed.py)."""
    p = graph.plan("train", run, cfg=cfg)
    done = run_stage(p, cfg or graph.cfg, log)
    if done.result is not None:
        return done.result
    return TrainResult(run, p.data.result, p.data.latents.described, up_to_date=True)
