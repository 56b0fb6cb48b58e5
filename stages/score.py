"""Stage three: evaluate a trained run from its saved embeddings (metrics.json, report.md, figures).

Declared inputs: the `score.*` settings and the embeddings (their locks) of the closed, post-processed
and open splits with their manifests' labels, partitions and variants; its code is the math and the
report (report/scoring.py computes every number, report/decisions.py those an examiner signs).
Embeddings that are missing or stale are made first (embed is an implicit upstream stage); a split
that cannot be embedded is left out, with a note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from leakpipe.pipeline.config import Config, VaeConfig
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.graph import (
    Graph,
    Latents,
    label_rows,
    resolved,
    run_config,
    score_splits,
    section_keys,
    trained_lock,
    values,
)
from leakpipe.pipeline.ledger.locks import Inputs, Upstream, Verdict
from leakpipe.pipeline.ledger.stage import Done, Instance, Plan, Stage, run as run_stage
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store.atomic import sweep_orphans
from leakpipe.pipeline.engine.vae import resolve_device
from leakpipe.pipeline.engine.vae import is_random
from leakpipe.pipeline.engine.vae import resolve as resolve_vae
from leakpipe.pipeline.engine.autoencoders import load_autoencoder

KEYS = section_keys("score")
CODE = ("leakpipe.stages.score:work",)  # its code: what `work` reaches (ledger/code.py)


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
        lines = [
            head + ("up to date, nothing to do" if self.up_to_date else f"done in {self.seconds:.0f} s"),
            f"  closed test: top-1 {_ci(h, 'top1')} (chance {h['chance']['top1']:.3f}), macro AUC "
            f"{_ci(h, 'macro_auc')} (Mahalanobis {raw['mahalanobis']['top1']:.3f} / "
            f"{raw['mahalanobis']['macro_auc']:.3f})",
        ]
        for variant, r in m["closed"].items():
            if variant != "raw":
                lines.append(f"  {variant}: top-1 {r['head']['top1']:.3f}, macro AUC {r['head']['macro_auc']:.3f}")
        for kind, r in m.get("open", {}).items():
            lines.append(f"  open set, {kind}: AUROC {_ci(r, 'auroc')}, EER {_ci(r, 'eer')}, OVL {_ci(r, 'ovl')}")
        lines += decision_summary(m)
        for g, r in m.get("held_out", {}).get("gating_off", {}).items():
            lines.append(f"  held-out generator {g} (never trained on) vs closed test: AUROC {_ci(r, 'auroc')}")
        lines += [f"  NOTE: {n}" for n in m.get("notes", []) if "includes chance" in n or n.startswith("Leakage")]
        lines += [f"  WARNING: {w}" for w in m.get("warnings", [])]
        if self.latents:
            lines.append(f"  on {self.latents}")
        lines.append(f"  report: {self.run_dir / 'report.md'} (cache/runs/{self.run} -> results/{self.run_dir.name})")
        return "\n".join(lines)


def decision_summary(m: dict) -> list[str]:
    """The summary's lines on the decisions: ECE before and after calibration, the prediction sets'
    coverage and size against their level, the unseen flag's false alarms and detections."""
    c, s, u = m.get("calibration"), m.get("conformal"), m.get("unseen_threshold", {})
    if not c or not s:
        return []
    before, after, sets = m["closed"]["raw"]["head"], c["variants"]["raw"], s["variants"]["raw"]
    line = (
        f"  decisions at {s['level']:.0%}: ECE {_ci(before, 'ece')} -> {_ci(after, 'ece')} ({c['method']}); "
        f"{s['score']} sets: coverage {_ci(sets, 'coverage')}, mean size {_ci(sets, 'set_size')}; unseen flag "
        f"(p <= {u['alpha']:g}): false alarms {_ci(u, 'false_alarm_rate')}"
    )
    return [line + (f", detected {_ci(u, 'detection_rate')}" if "detection_rate" in u else "")]


