"""Fitting the model: the epoch loop of stage two around `training.train_epoch`, with validation,
the weights kept (train.select), the k-means placement of the prototypes and checkpoints that resume
bitwise. Everything here defines the trained weights, so all of it is part of the train stage's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine import ddp as ddp_lib
from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
from leakpipe.pipeline.engine.precision import channels_last, compiled, grad_scaler
from leakpipe.pipeline.engine.trained import build_model, init_backbone
from leakpipe.pipeline.engine.training import WeightAverage, predict, recalibrate_batchnorm, train_epoch
from leakpipe.pipeline.engine.variants import with_variants
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.manifest import Manifest
from leakpipe.pipeline.math import features, metrics
from leakpipe.pipeline.math.kmeans import class_centres
from leakpipe.pipeline.progress import progress
from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.store.checkpoint import DamagedCheckpoint, load_checkpoint, save_checkpoint, save_tensors


class Source(Protocol):
    """The latents of a split, as the ledger describes them (graph.Latents)."""

    store: str
    manifest: Manifest
    file_hashes: list[str]


@dataclass
class Fitted:
    epochs: int = 0
    best_epoch: int = 0
    val_macro_auc: float = float("nan")
    resumed_from: int = 0
    world_size: int = 1  # processes that trained it (torchrun); recorded, not fingerprinted


def rows_of(lat: Source, exclude=(), classes=None):
    """(train rows, train labels, val rows, val labels, classes) of the valid rows whose labels are not
    in `exclude`."""
    valid = latent_store.valid_rows(latent_store.open_store(lat.store), latent_store.hash_rows(lat.file_hashes))
    rows = lat.manifest.rows
    labels = {r["label"] for r in rows}
    absent = [g for g in exclude if g not in labels]
    if absent:
        raise UserError(
            f"train.exclude names {', '.join(absent)}, which {lat.manifest.source} does not label; "
            f"its labels are {', '.join(sorted(labels))}"
        )
    valid = valid & np.array([r["label"] not in exclude for r in rows], bool)  # held out: never trained on
    classes = classes or sorted({r["label"] for r, ok in zip(rows, valid) if ok and r["partition"] == "train"})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for part in ("train", "val"):
        sel = [i for i, r in enumerate(rows) if valid[i] and r["partition"] == part]
        unknown = sorted({rows[i]["label"] for i in sel} - index.keys())
        if unknown:
            raise UserError(
                f"{lat.manifest.source}: {part} rows have labels with no training rows: {', '.join(unknown)}"
            )
        out += [np.array(sel, np.int64), np.array([index[rows[i]["label"]] for i in sel], np.int64)]
    val_classes = sorted({classes[k] for k in out[3]})
    if len(out[2]) and len(val_classes) < 2:
        raise UserError(
            f"{lat.manifest.source}: the val partition has rows of only 1 class ({val_classes[0]}); "
            "early stopping uses the validation macro AUC, which needs at least 2 classes. "
            "Give the val partition images of several generators (manifest build --ratios)."
        )
    if len(classes) < 2 or len(out[0]) == 0 or len(out[2]) == 0:
        raise UserError(
            f"{lat.manifest.source}: training needs >= 2 classes with train rows and some "
            f"val rows; found {len(classes)} classes, {len(out[0])} train, {len(out[2])} val"
        )
    return (*out, classes)


def fit(lat: Source, cfg: Config, out: Path, fp: str, log, init: Path | None, variants: Source | None = None) -> Fitted:
    """Train the model of `cfg` on the train and val rows of `lat` into the result folder `out`
    (model.safetensors, history.json), resuming from out/checkpoint when it holds training `fp`; with
    `variants` (train.variants), each training image drawn per epoch from itself and its variants."""
    result = Fitted()
    tc = cfg.train
    tr_rows, tr_y, va_rows, va_y, classes = rows_of(lat, tc.exclude)
    share = cfg.compute.memory_budget_gb * 2**30 / (3 if variants else 2)
    train_data, val_data = (LatentRows(lat.store, r, y, share) for r, y in ((tr_rows, tr_y), (va_rows, va_y)))
    if variants is not None:
        # VariantRows reads as LatentRows does (the same methods), drawing a variant per image and epoch
        train_data = with_variants(train_data, lat, tr_rows, variants, tc.variant_p, share)  # type: ignore[assignment]
    _check_sizes(cfg, lat.store, train_data.latent_shape)
    ddp, device = ddp_lib.setup(cfg.compute.device)
    log = log if ddp.is_main else (lambda msg: None)
    result.world_size = ddp.world
    torch.manual_seed(tc.seed)
    net = build_model(cfg, len(classes), train_data.latent_shape)
    if init is not None:  # a resumed checkpoint then replaces these weights
        for note in init_backbone(net, init):
            log(f"train: model.init: {note}")
    wrapped = ddp_lib.wrap(channels_last(net.to(device), device, cfg.compute.precision), ddp, device)
    model = ddp_lib.unwrap(wrapped)  # the same parameters; evaluation and saving use it directly
    forward = compiled(wrapped, cfg.compute.compile, cfg.compute.compile_backend)
    scaler = grad_scaler(device, cfg.compute.precision)
    for data in (train_data, val_data):
        data.place(device, cfg.compute.gpu_cache_gb * 2**30)
    opt = optimizer(model, tc)
    build = FeatureBuilder(cfg, device)
    ckpt_dir = out / "checkpoint"
    try:
        loaded = load_checkpoint(ckpt_dir, model, opt, fp)
    except DamagedCheckpoint as exc:  # checked before anything is loaded from it
        log(f"train: the checkpoint in {ckpt_dir} is damaged ({exc}); training this result from the start")
        loaded = None
    steps = train_data.n_batches(tc.batch_size, tc.seed * 1_000_003 + 1, tc.shuffle_chunks)
    average = None
    if loaded:
        state, best, extra = loaded
        build.mean, build.std = best["feature_mean"].to(device), best["feature_std"].to(device)
        result.resumed_from = state["epoch"]
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if tc.ema_half_life:
            average = WeightAverage(model, tc.ema_half_life * steps, {k: v.to(device) for k, v in extra["ema"].items()})
        log(f"train: resuming after epoch {state['epoch']} from {ckpt_dir}")
    else:
        state = {
            "fingerprint": fp,
            "epoch": 0,
            "best_score": -float("inf"),
            "best_auc": -1.0,
            "best_epoch": 0,
            "history": [],
            "prototypes_placed": False,
        }
        best = {}
        build.fit_statistics(train_data, cfg.compute.eval_batch_size)
        average = WeightAverage(model, tc.ema_half_life * steps) if tc.ema_half_life else None
    build.fix_dct(train_data.latent_shape)
    stats = build.saved()  # saved with the model: embed and attribute use these, not today's code
    log(
        f"train: {len(tr_rows)} train / {len(va_rows)} val rows, {len(classes)} classes, on {device}"
        + (f" x {ddp.world} processes (DDP)" if ddp.active else "")
        + f", {train_data.placement}"
        + (f", {cfg.compute.precision}" if cfg.compute.precision != "fp32" else "")
        + (", compiled" if cfg.compute.compile else "")
    )
    log(latent_scale_note(cfg, build, train_data.latent_shape[0]))
    board = None
    if cfg.log.tensorboard and ddp.is_main:
        from leakpipe.pipeline.engine import tboard  # optional: needs leakpipe[tensorboard]

        board = tboard.writer(out / "tensorboard" / "train", purge_step=state["epoch"] + 1)
    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        if tc.select != "last" and state["best_epoch"] and epoch - state["best_epoch"] > tc.patience:
            break
        with progress(len(tr_rows), f"train: epoch {epoch}", enabled=ddp.is_main, leave=False) as bar:
            fit = train_epoch(
                wrapped, opt, train_data, build, tc, epoch, bar, ddp, cfg.compute.precision, scaler, forward, average
            )
        _check_finite(fit["loss"], "training loss", epoch, cfg, device)
        if _prototypes_due(cfg, state, epoch):
            log(f"train: {_place_prototypes(model, opt, average, train_data, build, cfg)}")
            state["prototypes_placed"] = True
        line = f"epoch {epoch}: loss {fit['loss']:.4f} acc {fit['acc']:.3f}"
        if not _validation_due(cfg, epoch):
            state["history"].append({"epoch": epoch, **fit})
            log(line)
        else:
            evaluated = average.averaged(model) if average is not None else model
            record, val = _validate(evaluated, train_data, val_data, build, cfg, len(classes), epoch)
            state["history"].append({"epoch": epoch, **fit, **record})
            log(f"{line} val loss {record['val_loss']:.4f} val macro AUC {record['val_macro_auc']:.4f}")
            if board is not None:
                tboard.epoch(board, epoch, fit, val, record["val_macro_auc"], fit["lr"], cfg.diffusion.timesteps)
            score = {"last": epoch, "val_auc": record["val_macro_auc"], "val_loss": -record["val_loss"]}[tc.select]
            if score > state["best_score"]:
                state["best_score"], state["best_auc"], state["best_epoch"] = score, record["val_macro_auc"], epoch
                best = {k: v.detach().clone() for k, v in {**evaluated.state_dict(), **stats}.items()}
        state["epoch"], state["scaler"] = epoch, scaler.state_dict() if scaler.is_enabled() else {}
        if ddp.is_main:  # every rank holds the same weights; one writes them
            save_checkpoint(ckpt_dir, model, opt, best, state, {"ema": average.state()} if average else {})
        ddp.barrier()
    if board is not None:
        board.close()
    result.epochs, result.best_epoch, result.val_macro_auc = state["epoch"], state["best_epoch"], state["best_auc"]
    if not ddp.is_main:
        return result
    save_tensors(
        out / "model.safetensors",
        best,
        {
            "classes": classes,
            "config": cfg.to_dict(),
            "best_epoch": state["best_epoch"],
            "latent_shape": list(train_data.latent_shape),
            "val_macro_auc": state["best_auc"],
        },
    )
    atomic_write_json(out / "history.json", state["history"])
    return result


def optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW with train.lr and train.weight_decay over the model's parameters."""
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def _check_sizes(cfg: Config, store: str, latent_shape: tuple) -> None:
    side = min(latent_shape[-2:])
    if cfg.train.crop >= side:
        raise UserError(
            f"train.crop = {cfg.train.crop} is not smaller than the side {side} of the z0 in {store}; "
            "lower train.crop, or set it to 0 to train on z0 whole"
        )
    seen = f"train.crop = {cfg.train.crop}" if cfg.train.crop else f"the latent side {side} of {store}"
    if cfg.features.dct_k > (cfg.train.crop or side):
        raise UserError(
            f"features.dct_k = {cfg.features.dct_k} exceeds {seen}; lower features.dct_k, or train "
            "on larger crops or images (train.crop, preprocess.size)"
        )


