"""Stage two: train Proto-LeakNet from the latent cache, then embed every encoded split."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.ledger import locks as ledger
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.config import TRAIN_SECTIONS, Config, load_config, section_hash
from leakpipe.pipeline.engine.ddp import launched_rank
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import hash_file
from leakpipe.pipeline.store.locking import exclusive
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import encode

CODE_VERSION = "train-2"  # 2: early stopping on the macro AUC of pi, not of logits
EMBED_VERSION = "embed-1"


@dataclass
class TrainResult:
    run: str
    run_dir: Path
    up_to_date: bool = False
    epochs: int = 0
    best_epoch: int = 0
    val_macro_auc: float = float("nan")
    resumed_from: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return f"train {self.run}: up to date, nothing to do -> {self.run_dir}"
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return (f"train {self.run}: {self.epochs} epochs{resumed} in {self.seconds:.0f} s; best epoch "
                f"{self.best_epoch}, validation macro AUC {self.val_macro_auc:.4f} -> "
                f"{self.run_dir / 'model.safetensors'}")


def run_dir(ws: Workspace, run: str) -> Path:
    return ws.cache / "runs" / run


def upstream(ws: Workspace, split: str, cfg: Config):
    """The split's encode plan and lock; raises if stage one is not up to date for it."""
    p = encode.plan(ws, split, cfg)
    up, reasons = encode.state(p)
    if not up:
        raise UserError(f"the latent cache of {split!r} is not up to date ({'; '.join(reasons)}); "
                        f"run `leakpipe encode --split {split}` first")
    return p, ledger.read_lock(p.lock)


def train_inputs(enc_lock: dict, cfg: Config) -> dict:
    return {"latents": enc_lock["fingerprint"], "config": section_hash(cfg, *TRAIN_SECTIONS),
            "code": CODE_VERSION}


def _rows(p, classes=None):
    """(train rows, train labels, val rows, val labels, classes) of the valid rows."""
    import numpy as np

    from leakpipe.pipeline.store import latent_store

    valid = latent_store.valid_rows(latent_store.open_store(p.store), latent_store.hash_rows(p.file_hashes))
    rows = p.manifest.rows
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
    if len(classes) < 2 or len(out[0]) == 0 or len(out[2]) == 0:
        raise UserError(f"{p.manifest.source}: training needs >= 2 classes with train rows and some "
                        f"val rows; found {len(classes)} classes, {len(out[0])} train, {len(out[2])} val")
    return (*out, classes)


def build_model(cfg: Config, n_classes: int):
    from leakpipe.pipeline.nn.model import ProtoLeakNet

    m = cfg.model
    return ProtoLeakNet(n_classes, 2 * 4, m.backbone, m.embed_dim, m.prototypes,
                        m.prototypes_per_class, m.gating, m.tau, m.tau_learnable)