@dataclass
class Reading:
    """What scoring reads of a result, each file checked against its lock (report/scoring.Reader)."""

    g: Graph
    result: Path
    cfg: Config

    @property
    def name(self) -> str:
        return self.result.name

    @cached_property
    def run_cfg(self) -> Config:
        return run_config(self.result)

    @cached_property
    def random_vae(self) -> bool:

        return is_random(self.run_cfg.vae, self.g.ws.root)

    @cached_property
    def prototypes(self):
        from leakpipe.pipeline.ledger.results import load_checked  # torch: when scoring runs

        tensors, _ = load_checked(self.result, "model.safetensors")
        return tensors["prototypes"].numpy() if "prototypes" in tensors else None

    def split(self, name: str):
        from leakpipe.pipeline.report.scored import load_split

        return load_split(self.g.ws, self.result, name, _latents(self.g, self.result, self.cfg, name).file_hashes)

    def manifest(self, name: str):
        return read_manifest(self.g.ws.manifest(name), check_files=False)

    def manifest_path(self, name: str) -> Path:
        return self.g.ws.manifest(name)

    def store(self, name: str) -> str:
        return _latents(self.g, self.result, self.cfg, name).store

    def autoencoder(self, source: str):
        return load_autoencoder(resolve_vae(VaeConfig(source=source), self.g.ws.root))

    def contents(self, name: str) -> list[str]:
        return _latents(self.g, self.result, self.cfg, name).file_hashes

    def stage_features(self, rows):
        from leakpipe.pipeline.engine.trained import stage_features

        return stage_features(
            self.result,
            self.store(self.cfg.score.closed),
            rows,
            resolve_device(self.cfg.compute.device),
            self.cfg.compute.eval_batch_size,
        )


def _latents(g: Graph, result: Path, cfg: Config, split: str) -> Latents:
    """The latents of `split` for the result's encoder."""
    return g.plan("encode", split, cfg=run_config(result, cfg)).data


def _available(g: Graph, run_dir: Path, cfg: Config, name: str) -> tuple[list[str], list[str]]:
    """(splits whose embeddings are up to date, notes on the others); the closed split must be."""
    ws, have, notes = g.ws, [], []
    for role, split in score_splits(cfg, ws):
        verdict = g.plan("embed", run_dir, split, name).check(deep=True) if ws.manifest(split).exists() else None
        if verdict is not None and verdict.up_to_date:
            have.append(split)
        elif role == "closed":
            raise UserError(
                f"the embeddings of {split!r} under {run_dir} are not up to date "
                f"({'; '.join(verdict.reasons) if verdict else 'no manifest'}); run "
                f"`leakpipe embed --run RUN`, or `leakpipe score`, which embeds first"
            )
        elif verdict is None:
            notes.append(
                f"{role} split {split!r} is not in manifests/; build it and run "
                f"`leakpipe encode --split {split}` to include it"
            )
        elif verdict.blocked:
            notes.append(
                f"{role} split {split!r} is left out: {'; '.join(verdict.reasons)}; run "
                f"`{verdict.blocked[0]}` to include it"
            )
        else:
            notes.append(
                f"{role} split {split!r} has stale embeddings ({'; '.join(verdict.reasons)}); "
                "run `leakpipe score` to embed it"
            )
    return have, notes


@dataclass
class Scoring:
    run: str
    result: Path
    graph: Graph


def plan(g: Graph, cfg: Config, run: str) -> Plan:
    """Score reads the embeddings (with locks) of the closed, post-processed and open splits under the
    result `run` points at, and their manifests' labels, partitions and variants."""
    ws, out = g.ws, runs.pointed(g.ws, runs.check_name(run))
    cfg = resolved(cfg, ws)  # score.variants = auto: CLOSED-var when it exists
    command = f"leakpipe score --run {run}"
    if out is None or locks.read_lock(out / "train.lock.json") is None:
        return Plan.not_ready(
            STAGE,
            run,
            Verdict(
                False,
                [runs.problem(ws, run) or f"run {run!r} has no trained result"],
                blocked=[f"leakpipe train --run {run}"],
            ),
            command,
        )
    if not ws.manifest(cfg.score.closed).exists():
        return Plan.not_ready(
            STAGE,
            run,
            Verdict(
                False,
                [f"no manifest {ws.manifest(cfg.score.closed)}: score needs the closed split"],
                blocked=[f"leakpipe manifest build ROOT --split {cfg.score.closed}"],
            ),
            command,
        )
    roles = [(role, split) for role, split in score_splits(cfg, ws) if ws.manifest(split).exists()]
    upstream = [g.plan("embed", out, split, run) for _, split in roles]
    optional = frozenset(p.target for (role, _), p in zip(roles, upstream) if role != "closed")
    ups, files = {}, {}
    for role, split in roles:
        lock = locks.read_lock(out / "embeddings" / f"{split}.lock.json")
        if lock is not None:
            model = lock["inputs"]["upstream"]["model"]["about"]
            ups[f"embeddings of {split}"] = Upstream(
                lock["fingerprint"], "recomputed", {"model trained": model.get("trained")}
            )
            extra = ("source", "ops") if role == "variants" else ()  # what a variant copies, how it was processed
            files[f"labels and partitions of {split}"] = label_rows(
                read_manifest(ws.manifest(split), check_files=False), extra
            )
    if cfg.score.baselines:
        before = ((locks.read_lock(out / "score.lock.json") or {}).get("inputs") or {}).get("files", {})
        for a in cfg.score.reconstruction:
            key = f"reconstruction autoencoder {a}"
            files[key] = _as_recorded(_autoencoder_files(g, a), before.get(key))
    inputs = Inputs(values(cfg, KEYS), ups, files, STAGE.code_identity())
    return Plan(
        STAGE,
        run,
        inputs,
        out / "score.lock.json",
        out / ".writer.lock",
        lambda: sweep_orphans(out),
        upstream,
        optional,
        command=command,
        facts={"result": out.name},
        data=Scoring(run, out, g),
        guard=lambda: trained_lock(out, deep=True),  # a damaged model is refused, never scored
    )