# Measured with torch 2.13 under ONEDNN_MAX_CPU_ISA=AVX512_CORE (and seen on a CI machine): the same
# seeded bf16 run gave a different loss in most runs and NaN in 2 of 6. The cause, found layer by
# layer, is the weight gradient of a 3 x 3 stride-2 convolution whose input map is 1 x 1.
CPU_HALF_NOTE = (
    "On a CPU without native bf16/fp16 instructions (AVX512_BF16, AMX) oneDNN emulates them, and with "
    "torch 2.13 its emulated weight gradient of a 3 x 3 stride-2 convolution on a 1 x 1 map reads "
    "uninitialised memory: a ResNet meets such maps on z0 of side 16 or less with model.stem = imagenet, "
    "or 4 or less with model.stem = small. "
)


def _check_finite(values, what: str, epoch: int, cfg: Config, device: torch.device) -> None:
    """Stop, saying what to do, when training diverged (NaN or inf), before a checkpoint keeps it."""
    if np.isfinite(values).all():
        return
    note = CPU_HALF_NOTE if device.type == "cpu" and cfg.compute.precision != "fp32" else ""
    raise UserError(
        f"train: epoch {epoch} gave a non-finite {what} under compute.precision = {cfg.compute.precision} on "
        f"{device}; nothing of epoch {epoch} was saved. {note}"
        "Rerun with compute.precision = fp32, or with a lower train.lr"
    )


