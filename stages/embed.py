"""Embed: h_bar, w, a_t, logits and prototype distances of every encoded split under a trained
result (cache/results/<fp12>/embeddings/<split>.zarr), each split with its own lock, so a split
encoded after training is embedded without retraining."""
from __future__ import annotations

from pathlib import Path

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine.trained import load_trained
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import graph, locks, runs
from leakpipe.pipeline.store.atomic import sweep_orphans
from leakpipe.pipeline.store.locking import exclusive, shared
from leakpipe.pipeline.workspace import Workspace


def result_of(ws: Workspace, run: str) -> Path:
    out = runs.pointed(ws, run)
    if out is None or locks.read_lock(out / "train.lock.json") is None:
        raise UserError(f"run {run!r} has no trained result; run `leakpipe train --run {run}` first")
    return out


def run(ws: Workspace, ws_cfg: Config, run: str = "default", log=print, splits=None) -> list[str]:
    """Embed every split (or `splits`) whose latents are up to date for the result's encoder and
    whose embeddings are missing or stale, under the result run `run` points at. Returns them."""
    result = result_of(ws, run)
    with exclusive(result / ".writer.lock", f"result {result.name}"):
        sweep_orphans(result)  # a killed writer's leftovers; none can be alive under this lock
        return _embed(ws, result, ws_cfg, log, splits)


def _embed(ws: Workspace, result: Path, ws_cfg: Config, log, splits) -> list[str]:
    from leakpipe.pipeline.engine.data import LatentRows
    from leakpipe.pipeline.engine.precision import channels_last, compiled
    from leakpipe.pipeline.engine.training import predict
    from leakpipe.pipeline.engine.vae import resolve_device
    from leakpipe.pipeline.store import embeddings, latent_store

    done, model = [], None
    for split in splits or ws.splits():
        plan = graph.embedding(ws, result, split, ws_cfg)
        verdict = plan.check(deep=True)
        if verdict.blocked:
            log(f"embed {split}: skipped: {'; '.join(verdict.reasons)}")
            continue
        if verdict.up_to_date:
            continue
        if verdict.lock is not None:
            log(f"embed {split}: embedding again because " + "; ".join(verdict.reasons))
        if model is None:
            model, build, classes, cfg = load_trained(result, resolve_device(ws_cfg.compute.device))
            channels_last(model, build.device, ws_cfg.compute.precision)
        lat = plan.latents
        want = latent_store.hash_rows(lat.file_hashes)
        with shared(lat.writer_lock, f"latent store {lat.store}"):
            rows = latent_store.valid_rows(latent_store.open_store(lat.store), want).nonzero()[0]
            try:
                data = LatentRows(lat.store, rows, rows * 0, ws_cfg.compute.memory_budget_gb * 2 ** 30)
                outputs = predict(model, data, build, ws_cfg.compute.eval_batch_size, ws_cfg.compute.precision,
                                  compiled(model, ws_cfg.compute.compile, ws_cfg.compute.compile_backend))
            except latent_store.DamagedRows as exc:
                raise lat.report_damage(exc.rows, "embed") from None
        embeddings.write(plan.path, len(want), rows, outputs,
                         {"split": split, "classes": classes, "timesteps": cfg.diffusion.timesteps,
                          "result": result.name})
        locks.write_lock(plan.lock, "embed", plan.inputs, plan.path, split=split)
        log(f"embed {split}: {len(rows)} of {len(want)} rows -> {plan.path}")
        done.append(split)
    return done
