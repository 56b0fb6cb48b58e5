"""One training epoch and batched prediction: the loop of Eq. 12, nothing else."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows, eval_noise, to_device
from leakpipe.pipeline.engine.ddp import Ddp
from leakpipe.pipeline.engine.precision import autocast, grad_scaler


def time_dropout_mask(n: int, t: int, p: float, gen: torch.Generator) -> torch.Tensor | None:
    """(n, t) bool: each timestep dropped with probability p, never all of a sample's (the first is
    then kept, as in the authors' code); None when p = 0, drawing nothing from `gen`."""
    if p <= 0 or t < 2:
        return None
    mask = torch.rand((n, t), generator=gen, device=gen.device) < p
    mask[mask.all(dim=1), 0] = False
    return mask


def attention_entropy_penalty(a: torch.Tensor) -> torch.Tensor:
    """The authors' time-entropy term: mean over samples of log T - H(a_t), 0 when a_t is uniform."""
    a = a.clamp_min(1e-8)
    return (math.log(a.shape[1]) + (a * a.log()).sum(dim=1)).mean()


def train_epoch(model, opt, data: LatentRows, build: FeatureBuilder, epoch: int, batch_size: int,
                seed: int, window: int, grad_clip: float, progress=None, ddp: Ddp = Ddp(),
                time_dropout: float = 0.0, entropy_penalty: float = 0.0, precision: str = "fp32",
                scaler=None, forward=None) -> dict:
    """Cross-entropy (Eq. 12) with a fresh eps for every sample seen; seeded by (seed, epoch). With
    the authors' regularisers: time-dropout of h_t, and `entropy_penalty` x (log T - H(a_t)). The
    forward pass runs under `precision`'s autocast (`forward`: a compiled model, else `model`); fp16
    steps through `scaler`.

    Under DDP each rank takes its shard of every global batch (and of its eps); the loss is the
    shard's sum over the global batch size, times the world size, so DDP's gradient average is the
    gradient of the global batch's mean loss.
    """
    model.train()
    device = build.device
    scaler = scaler or grad_scaler(device, precision)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
    shape = build.noise_shape(data.latent_shape)
    # Sums stay on the device (float64, as Python's were) so a step never waits for the GPU; they are
    # read back only when the progress line is redrawn.
    total = 0
    correct, loss_sum = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    for step, (pos, m, lv, y) in enumerate(data.batches(batch_size, seed=seed * 1_000_003 + epoch, window_chunks=window)):
        if len(pos) < 2 * ddp.world:  # BatchNorm needs more than one sample per rank
            continue
        eps = torch.randn((len(pos), *shape), generator=gen, device=device)
        part = ddp.shard(len(pos))
        labels = to_device(y[part], device)
        dropped = time_dropout_mask(len(pos), build.n_timesteps, time_dropout, gen)
        f = build(m[part], lv[part], eps[part])
        with autocast(device, precision):
            out = (forward or model)(f, None if dropped is None else dropped[part])
            loss = F.cross_entropy(out.logits.float(), labels, reduction="sum") * (ddp.world / len(pos))
            if entropy_penalty > 0 and build.n_timesteps > 1:
                loss = loss + entropy_penalty * attention_entropy_penalty(out.a_t.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a disabled scaler (all but fp16) passes everything through
        scaler.unscale_(opt)  # clip the true gradients
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        total += len(labels)
        correct += (out.logits.detach().argmax(1) == labels).sum()
        loss_sum += loss.detach().double() * len(pos) / ddp.world
        if progress is not None:
            progress.update(len(pos))
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / total:.3f}", acc=f"{correct.item() / total:.3f}")
    loss_sum, correct, total = ddp.sum([loss_sum.item(), int(correct.item()), total])
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}


@torch.no_grad()
def recalibrate_batchnorm(model, data: LatentRows, build: FeatureBuilder, batch_size: int,
                          max_batches: int = 100, precision: str = "fp32") -> None:
    """Recompute BatchNorm running statistics with the final weights of the epoch ("precise BN").

    With few steps per epoch the exponential running averages (momentum 0.1) are still dominated
    by their initial values and by early weights, so eval-mode outputs disagree with train mode;
    an exact average over up to `max_batches` batches fixes that at the cost of one forward pass.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    shape = build.noise_shape(data.latent_shape)
    for k, (pos, m, lv, _) in enumerate(data.batches(batch_size, seed=None)):
        if k == max_batches:
            break
        if len(pos) > 1:  # under the precision the model is trained and evaluated in
            f = build(m, lv, eval_noise(data.hashes[pos], build.cfg.train.eval_seed, shape))
            with autocast(build.device, precision):
                model(f)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


@torch.inference_mode()
def predict(model, data: LatentRows, build: FeatureBuilder, batch_size: int, precision: str = "fp32",
            forward=None) -> dict[str, np.ndarray]:
    """Outputs for every row of `data`, in its order, with each image's seeded eval noise (the forward
    pass under `precision`'s autocast; `forward`: a compiled model, else `model`)."""
    model.eval()
    shape = build.noise_shape(data.latent_shape)
    from leakpipe.pipeline.nn.model import explanation

    parts: dict[str, list] = {k: [] for k in ("logits", "h_bar", "w", "a_t", "d_min", "pi_cm", "r")}
    for pos, m, lv, _ in data.batches(batch_size, seed=None):
        f = build(m, lv, eval_noise(data.hashes[pos], build.cfg.train.eval_seed, shape))
        with autocast(build.device, precision):
            out = (forward or model)(f)
        out = type(out)(**{k: (v.float() if v is not None else None) for k, v in vars(out).items()})  # fp32 from here
        for key in ("logits", "h_bar", "w", "a_t"):
            parts[key].append(getattr(out, key).cpu())
        parts["d_min"].append((out.distances.amin(-1) if out.distances is not None else -out.logits).cpu())
        if out.distances is not None:
            pi_cm, r = explanation(out, model.prototypes, model.tau)
        else:  # the linear head has no prototypes to explain by
            pi_cm, r = torch.zeros(len(pos), out.logits.shape[1], 1), torch.zeros_like(out.h_bar)
        parts["pi_cm"].append(pi_cm.cpu())
        parts["r"].append(r.cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros((0,)) for k, v in parts.items()}