def _fit(p, cfg: Config, out: Path, fp: str, result: TrainResult, log) -> None:
    import torch
    from tqdm import tqdm

    from leakpipe.pipeline.math import metrics
    from leakpipe.pipeline.store.checkpoint import load_checkpoint, load_tensors, save_checkpoint, save_tensors
    from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
    from leakpipe.pipeline.engine import ddp as ddp_lib
    from leakpipe.pipeline.engine.training import predict, recalibrate_batchnorm, train_epoch

    tr_rows, tr_y, va_rows, va_y, classes = _rows(p)
    budget = cfg.compute.memory_budget_gb * 2 ** 30
    train_data, val_data = (LatentRows(p.store, r, y, budget / 2) for r, y in ((tr_rows, tr_y), (va_rows, va_y)))
    side = min(train_data.latent_shape[-2:])
    if cfg.features.dct_k > side:
        raise UserError(f"features.dct_k = {cfg.features.dct_k} exceeds the latent side {side} of "
                        f"{p.store}; lower features.dct_k or encode larger images (preprocess.size)")
    ddp, device = ddp_lib.setup(cfg.compute.device)
    log = log if ddp.is_main else (lambda msg: None)
    torch.manual_seed(cfg.train.seed)
    wrapped = ddp_lib.wrap(build_model(cfg, len(classes)).to(device), ddp, device)
    model = ddp_lib.unwrap(wrapped)  # the same parameters; evaluation and saving use it directly
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    build = FeatureBuilder(cfg, device)
    ckpt_dir = out / "checkpoint"
    loaded = load_checkpoint(ckpt_dir, model, opt) if (ckpt_dir / "checkpoint.json").exists() and \
        json.loads((ckpt_dir / "checkpoint.json").read_text()).get("fingerprint") == fp else None
    if loaded:
        state, extra = loaded
        build.mean, build.std = extra["feature_mean"].to(device), extra["feature_std"].to(device)
        result.resumed_from = state["epoch"]
        log(f"train: resuming after epoch {state['epoch']} from {ckpt_dir}")
    else:
        state = {"fingerprint": fp, "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "history": []}
        build.fit_statistics(train_data, cfg.compute.eval_batch_size)
    stats = {"feature_mean": build.mean, "feature_std": build.std}
    log(f"train: {len(tr_rows)} train / {len(va_rows)} val rows, {len(classes)} classes, on {device}"
        + (f" x {ddp.world} processes (DDP)" if ddp.active else "")
        + ("" if train_data.in_memory else " (streaming latents by chunk)"))
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if epoch - state["best_epoch"] > cfg.train.patience and state["best_epoch"]:
            break
        with tqdm(total=len(tr_rows), unit="img", desc=f"epoch {epoch}", disable=None if ddp.is_main else True,
                  leave=False) as bar:
            fit = train_epoch(wrapped, opt, train_data, build, epoch, cfg.train.batch_size, cfg.train.seed,
                              cfg.train.shuffle_chunks, cfg.train.grad_clip, bar, ddp)
        recalibrate_batchnorm(model, train_data, build, cfg.train.batch_size)
        val = predict(model, val_data, build, cfg.compute.eval_batch_size)
        auc = metrics.macro_auc(metrics.softmax(val["logits"]), va_y, len(classes))
        state["history"].append({"epoch": epoch, **fit, "val_macro_auc": auc,
                                 "val_acc": metrics.top1(val["logits"], va_y)})
        log(f"epoch {epoch}: loss {fit['loss']:.4f} acc {fit['acc']:.3f} val macro AUC {auc:.4f}")
        best = auc > state["best_auc"]
        if best:
            state["best_auc"], state["best_epoch"] = auc, epoch
        state["epoch"] = epoch
        if ddp.is_main:  # every rank holds the same weights; one writes them
            if best:
                save_tensors(ckpt_dir / "best.safetensors", {**model.state_dict(), **stats})
            save_checkpoint(ckpt_dir, model, opt, stats, state)
        ddp.barrier()
    result.epochs, result.best_epoch, result.val_macro_auc = state["epoch"], state["best_epoch"], state["best_auc"]
    if not ddp.is_main:
        return
    tensors, _ = load_tensors(ckpt_dir / "best.safetensors")
    save_tensors(out / "model.safetensors", tensors,
                 {"classes": classes, "config": cfg.to_dict(), "best_epoch": state["best_epoch"],
                  "val_macro_auc": state["best_auc"]})
    atomic_write_json(out / "history.json", state["history"])


def run(ws: Workspace, cfg: Config, run: str = "default", log=print) -> TrainResult:
    """Train (or resume, or do nothing) run `run`, then embed every encoded split."""
    p, enc_lock = upstream(ws, cfg.train.split, cfg)
    out = run_dir(ws, run)
    result = TrainResult(run, out)
    inputs = train_inputs(enc_lock, cfg)
    lock_path = out / "train.lock.json"
    main = launched_rank() == 0  # under torchrun, rank 0 locks and writes
    with exclusive(out / ".writer.lock", f"run {run}") if main else nullcontext():
        up, reasons = ledger.stage_state(lock_path, inputs)
        if up:
            result.up_to_date = True
        else:
            if ledger.read_lock(lock_path) is not None:
                log(f"train {run}: retraining because " + "; ".join(reasons))
            start = time.perf_counter()
            _fit(p, cfg, out, ledger.fingerprint(inputs), result, log)
            result.seconds = time.perf_counter() - start
            if main:
                atomic_write_json(out / "config.json", cfg.to_dict())
                ledger.write_lock(lock_path, "train", inputs,
                                  [out / "model.safetensors", out / "config.json", out / "history.json"],
                                  stores=[str(p.store)], run=run)
        if main:
            embed_all(ws, run, log)
    return result


# ---------------------------------------------------------------- embeddings
def run_config(out: Path) -> Config:
    """The config a run was trained with (config.json), as a Config."""
    cfg = load_config()
    for section, values in json.loads((out / "config.json").read_text()).items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def load_trained(out: Path, device):
    """(model in eval mode, FeatureBuilder with its statistics, classes, config) of a finished run."""
    from leakpipe.pipeline.store.checkpoint import load_tensors
    from leakpipe.pipeline.engine.data import FeatureBuilder

    if not (out / "model.safetensors").exists():
        raise UserError(f"no trained model in {out}; run `leakpipe train --run {out.name}` first")
    cfg = run_config(out)
    tensors, meta = load_tensors(out / "model.safetensors")
    model = build_model(cfg, len(meta["classes"]))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("feature_")})
    build = FeatureBuilder(cfg, device, tensors["feature_mean"].to(device), tensors["feature_std"].to(device))
    return model.to(device).eval(), build, meta["classes"], cfg


