"""Stage two: train Proto-LeakNet from the latent cache into the run cache. A result is stored under its training fingerprint (cache/results/<fp12>) and the run
name points at it: retraining a name under another config keeps the earlier result."""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine.ddp import launched_rank
from leakpipe.pipeline.engine.trained import build_model, init_backbone
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import graph, locks, runs
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.store.latent_store import DamagedRows
from leakpipe.pipeline.store.atomic import sweep_orphans
from leakpipe.pipeline.store.locking import exclusive, shared
from leakpipe.pipeline.workspace import Workspace


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
        return (f"train {self.run}: {self.epochs} epochs{resumed} in {self.seconds:.0f} s; best epoch "
                f"{self.best_epoch}, validation macro AUC {self.val_macro_auc:.4f}; {where}")


def run_dir(ws: Workspace, run: str) -> Path:
    """The run name's folder (a link to its result in the run cache)."""
    return runs.link(ws, run)


def _described(lat: graph.Latents) -> str:
    return f"latents of {lat.split} (VAE {lat.source.label}, store {lat.store})"


def _rows(p, exclude=(), classes=None):
    """(train rows, train labels, val rows, val labels, classes) of the valid rows whose labels are not
    in `exclude`."""
    import numpy as np

    from leakpipe.pipeline.store import latent_store

    valid = latent_store.valid_rows(latent_store.open_store(p.store), latent_store.hash_rows(p.file_hashes))
    rows = p.manifest.rows
    labels = {r["label"] for r in rows}
    absent = [g for g in exclude if g not in labels]
    if absent:
        raise UserError(f"train.exclude names {', '.join(absent)}, which {p.manifest.source} does not label; "
                        f"its labels are {', '.join(sorted(labels))}")
    valid = valid & np.array([r["label"] not in exclude for r in rows], bool)  # held out: never trained on
    classes = classes or sorted({r["label"] for r, ok in zip(rows, valid) if ok and r["partition"] == "train"})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for part in ("train", "val"):
        sel = [i for i, r in enumerate(rows) if valid[i] and r["partition"] == part]
        unknown = sorted({rows[i]["label"] for i in sel} - index.keys())
        if unknown:
            raise UserError(f"{p.manifest.source}: {part} rows have labels with no training rows: "
                            f"{', '.join(unknown)}")
        out += [np.array(sel, np.int64), np.array([index[rows[i]["label"]] for i in sel], np.int64)]
    val_classes = sorted({classes[k] for k in out[3]})
    if len(out[2]) and len(val_classes) < 2:
        raise UserError(f"{p.manifest.source}: the val partition has rows of only 1 class ({val_classes[0]}); "
                        "early stopping uses the validation macro AUC, which needs at least 2 classes. "
                        "Give the val partition images of several generators (manifest build --ratios).")
    if len(classes) < 2 or len(out[0]) == 0 or len(out[2]) == 0:
        raise UserError(f"{p.manifest.source}: training needs >= 2 classes with train rows and some "
                        f"val rows; found {len(classes)} classes, {len(out[0])} train, {len(out[2])} val")
    return (*out, classes)