def _validate(model, train_data, val_data, build, cfg: Config, n_classes: int, epoch: int) -> tuple[dict, dict]:
    """Precise BatchNorm statistics on the training rows, then the validation cross-entropy, macro AUC
    and top-1 of `model` (the averaged weights under train.ema_half_life), and its outputs."""
    recalibrate_batchnorm(model, train_data, build, cfg.train.batch_size, precision=cfg.compute.precision)
    val = predict(model, val_data, build, cfg.compute.eval_batch_size, cfg.compute.precision)
    _check_finite(val["logits"], "validation output", epoch, cfg, build.device)
    y = val_data.labels
    loss = float(F.cross_entropy(torch.from_numpy(val["logits"]).double(), torch.from_numpy(y)))
    auc = metrics.point(metrics.macro_auc, metrics.softmax(val["logits"]), y)
    return {
        "val_loss": loss,
        "val_macro_auc": auc,
        "val_acc": metrics.point(metrics.top1, val["logits"].argmax(1) == y),
    }, val


def _validation_due(cfg: Config, epoch: int) -> bool:
    """Whether epoch `epoch` is validated: every epoch under train.select = val_loss | val_auc (the choice
    needs it); under last, every log.validate_every epochs and the last, whose weights are kept. The
    weights never depend on it: validation evaluates a copy (or only resets BatchNorm statistics)."""
    every = cfg.log.validate_every
    return cfg.train.select != "last" or epoch == cfg.train.epochs or (every > 0 and epoch % every == 0)