def _autoencoder_files(g: Graph, source: str) -> list[list[str]]:
    """[[file name, hash], ...] of the weight and config files of a reconstruction autoencoder, by name as
    stage one records its VAE's, so that the same files elsewhere (another install's builtin:taef2, a
    moved folder) are the same inputs; or what is wrong with the source (the baseline is then left out)."""
    try:
        src = resolve_vae(VaeConfig(source=source), g.ws.root)
        # a TAESD-format encoder file is its own config: once
        paths = dict.fromkeys([*src.weights, *([src.decoder] if src.decoder else []), src.config_path])
        return [[p.name, g.hashes.hash(p)] for p in paths if p.is_file()]
    except (OSError, UserError) as exc:
        return [[source, f"unavailable: {exc}"]]


def _as_recorded(files: list[list[str]], recorded: list | None) -> list:
    """`files` as the lock recorded them where that record names the same files with the same contents in
    the earlier form (absolute paths, a TAESD file twice: leakpipe before 2026-12-06), so that upgrading
    leakpipe does not rescore; `files` otherwise."""
    if not recorded or any(len(r) != 2 for r in recorded):
        return files
    earlier = sorted({(Path(path).name, digest) for path, digest in recorded})
    return recorded if earlier == sorted(map(tuple, files)) else files


def work(plan: Plan, cfg: Config, log, verdict: Verdict) -> Done:
    s: Scoring = plan.data
    cfg = resolved(cfg, s.graph.ws)  # as fingerprinted
    trained_lock(s.result, deep=True)  # a damaged model is refused, never scored
    trained = s.graph.plan("train", s.run).check()
    if not trained.up_to_date:
        log(
            f"score {s.run}: note: scoring the result {s.run!r} points at ({s.result.name}); `leakpipe train --run "
            f"{s.run}` would not keep it: {'; '.join(trained.reasons)}"
        )
    have, notes = _available(s.graph, s.result, cfg, s.run)
    log(f"score {s.run}: scoring because " + "; ".join(verdict.reasons))
    from leakpipe.pipeline.report import evaluate as ev, scoring  # heavy (torch, sklearn): when scoring runs
    from leakpipe.pipeline.engine.images import allow_pixels
    from leakpipe.pipeline.report.outputs import write_outputs

    if cfg.score.dual:
        log(f"WARNING: {ev.DUAL_WARNING}.")
    start = time.perf_counter()
    reading = Reading(s.graph, s.result, cfg)
    allow_pixels(max(cfg.preprocess.max_pixels, reading.run_cfg.preprocess.max_pixels))  # thumbnails, baselines
    m, figs = scoring.evaluate(reading, cfg, have, notes)
    files = write_outputs(s.result, m, figs, cfg, reading.prototypes)
    return Done(
        files,
        {},
        ScoreResult(
            s.run,
            s.result,
            m,
            seconds=time.perf_counter() - start,
            latents=_latents(s.graph, s.result, cfg, cfg.score.closed).described,
        ),
    )


def instances(graph: Graph) -> list[Instance]:
    """Each run name whose trained result was scored; its outputs are hashed when checked, as score,
    export and attribute check them (small files)."""
    return [
        Instance(name, (name,), deep=True, facts={"result": result.name})
        for name, result in runs.trained(graph.ws)
        if (result / "score.lock.json").exists()
    ]


STAGE = Stage("score", KEYS, CODE, plan, work, instances=instances)


def run(g: Graph, run: str = "default", log=print) -> ScoreResult:
    """Score the result run `run` points at from its embeddings (embedding what is missing or stale
    first), or do nothing if its metrics are up to date."""
    p = g.plan("score", run)
    done = run_stage(p, g.cfg, log)
    if done.result is not None:
        return done.result
    from leakpipe.pipeline.report.scored import load_metrics  # torch: when scoring runs

    out = p.data.result
    return ScoreResult(
        run,
        out,
        load_metrics(out, run),
        up_to_date=True,
        latents=_latents(g, out, g.cfg, g.cfg.score.closed).described,
    )
