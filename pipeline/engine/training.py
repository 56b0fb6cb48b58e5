"""One training epoch and batched prediction: the loop of Eq. 12, and the recipe around it (learning
rate schedule, weight averaging, label smoothing, precise BatchNorm statistics)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from leakpipe.pipeline.config import TrainConfig
from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows, eval_noise, to_device
from leakpipe.pipeline.engine.ddp import Ddp
from leakpipe.pipeline.engine.precision import autocast, grad_scaler
from leakpipe.pipeline.nn.model import explanation


def time_dropout_mask(n: int, t: int, p: float, gen: torch.Generator) -> torch.Tensor | None:
    """(n, t) bool: each timestep dropped with probability p, never all of a sample's (the first is
    then kept, as in the authors' code); None when p = 0, drawing nothing from `gen`."""
    if p <= 0 or t < 2:
        return None
    mask = torch.rand((n, t), generator=gen, device=gen.device) < p
    mask[mask.all(dim=1), 0] = False
    return mask


def backbone_dropout_mask(n: int, p: float, gen: torch.Generator) -> torch.Tensor | None:
    """(n,) bool: images whose h_t is the readout's alone, each with probability p; None when p = 0,
    drawing nothing from `gen` (the caller passes p = 0 for a model without a readout)."""
    if p <= 0:
        return None
    return torch.rand((n,), generator=gen, device=gen.device) < p


def attention_entropy_penalty(a: torch.Tensor) -> torch.Tensor:
    """The authors' time-entropy term: mean over samples of log T - H(a_t), 0 when a_t is uniform."""
    a = a.clamp_min(1e-8)
    return (math.log(a.shape[1]) + (a * a.log()).sum(dim=1)).mean()


def prototype_pull(d: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Li et al. (AAAI 2018)'s first prototype regulariser: every prototype close to at least one
    image: the mean over the prototypes of the classes in the batch of min_i d_cm(h_i) over the
    batch's images i of class c. d (B, C, M) are the distances of Eq. 9; 0 for an empty batch."""
    terms = [d[labels == c, c].amin(0) for c in labels.unique()]
    return torch.cat(terms).mean() if terms else d.new_zeros(())


def lr_factor(tc: TrainConfig, progress: float) -> float:
    """The learning rate's multiplier `progress` epochs into training (fractional, > 0): a linear
    warm-up over train.warmup_epochs, then constant or a cosine decay to 0 at train.epochs."""
    warm = tc.warmup_epochs
    if warm and progress < warm:
        return progress / warm
    if tc.lr_schedule == "constant" or tc.epochs <= warm:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warm) / (tc.epochs - warm))))


