"""Embed: h_bar, w, a_t, logits and prototype distances of one encoded split under one trained result
(cache/results/<fp12>/embeddings/<split>.zarr), each split with its own lock, so a split encoded after
training is embedded without retraining.

Declared inputs: the evaluation noise seed and the precision, the trained model (its train lock's
checksum) and the latents of the split; its code is the feature path, the model and `predict`. The
model's own saved feature path (statistics, alpha_t, sigma_t, DCT bases) is what embedding uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.ledger.graph import Graph, Latents, ready_latents, run_config, trained_lock, values
from leakpipe.pipeline.ledger.locks import Inputs, Upstream, Verdict
from leakpipe.pipeline.ledger.stage import Done, Instance, Plan, Stage, run as run_stage
from leakpipe.pipeline.store.atomic import sweep_orphans
from leakpipe.pipeline.store.locking import shared
from leakpipe.pipeline.engine.vae import resolve_device

KEYS = ("train.eval_seed", "compute.precision")  # besides the model, which carries the rest of its config
CODE = ("leakpipe.stages.embed:work",)  # its code: what `work` reaches (ledger/code.py)


def result_of(ws, run: str) -> Path:
    """The trained result run `run` points at; an error naming the command if there is none."""
    return runs.trained_result(ws, run)


@dataclass
class Embedding:
    split: str
    result: Path
    latents: Latents

    @property
    def path(self) -> Path:
        return self.result / "embeddings" / f"{self.split}.zarr"


def plan(graph: Graph, ws_cfg: Config, result: Path, split: str, name: str = "") -> Plan:
    """The embeddings of `split` under `result`, with the result's own config (its encoder's latents)."""
    cfg = run_config(result, ws_cfg)
    target = f"{name or result.name}/{split}"
    lat_plan, verdict = ready_latents(graph, split, cfg)
    lock, writer = result / "embeddings" / f"{split}.lock.json", result / ".writer.lock"
    if not verdict.up_to_date:
        return Plan(
            STAGE,
            target,
            None,
            lock,
            writer,
            None,
            [lat_plan] if lat_plan else [],
            blocked=verdict,
            command=f"leakpipe embed --run {name or result.name} --split {split}",
        )
    train_lock = trained_lock(result)
    model = Upstream(
        train_lock["outputs"]["model.safetensors"]["blake2b"], "retrained", {"trained": train_lock.get("written", "?")}
    )
    inputs = Inputs(
        values(cfg, KEYS), {"model": model, f"latents of {split}": lat_plan.data.identity()}, {}, STAGE.code_identity()
    )
    return Plan(
        STAGE,
        target,
        inputs,
        lock,
        writer,
        lambda: sweep_orphans(result),
        [lat_plan],
        command=f"leakpipe embed --run {name or result.name} --split {split}",
        data=Embedding(split, result, lat_plan.data),
    )


def work(plan: Plan, ws_cfg: Config, log, verdict: Verdict) -> Done:
    from leakpipe.pipeline.engine.data import LatentRows  # torch: imported when embedding runs
    from leakpipe.pipeline.engine.precision import channels_last, compiled
    from leakpipe.pipeline.engine.training import predict
    from leakpipe.pipeline.engine.trained import load_trained
    from leakpipe.pipeline.store import embeddings, latent_store

    e: Embedding = plan.data
    if verdict.lock is not None:
        log(f"embed {e.split}: embedding again because " + "; ".join(verdict.reasons))
    model, build, classes, cfg = load_trained(e.result, resolve_device(ws_cfg.compute.device))
    channels_last(model, build.device, ws_cfg.compute.precision)
    lat = e.latents
    want = latent_store.hash_rows(lat.file_hashes)
    with shared(lat.writer_lock, f"latent store {lat.store}"):
        rows = latent_store.valid_rows(latent_store.open_store(lat.store), want).nonzero()[0]
        try:
            data = LatentRows(lat.store, rows, rows * 0, ws_cfg.compute.memory_budget_gb * 2**30)
            outputs = predict(
                model,
                data,
                build,
                ws_cfg.compute.eval_batch_size,
                ws_cfg.compute.precision,
                compiled(model, ws_cfg.compute.compile, ws_cfg.compute.compile_backend),
            )
        except latent_store.DamagedRows as exc:
            raise lat.report_damage(exc.rows, "embed") from None
    embeddings.write(
        e.path,
        len(want),
        rows,
        outputs,
        {"split": e.split, "classes": classes, "timesteps": cfg.diffusion.timesteps, "result": e.result.name},
    )
    log(f"embed {e.split}: {len(rows)} of {len(want)} rows -> {e.path}")
    return Done(e.path, {"split": e.split}, e.split)


def instances(graph: Graph) -> list[Instance]:
    """The embedded splits of each run name's trained result."""
    return [
        Instance(f"{name}/{split}", (result, split, name))
        for name, result in runs.trained(graph.ws)
        for split in graph.ws.splits()
        if (result / "embeddings" / f"{split}.lock.json").exists()
    ]


STAGE = Stage("embed", KEYS, CODE, plan, work, implicit=True, instances=instances)


def run(graph: Graph, run: str = "default", log=print, splits=None) -> list[str]:
    """Embed every split (or `splits`) whose latents are up to date for the result's encoder and whose
    embeddings are missing or stale, under the result run `run` points at. Returns those embedded."""
    result, done = result_of(graph.ws, run), []
    for split in splits or graph.ws.splits():
        p = graph.plan("embed", result, split, run)
        if p.inputs is None:
            log(f"embed {split}: skipped: {'; '.join(p.blocked.reasons)}")
        elif run_stage(p, graph.cfg, log).result is not None:
            done.append(split)
    return done