def _prototypes_due(cfg: Config, state: dict, epoch: int) -> bool:
    """model.prototype_init = kmeans places the prototypes once, after the warm-up (at least one
    epoch), when epochs remain to train them."""
    return (
        cfg.model.prototypes
        and cfg.model.prototype_init == "kmeans"
        and not state["prototypes_placed"]
        and epoch == max(1, cfg.train.warmup_epochs)
        and epoch < cfg.train.epochs
    )


def _place_prototypes(model, opt, average, train_data, build, cfg: Config) -> str:
    """Each class's prototypes at the k-means centres of its training embeddings h_bar (with precise
    BatchNorm statistics first); their optimiser state and weight average start again from there."""
    recalibrate_batchnorm(model, train_data, build, cfg.train.batch_size, precision=cfg.compute.precision)
    h = predict(model, train_data, build, cfg.compute.eval_batch_size, cfg.compute.precision)["h_bar"]
    n_classes, m = model.prototypes.shape[:2]
    centres = class_centres(h, train_data.labels, n_classes, m, cfg.train.seed)
    with torch.no_grad():
        model.prototypes.copy_(torch.from_numpy(centres).to(model.prototypes))
    opt.state.pop(model.prototypes, None)
    if average is not None:
        average.reset("prototypes", model.prototypes)
    model.train()
    return f"prototypes placed at the k-means centres ({m} per class) of the training embeddings"


def latent_scale_note(cfg: Config, build: FeatureBuilder, channels: int) -> str:
    """How large the noise of the largest timestep is against z0 (after latent.scale), and the scale that
    would give z0 unit variance when that noise is more than a quarter of it."""
    spread = features.z0_spread(build.mean, build.std, channels, build.alpha, build.sigma)
    ratio = float(build.sigma.max()) / max(spread, 1e-12)
    head = f"train: z0 after latent.scale = {cfg.latent.scale:g} has std {spread:.3g}"
    if not cfg.diffusion.noise:
        return head + "; no noise is added (diffusion.noise = false)"
    note = head + f"; the noise at t = {max(cfg.diffusion.timesteps)} is {ratio:.2f} of it"
    if ratio <= 0.25:
        return note
    return note + (
        f". A VAE's scale should give z0 unit variance (SD2.1's 0.18215 does for its VAE); for this VAE "
        f"latent.scale = {cfg.latent.scale / spread:.3g} would give its z0 unit variance and keep the noise of "
        f"t = {max(cfg.diffusion.timesteps)} at {float(build.sigma.max()):.2f} of it "
        f"(--set latent.scale={cfg.latent.scale / spread:.3g})."
    )
