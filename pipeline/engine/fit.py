"""Fitting the model: the epoch loop of stage two around `training.train_epoch`, with validation,
the weights kept (train.select), the k-means placement of the prototypes and checkpoints that resume
bitwise. Everything here defines the trained weights, so all of it is part of the train stage's code.
"""

from __future__ import annotations

import time
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
    run = _Recipe(cfg, out, fp, log)
    run.setup_data(lat, variants)
    run.setup_model(init)  # seeds torch, then builds: the order fixes the weights' first draw
    run.setup_state()
    run.announce()
    for epoch in range(run.state["epoch"] + 1, cfg.train.epochs + 1):
        if run.stops_early(epoch):
            break
        run.epoch(epoch)
    return run.finish()


class _Recipe:
    """One training of `fit`, set up in phases (data, model, state: fresh or resumed) that each read
    what the earlier ones made, then stepped an epoch at a time; torchtune's recipe layout."""

    def __init__(self, cfg: Config, out: Path, fp: str, log):
        self.cfg, self.tc, self.out, self.fp, self.log = cfg, cfg.train, out, fp, log
        self.result, self.ckpt_dir, self.board = Fitted(), out / "checkpoint", None
        self.saved_at = time.monotonic()  # of the last checkpoint, or the start

    def setup_data(self, lat: Source, variants: Source | None) -> None:
        """The train and val rows of `lat` as LatentRows, their share of compute.memory_budget_gb each."""
        cfg, tc = self.cfg, self.tc
        self.tr_rows, tr_y, self.va_rows, va_y, self.classes = rows_of(lat, tc.exclude)
        share = cfg.compute.memory_budget_gb * 2**30 / (3 if variants else 2)
        pairs = ((self.tr_rows, tr_y), (self.va_rows, va_y))
        self.train_data, self.val_data = (LatentRows(lat.store, r, y, share) for r, y in pairs)
        if variants is not None:
            # VariantRows reads as LatentRows does (the same methods), drawing a variant per image and epoch
            self.train_data = with_variants(  # type: ignore[assignment]
                self.train_data, lat, self.tr_rows, variants, tc.variant_p, share
            )
        _check_sizes(cfg, lat.store, self.train_data.latent_shape)

    def setup_model(self, init: Path | None) -> None:
        """The processes (DDP), the model seeded by train.seed (model.init loaded), placed, compiled,
        its optimiser, gradient scaler and feature path; the data placed on the device."""
        cfg, tc = self.cfg, self.tc
        self.ddp, self.device = ddp_lib.setup(cfg.compute.device)
        self.log = self.log if self.ddp.is_main else (lambda msg: None)
        self.result.world_size = self.ddp.world
        torch.manual_seed(tc.seed)
        net = build_model(cfg, len(self.classes), self.train_data.latent_shape)
        if init is not None:  # a resumed checkpoint then replaces these weights
            for note in init_backbone(net, init):
                self.log(f"train: model.init: {note}")
        self.wrapped = ddp_lib.wrap(
            channels_last(net.to(self.device), self.device, cfg.compute.precision), self.ddp, self.device
        )
        self.model = ddp_lib.unwrap(self.wrapped)  # the same parameters; evaluation and saving use it directly
        self.forward = compiled(self.wrapped, cfg.compute.compile, cfg.compute.compile_backend)
        self.scaler = grad_scaler(self.device, cfg.compute.precision)
        for data in (self.train_data, self.val_data):
            data.place(self.device, cfg.compute.gpu_cache_gb * 2**30)
        self.opt = optimizer(self.model, tc)
        self.build = FeatureBuilder(cfg, self.device)

    def setup_state(self) -> None:
        """The state to start from: out/checkpoint's when it holds this training (and is undamaged), else
        a fresh one with the feature statistics of the training rows; the weight average either way."""
        tc, device = self.tc, self.device
        try:
            loaded = load_checkpoint(self.ckpt_dir, self.model, self.opt, self.fp)
        except DamagedCheckpoint as exc:  # checked before anything is loaded from it
            self.log(
                f"train: the checkpoint in {self.ckpt_dir} is damaged ({exc}); training this result from the start"
            )
            loaded = None
        steps = self.train_data.n_batches(tc.batch_size, tc.seed * 1_000_003 + 1, tc.shuffle_chunks)
        self.average = None
        if loaded:
            self.state, self.best, extra = loaded
            self.build.mean, self.build.std = self.best["feature_mean"].to(device), self.best["feature_std"].to(device)
            self.result.resumed_from = self.state["epoch"]
            if self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])
            if tc.ema_half_life:
                ema = {k: v.to(device) for k, v in extra["ema"].items()}
                self.average = WeightAverage(self.model, tc.ema_half_life * steps, ema)
            self.log(f"train: resuming after epoch {self.state['epoch']} from {self.ckpt_dir}")
        else:
            self.state = {
                "fingerprint": self.fp,
                "epoch": 0,
                "best_score": -float("inf"),
                "best_auc": -1.0,
                "best_epoch": 0,
                "history": [],
                "prototypes_placed": False,
            }
            self.best = {}
            self.build.fit_statistics(self.train_data, self.cfg.compute.eval_batch_size)
            self.average = WeightAverage(self.model, tc.ema_half_life * steps) if tc.ema_half_life else None
        self.build.fix_dct(self.train_data.latent_shape)
        self.stats = self.build.saved()  # saved with the model: embed and attribute use these, not today's code

    def announce(self) -> None:
        """What trains where, in the log; the TensorBoard writer when log.tensorboard asks for one."""
        cfg, ddp = self.cfg, self.ddp
        self.log(
            f"train: {len(self.tr_rows)} train / {len(self.va_rows)} val rows, {len(self.classes)} classes, "
            f"on {self.device}"
            + (f" x {ddp.world} processes (DDP)" if ddp.active else "")
            + f", {self.train_data.placement}"
            + (f", {cfg.compute.precision}" if cfg.compute.precision != "fp32" else "")
            + (", compiled" if cfg.compute.compile else "")
        )
        self.log(latent_scale_note(cfg, self.build, self.train_data.latent_shape[0]))
        if cfg.log.tensorboard and ddp.is_main:
            from leakpipe.pipeline.engine import tboard  # optional: needs leakpipe[tensorboard]

            self.board = tboard.writer(self.out / "tensorboard" / "train", purge_step=self.state["epoch"] + 1)

    def stops_early(self, epoch: int) -> bool:
        """train.patience epochs without a better kept epoch (never with train.select = last)."""
        best_epoch = self.state["best_epoch"]
        return self.tc.select != "last" and bool(best_epoch) and epoch - best_epoch > self.tc.patience

    def epoch(self, epoch: int) -> None:
        """One epoch: train, place the prototypes when due, validate when due (keeping the weights
        train.select prefers), then the checkpoint."""
        cfg, tc, state = self.cfg, self.tc, self.state
        with progress(len(self.tr_rows), f"train: epoch {epoch}", enabled=self.ddp.is_main, leave=False) as bar:
            fit = train_epoch(
                self.wrapped,
                self.opt,
                self.train_data,
                self.build,
                tc,
                epoch,
                bar,
                self.ddp,
                cfg.compute.precision,
                self.scaler,
                self.forward,
                self.average,
            )
        _check_finite(fit["loss"], "training loss", epoch, cfg, self.device)
        if _prototypes_due(cfg, state, epoch):
            self.log(
                f"train: {_place_prototypes(self.model, self.opt, self.average, self.train_data, self.build, cfg)}"
            )
            state["prototypes_placed"] = True
        line = f"epoch {epoch}: loss {fit['loss']:.4f} acc {fit['acc']:.3f}"
        if not _validation_due(cfg, epoch):
            state["history"].append({"epoch": epoch, **fit})
            self.log(line)
        else:
            self.validate(epoch, fit, line)
        state["epoch"], state["scaler"] = epoch, self.scaler.state_dict() if self.scaler.is_enabled() else {}
        # every rank holds the same weights; one writes them. After the last epoch the result is written at
        # once and its checkpoint removed unread: a kill before that redoes the last epoch, bitwise the same
        if self.ddp.is_main and epoch < tc.epochs and self.checkpoint_due():
            ema = {"ema": self.average.state()} if self.average else {}
            save_checkpoint(self.ckpt_dir, self.model, self.opt, self.best, state, ema)
            self.saved_at = time.monotonic()
        self.ddp.barrier()

    def checkpoint_due(self) -> bool:
        """After every epoch but the last (log.checkpoint_seconds = 0), else once that long has passed since the last
        checkpoint or the start: a kill then loses at most that much training, redone bitwise on resume,
        and short epochs do not each pay for writing the whole state (a quarter of the demo's training)."""
        return time.monotonic() - self.saved_at >= self.cfg.log.checkpoint_seconds

    def validate(self, epoch: int, fit: dict, line: str) -> None:
        """Validate the evaluated weights (the average, if any); keep them when train.select scores them best."""
        cfg, state = self.cfg, self.state
        evaluated = self.average.averaged(self.model) if self.average is not None else self.model
        record, val = _validate(evaluated, self.train_data, self.val_data, self.build, cfg, len(self.classes), epoch)
        state["history"].append({"epoch": epoch, **fit, **record})
        self.log(f"{line} val loss {record['val_loss']:.4f} val macro AUC {record['val_macro_auc']:.4f}")
        if self.board is not None:
            from leakpipe.pipeline.engine import tboard  # optional: needs leakpipe[tensorboard]

            tboard.epoch(self.board, epoch, fit, val, record["val_macro_auc"], fit["lr"], cfg.diffusion.timesteps)
        score = {"last": epoch, "val_auc": record["val_macro_auc"], "val_loss": -record["val_loss"]}[self.tc.select]
        if score > state["best_score"]:
            state["best_score"], state["best_auc"], state["best_epoch"] = score, record["val_macro_auc"], epoch
            self.best = {k: v.detach().clone() for k, v in {**evaluated.state_dict(), **self.stats}.items()}

    def finish(self) -> Fitted:
        """The kept weights with what reads them (classes, config, z0's shape), and history.json."""
        state, result = self.state, self.result
        if self.board is not None:
            self.board.close()
        result.epochs, result.best_epoch, result.val_macro_auc = state["epoch"], state["best_epoch"], state["best_auc"]
        if not self.ddp.is_main:
            return result
        save_tensors(
            self.out / "model.safetensors",
            self.best,
            {
                "classes": self.classes,
                "config": self.cfg.to_dict(),
                "best_epoch": state["best_epoch"],
                "latent_shape": list(self.train_data.latent_shape),
                "val_macro_auc": state["best_auc"],
            },
        )
        atomic_write_json(self.out / "history.json", state["history"])
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