def embed_inputs(out: Path, enc_lock: dict, cfg: Config) -> dict:
    return {"model": hash_file(out / "model.safetensors"), "latents": enc_lock["fingerprint"],
            "eval_seed": cfg.train.eval_seed, "code": EMBED_VERSION}


def embed_all(ws: Workspace, run: str, log=print, splits=None) -> list[str]:
    """Embed every split (or `splits`) whose latents are encoded for the run's encoder and whose
    embeddings are missing or stale. Returns the splits it embedded."""
    from leakpipe.pipeline.store import embeddings
    from leakpipe.pipeline.store import latent_store
    from leakpipe.pipeline.engine.data import LatentRows
    from leakpipe.pipeline.engine.training import predict
    from leakpipe.pipeline.engine.vae import resolve_device

    out = run_dir(ws, run)
    cfg = run_config(out)
    done, model = [], None
    for split in splits or ws.splits():
        try:
            p, enc_lock = upstream(ws, split, cfg)
        except UserError as exc:
            log(f"embed {split}: skipped: {exc}")
            continue
        target = out / "embeddings" / f"{split}.zarr"
        lock_path = target.with_name(f"{split}.lock.json")
        inputs = embed_inputs(out, enc_lock, cfg)
        if ledger.stage_state(lock_path, inputs)[0]:
            continue
        if model is None:
            device = resolve_device(cfg.compute.device)
            model, build, classes, _ = load_trained(out, device)
        want = latent_store.hash_rows(p.file_hashes)
        rows = latent_store.valid_rows(latent_store.open_store(p.store), want).nonzero()[0]
        data = LatentRows(p.store, rows, rows * 0, cfg.compute.memory_budget_gb * 2 ** 30)
        outputs = predict(model, data, build, cfg.compute.eval_batch_size)
        embeddings.write(target, len(want), rows, outputs,
                         {"split": split, "classes": classes, "timesteps": cfg.diffusion.timesteps,
                          "model": inputs["model"], "latents": inputs["latents"], "run": run})
        ledger.write_lock(lock_path, "embed", inputs, target, split=split, run=run)
        log(f"embed {split}: {len(rows)} of {len(want)} rows -> {target}")
        done.append(split)
    return done


def status(ws: Workspace, run: str) -> tuple[bool, list[str]]:
    out = run_dir(ws, run)
    cfg = run_config(out)
    try:
        _, enc_lock = upstream(ws, cfg.train.split, cfg)
    except UserError as exc:
        return False, [str(exc)]
    up, reasons = ledger.stage_state(out / "train.lock.json", train_inputs(enc_lock, cfg))
    return up, reasons


def runs(ws: Workspace) -> list[str]:
    return sorted(p.parent.name for p in (ws.cache / "runs").glob("*/train.lock.json"))