class WeightAverage:
    """An exponential moving average of a model's weights (train.ema_half_life, in epochs), with the
    usual warm-up (the decay is at most (1 + k) / (10 + k) after k updates), so early weights fade
    quickly. Integer buffers are copied; BatchNorm statistics are recomputed on the average."""

    def __init__(self, model: torch.nn.Module, half_life_steps: float, state: dict | None = None):
        self.decay = 0.5 ** (1 / max(half_life_steps, 1e-9))
        self.shadow = state if state is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0 if state is None else int(state.pop("updates", torch.tensor(0)).item())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)
        self.updates += 1

    def reset(self, name: str, value: torch.Tensor) -> None:
        """Start the average of one tensor again from `value` (prototypes after their k-means)."""
        self.shadow[name] = value.detach().clone()

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the averaged weights."""
        out = copy.deepcopy(model)
        out.load_state_dict(self.shadow)
        return out

    def state(self) -> dict:
        return {**self.shadow, "updates": torch.tensor(self.updates)}


def train_epoch(
    model,
    opt,
    data: LatentRows,
    build: FeatureBuilder,
    tc: TrainConfig,
    epoch: int,
    progress=None,
    ddp: Ddp = Ddp(),  # noqa: B008 (a frozen single-process context, never mutated)
    precision: str = "fp32",
    scaler=None,
    forward=None,
    average: WeightAverage | None = None,
) -> dict:
    """Cross-entropy (Eq. 12, with train.label_smoothing) with a fresh eps for every sample seen;
    seeded by (train.seed, epoch). The learning rate follows `lr_factor` per step; `average` is
    updated after each. train.prototype_pull weighs `prototype_pull`. With the authors' regularisers:
    time-dropout of h_t, and
    train.entropy_penalty x (log T - H(a_t)); train.augment and train.crop draw flips and crops of
    z0. The forward pass runs under `precision`'s autocast (`forward`: a compiled model, else
    `model`); fp16 steps through `scaler`.

    Under DDP each rank takes its shard of every global batch (and of its eps); the loss is the
    shard's sum over the global batch size, times the world size, so DDP's gradient average is the
    gradient of the global batch's mean loss.
    """
    model.train()
    has_readout = getattr(getattr(model, "module", model), "readout", None) is not None
    p_backbone = tc.backbone_dropout if has_readout else 0.0
    device = build.device
    scaler = scaler or grad_scaler(device, precision)
    seed = tc.seed * 1_000_003 + epoch
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = build.noise_shape(data.latent_shape)
    n_batches = data.n_batches(tc.batch_size, seed, tc.shuffle_chunks)
    # Sums stay on the device (float64, as Python's were) so a step never waits for the GPU; they are
    # read back only when the progress line is redrawn.
    total = 0
    correct, loss_sum = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    for step, (pos, m, lv, y) in enumerate(data.batches(tc.batch_size, seed=seed, window_chunks=tc.shuffle_chunks)):
        if len(pos) < 2 * ddp.world:  # BatchNorm needs more than one sample per rank
            continue
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(tc, epoch - 1 + (step + 1) / n_batches)
        drawn = _draw(len(pos), shape, data.latent_shape, build, tc, p_backbone, gen)
        out, loss, labels = _batch_loss(
            forward or model, build, tc, (m, lv, y), drawn, ddp.shard(len(pos)), ddp.world / len(pos), precision
        )
        _optimiser_step(model, opt, scaler, loss, tc, average)
        total += len(labels)
        correct += (out.logits.detach().argmax(1) == labels).sum()
        loss_sum += loss.detach().double() * len(pos) / ddp.world
        if progress is not None:
            progress.update(len(pos))
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / total:.3f}", acc=f"{correct.item() / total:.3f}")
    loss_sum, correct, total = ddp.sum([loss_sum.item(), int(correct.item()), total])
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1), "lr": opt.param_groups[0]["lr"]}


def _draw(n: int, shape, latent_shape, build: FeatureBuilder, tc: TrainConfig, p_backbone: float, gen):
    """A batch's random draws from the epoch's generator, in this order: eps, the time-dropout mask, the
    backbone-dropout mask, the views (flips and crops)."""
    eps = torch.randn((n, *shape), generator=gen, device=build.device)
    dropped = time_dropout_mask(n, build.n_timesteps, tc.time_dropout, gen)
    no_backbone = backbone_dropout_mask(n, p_backbone, gen)
    return eps, dropped, no_backbone, build.draw_views(n, latent_shape, gen)


def _batch_loss(forward, build: FeatureBuilder, tc: TrainConfig, batch, drawn, part, scale: float, precision: str):
    """(output, loss, labels) of this rank's shard `part` of a batch: the summed cross-entropy (Eq. 12)
    times `scale`, plus the entropy penalty and the prototype pull when they are on."""
    (m, lv, y), (eps, dropped, no_backbone, views) = batch, drawn
    labels = to_device(y[part], build.device)
    f = build(m[part], lv[part], eps[part], views=None if views is None else views[part])
    with autocast(build.device, precision):
        out = forward(f, None if dropped is None else dropped[part], None if no_backbone is None else no_backbone[part])
        loss = F.cross_entropy(out.logits.float(), labels, reduction="sum", label_smoothing=tc.label_smoothing) * scale
        if tc.entropy_penalty > 0 and build.n_timesteps > 1:
            loss = loss + tc.entropy_penalty * attention_entropy_penalty(out.a_t.float())
        if tc.prototype_pull > 0 and out.distances is not None:
            loss = loss + tc.prototype_pull * prototype_pull(out.distances.float(), labels)
    return out, loss, labels


def _optimiser_step(model, opt, scaler, loss, tc: TrainConfig, average: WeightAverage | None) -> None:
    """Backward through the scaler, the gradients clipped (train.grad_clip), the step, the average updated."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # a disabled scaler (all but fp16) passes everything through
    scaler.unscale_(opt)  # clip the true gradients
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    scaler.step(opt)
    scaler.update()
    if average is not None:
        average.update(getattr(model, "module", model))


def stratified_sample(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Positions of at most `max_rows` rows, every class in proportion to its rows (at least one of
    each), in a seeded random order: batches of it mix the classes whatever the store order."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = min(1.0, max_rows / max(len(labels), 1))
    picked = [rng.permutation(np.nonzero(labels == c)[0])[: max(1, round(n * share))] for c, n in zip(classes, counts)]
    return rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


BN_ROWS = 6400  # rows precise BN averages over (100 batches of 64), drawn from every class


@torch.inference_mode()
def recalibrate_batchnorm(
    model, data: LatentRows, build: FeatureBuilder, batch_size: int, max_rows: int = BN_ROWS, precision: str = "fp32"
) -> None:
    """Recompute BatchNorm running statistics with the model's current weights ("precise BN").

    With few steps per epoch the exponential running averages (momentum 0.1) are still dominated
    by their initial values and by early weights, so eval-mode outputs disagree with train mode. An
    exact average over the batches of a class-stratified, shuffled sample of the training rows fixes
    that at the cost of one forward pass. The batches mix the classes even when the store is sorted
    by class, so the statistics hold the between-class variance the network sees in training.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    shape = build.noise_shape(data.latent_shape)
    seed = build.cfg.train.eval_seed
    sample = stratified_sample(data.labels, max_rows, seed)
    gen = torch.Generator(device=build.device).manual_seed(seed)  # under train.crop: one seeded crop per image
    for k in range(0, len(sample), batch_size):
        pos = sample[k : k + batch_size]
        if len(pos) > 1:  # under the precision the model is trained and evaluated in
            m, lv = data.rows_at(pos)
            f = build(
                m, lv, eval_noise(data.hashes[pos], seed, shape), views=build.draw_views(len(pos), shape[1:], gen)
            )
            with autocast(build.device, precision):
                model(f)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


@torch.inference_mode()
def predict(
    model, data: LatentRows, build: FeatureBuilder, batch_size: int, precision: str = "fp32", forward=None
) -> dict[str, np.ndarray]:
    """Outputs for every row of `data`, in its order, with each image's seeded eval noise (the forward
    pass under `precision`'s autocast; `forward`: a compiled model, else `model`)."""
    model.eval()
    shape = build.noise_shape(data.latent_shape)
    parts: dict[str, list] = {k: [] for k in ("logits", "h_bar", "w", "a_t", "d_min", "pi_cm", "r")}
    for pos, m, lv, _ in data.batches(build.eval_rows(batch_size, data.latent_shape), seed=None):
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