def _fit(p: graph.Latents, cfg: Config, out: Path, fp: str, result: TrainResult, log, init: Path | None) -> None:
    import torch
    from leakpipe.pipeline.progress import progress

    from leakpipe.pipeline.math import metrics
    from leakpipe.pipeline.store.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint, save_tensors
    from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
    from leakpipe.pipeline.engine import ddp as ddp_lib
    from leakpipe.pipeline.engine.precision import channels_last, compiled, grad_scaler
    from leakpipe.pipeline.engine.training import predict, recalibrate_batchnorm, train_epoch

    tr_rows, tr_y, va_rows, va_y, classes = _rows(p, cfg.train.exclude)
    budget = cfg.compute.memory_budget_gb * 2 ** 30
    train_data, val_data = (LatentRows(p.store, r, y, budget / 2) for r, y in ((tr_rows, tr_y), (va_rows, va_y)))
    side = min(train_data.latent_shape[-2:])
    if cfg.features.dct_k > side:
        raise UserError(f"features.dct_k = {cfg.features.dct_k} exceeds the latent side {side} of "
                        f"{p.store}; lower features.dct_k or encode larger images (preprocess.size)")
    ddp, device = ddp_lib.setup(cfg.compute.device)
    log = log if ddp.is_main else (lambda msg: None)
    result.world_size = ddp.world
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg, len(classes), train_data.latent_shape)
    if init is not None:  # a resumed checkpoint then replaces these weights
        for note in init_backbone(net, init):
            log(f"train: model.init: {note}")
    wrapped = ddp_lib.wrap(channels_last(net.to(device), device, cfg.compute.precision), ddp, device)
    model = ddp_lib.unwrap(wrapped)  # the same parameters; evaluation and saving use it directly
    forward = compiled(wrapped, cfg.compute.compile, cfg.compute.compile_backend)
    scaler = grad_scaler(device, cfg.compute.precision)
    for data in (train_data, val_data):
        data.place(device, cfg.compute.gpu_cache_gb * 2 ** 30)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    build = FeatureBuilder(cfg, device)
    ckpt_dir = out / "checkpoint"
    try:
        loaded = load_checkpoint(ckpt_dir, model, opt, fp)
    except DamagedCheckpoint as exc:  # checked before anything is loaded from it
        log(f"train: the checkpoint in {ckpt_dir} is damaged ({exc}); training this result from the start")
        loaded = None
    if loaded:
        state, best = loaded
        build.mean, build.std = best["feature_mean"].to(device), best["feature_std"].to(device)
        result.resumed_from = state["epoch"]
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log(f"train: resuming after epoch {state['epoch']} from {ckpt_dir}")
    else:
        state, best = {"fingerprint": fp, "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "history": []}, {}
        build.fit_statistics(train_data, cfg.compute.eval_batch_size)
    stats = {"feature_mean": build.mean, "feature_std": build.std}
    log(f"train: {len(tr_rows)} train / {len(va_rows)} val rows, {len(classes)} classes, on {device}"
        + (f" x {ddp.world} processes (DDP)" if ddp.active else "") + f", {train_data.placement}"
        + (f", {cfg.compute.precision}" if cfg.compute.precision != "fp32" else "")
        + (", compiled" if cfg.compute.compile else ""))
    board = None
    if cfg.log.tensorboard and ddp.is_main:
        from leakpipe.pipeline.engine import tboard

        board = tboard.writer(out / "tensorboard" / "train", purge_step=state["epoch"] + 1)
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if epoch - state["best_epoch"] > cfg.train.patience and state["best_epoch"]:
            break
        with progress(len(tr_rows), f"train: epoch {epoch}", enabled=ddp.is_main, leave=False) as bar:
            fit = train_epoch(wrapped, opt, train_data, build, epoch, cfg.train.batch_size, cfg.train.seed,
                              cfg.train.shuffle_chunks, cfg.train.grad_clip, bar, ddp,
                              cfg.train.time_dropout, cfg.train.entropy_penalty, cfg.compute.precision, scaler,
                              forward)
        recalibrate_batchnorm(model, train_data, build, cfg.train.batch_size, precision=cfg.compute.precision)
        val = predict(model, val_data, build, cfg.compute.eval_batch_size, cfg.compute.precision)
        auc = metrics.macro_auc(metrics.softmax(val["logits"]), va_y, len(classes))
        state["history"].append({"epoch": epoch, **fit, "val_macro_auc": auc,
                                 "val_acc": metrics.top1(val["logits"], va_y)})
        log(f"epoch {epoch}: loss {fit['loss']:.4f} acc {fit['acc']:.3f} val macro AUC {auc:.4f}")
        if board is not None:
            tboard.epoch(board, epoch, fit, val, auc, opt.param_groups[0]["lr"], cfg.diffusion.timesteps)
        is_best = auc > state["best_auc"]
        if is_best:
            state["best_auc"], state["best_epoch"] = auc, epoch
        state["epoch"], state["scaler"] = epoch, scaler.state_dict() if scaler.is_enabled() else {}
        if is_best:
            best = {k: v.detach().clone() for k, v in {**model.state_dict(), **stats}.items()}
        if ddp.is_main:  # every rank holds the same weights; one writes them
            save_checkpoint(ckpt_dir, model, opt, best, state)
        ddp.barrier()
    if board is not None:
        board.close()
    result.epochs, result.best_epoch, result.val_macro_auc = state["epoch"], state["best_epoch"], state["best_auc"]
    if not ddp.is_main:
        return
    save_tensors(out / "model.safetensors", best,
                 {"classes": classes, "config": cfg.to_dict(), "best_epoch": state["best_epoch"],
                  "latent_shape": list(train_data.latent_shape),
                  "val_macro_auc": state["best_auc"]})
    atomic_write_json(out / "history.json", state["history"])


def run(ws: Workspace, cfg: Config, run: str = "default", log=print) -> TrainResult:
    """Train the current config under run name `run` (or resume it, or restore a stored result, or
    do nothing) and point the name at the result. Embedding is the next stage (stages/embed.py)."""
    plan = graph.training(ws, cfg, run)
    verdict = plan.check(deep=True)
    if verdict.blocked:
        raise UserError(f"train {run}: {'; '.join(verdict.reasons)}; run `{verdict.blocked[0]}` first")
    out = plan.result
    result = TrainResult(run, out, _described(plan.latents))
    main = launched_rank() == 0  # under torchrun, rank 0 locks and writes
    with exclusive(out / ".writer.lock", f"result {out.name}") if main else nullcontext():
        if main:
            sweep_orphans(out)  # a killed writer's leftovers; none can be alive under this lock
        verdict = plan.check(deep=True)  # again, now that no other writer can change it
        if verdict.up_to_date:
            result.up_to_date = True
        elif verdict.restore:
            log(f"train {run}: restoring the stored result {out}: " + "; ".join(verdict.reasons[:-1]))
            result.restored = True
        else:
            kept = f"; its earlier result stays at {plan.current}" if plan.current and plan.current != out else ""
            log(f"train {run}: training because " + "; ".join(verdict.reasons) + kept)
            start = time.perf_counter()
            with shared(plan.latents.writer_lock, f"latent store {plan.latents.store}"):
                try:
                    _fit(plan.latents, cfg, out, plan.inputs.fingerprint(), result, log,
                         graph.init_file(ws, cfg) if cfg.model.init else None)
                except DamagedRows as exc:
                    raise plan.latents.report_damage(exc.rows, "train") from None
            result.seconds = time.perf_counter() - start
            if main:
                atomic_write_json(out / "config.json", cfg.to_dict())
                locks.write_lock(plan.lock, "train", plan.inputs,
                                 [out / "model.safetensors", out / "config.json", out / "history.json"],
                                 stores=[str(plan.latents.store)], vae=plan.latents.source.label,
                                 world_size=result.world_size)
                # only an unfinished training resumes from it; kept, it would quadruple every result
                shutil.rmtree(out / "checkpoint", ignore_errors=True)
        if main:
            runs.point(ws, run, out)
    return result
