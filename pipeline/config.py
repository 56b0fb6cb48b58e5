"""One dataclass tree for every setting: defaults in code, `leakpipe.toml` on top, `--set` last.

Each stage fingerprints only the sections that change its outputs (see `section_hash`), so
execution knobs such as batch size or worker count never invalidate a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.nn.zoo import BACKBONES


class ConfigError(UserError):
    """A setting the user can fix: names the key, what was given and what is accepted."""


@dataclass(frozen=True)
class VaeConfig:
    source: str = "stabilityai/stable-diffusion-2-1-base"  # Hub id, diffusers folder or .safetensors
    subfolder: str = "vae"  # inside a Hub repo or pipeline folder; ignored for single files
    config: str = ""  # local config.json (or folder) for a single .safetensors; default: SD2.1's
    revision: str = ""  # Hub revision; empty = the cached/default one
    dtype: str = "float32"  # compute dtype: float32 | float16 | bfloat16


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 256  # output is size x size
    # shorter: shorter side to `size`, then crop | none: crop only (a side shorter than `size` is filled by
    # mirrored copies of the image, the original at the top left: engine/images.mirror_fill)
    resize: str = "shorter"
    crop: str = "center"  # center | none (image must then already be size x size)
    max_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default limit)


@dataclass(frozen=True)
class StoreConfig:
    dtype: str = "float32"  # stored dtype of mean and logvar: float32 | float16
    chunk_rows: int = 64  # rows per Zarr chunk: the unit of work and of writing
    # where latent stores go: empty = <workspace>/cache/latents; else a folder or an fsspec URL
    # (s3://bucket/prefix, gs://..., file:///...). Locks stay in the workspace. Not fingerprinted.
    url: str = ""


@dataclass(frozen=True)
class EncodeConfig:
    """Execution only: never part of a fingerprint."""

    batch_size: int = 16
    num_workers: int = -1  # image-decoding processes; -1: auto (cores - 1, at most 16 on a GPU, 2 on a CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    torch_threads: int = 0  # intra-op CPU threads for the VAE; 0 = torch's default (dask workers: 1)
    workers: int = 0  # > 0: a local dask.distributed cluster of this many worker processes
    scheduler: str = ""  # address of an existing dask scheduler, e.g. tcp://10.0.0.1:8786
    skip_bad: bool = False  # accept a split without the images that cannot be read (--skip-bad)


@dataclass(frozen=True)
class LatentConfig:
    scale: float = 0.18215  # s of Eq. 1
    scale_mode: str = "multiply"  # multiply (authors' code) | divide (Eq. 1 as printed)
    sample: bool = False  # draw z0 from the posterior instead of taking its mean


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"  # cosine (squaredcos_cap_v2) | linear | scaled_linear
    num_steps: int = 1000
    timesteps: list[int] = field(default_factory=lambda: [0, 5, 10])  # T
    # false: z_t = alpha_t z0 with no eps (the authors' latent mode off feeds the images without noise;
    # at t = 0 the noise is 1/156 of z0, as strong as a pixel's last bit in vae.source = pixels)
    noise: bool = True


@dataclass(frozen=True)
class FeaturesConfig:
    dct_k: int = 8  # k of DCT_low
    dct_map: str = "coeffs"  # coeffs | lowpass | none (z_t / sigma_t only, the authors' code)
    standardize: bool = True  # per-timestep standardisation of f_t (false: the authors' code)
    # statistics of the DCT channels: one mean/std per channel, or one per coefficient (per position)
    dct_stats: str = "per_coefficient"
    # statistics of the z_t / sigma_t channels: one mean/std per channel, or one per position, which puts
    # every value of z0 on the scale the linear readout needs (benchmarks/head.py measured per position
    # above per channel for a linear map of z0)
    latent_stats: str = "per_position"
    # residual: f_t from the high-pass residual of z0 (Ker-Bohme's 3 x 3 kernel, per channel), which
    # removes content and keeps the traces of codecs and resamplers (for vae.source = pixels); none: z0
    highpass: str = "none"


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # a name of nn/zoo.py:BACKBONES
    init: str = ""  # a .safetensors state dict (torchvision names) to start the backbone from
    embed_dim: int = 128  # D
    prototypes: bool = True  # false: linear softmax head
    prototypes_per_class: int = 4  # M
    gating: bool = True  # false: w = 1
    tau: float = 1.0
    tau_learnable: bool = False  # learned in log space, clamped to [0.5, 5] as in the authors' code
    gate: str = "linear"  # linear: w = sigmoid(A h_bar + b) (Eq. 8) | mlp: per h_t, pooled by a_t (authors' code)
    # first convolution: imagenet (7x7 stride 2 + max-pool) | small (3x3 stride 1) | auto (small up to 64 px)
    stem: str = "auto"
    # random: N(0, 0.5^2) | kmeans: k-means of each class's training embeddings after the warm-up epochs
    # (random is the default: k-means placed more distinct prototypes but cost top-1, benchmarks/recipe.py)
    prototype_init: str = "random"
    # the std of that random init: 0.01, as the authors' code, starts every class at the same distance
    # (the loss at ln C); the paper's reading 0.5 in D = 128 starts it near 3 ln C (benchmarks/head.py)
    prototype_std: float = 0.01
    # none: h_t from the backbone alone (Eq. 5) | linear: plus a linear map of the DCT_low block of f_t,
    # which keeps where each coefficient sits: the backbone's pooling averages that away (benchmarks/head.py)
    dct_readout: str = "linear"
    # none | linear: plus a linear map of z_t / sigma_t itself, each value in its place (what the z0 probe
    # reads) | auto: linear up to 64 x 64 positions (SD latents of images up to 512 px), none above
    latent_readout: str = "auto"


@dataclass(frozen=True)
class TrainConfig:
    split: str = "closed"  # manifest whose train/val partitions train the model
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # constant | cosine (to 0 at the last epoch, after the warm-up)
    warmup_epochs: int = 1  # linear warm-up of the learning rate, per step
    weight_decay: float = 1e-4  # AdamW
    ema_half_life: float = 0.5  # exponential moving average of the weights, half-life in epochs; 0 = off
    label_smoothing: float = 0.1  # of the cross-entropy targets
    augment: list[str] = field(default_factory=list)  # hflip, vflip of z0
    crop: int = 0  # side of random training crops of z0 (aligned to the 8-px grid); evaluation tiles; 0 = off
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    # probability that a training image's h_t is the DCT readout's alone (the backbone's part dropped):
    # the readout then learns to attribute by itself, not only what the backbone has not memorised.
    # Inert without a readout (model.dct_readout and model.latent_readout none)
    backbone_dropout: float = 0.5
    # skip: those images do not pass through the backbone (half its training cost at 0.5) | mask: they
    # pass and their h_t is zeroed, so they count in BatchNorm's batch statistics (leakpipe before issue 36)
    backbone_dropout_mode: str = "mask"
    time_dropout: float = 0.0  # probability of dropping a timestep's h_t in training (authors' code: 0.3)
    entropy_penalty: float = 0.0  # weight of (log T - H(a_t)) in the loss (authors' code: 0.1)
    prototype_pull: float = 0.0  # weight of the pull of every prototype towards its nearest image of its class
    # the weights kept: last (every epoch; no early stopping) | val_loss | val_auc (the best epoch by
    # validation cross-entropy or macro AUC, stopping after `patience` epochs without a better one)
    select: str = "last"
    patience: int = 5  # epochs without a better validation score before stopping (select = val_loss | val_auc)
    seed: int = 0  # initialisation, shuffling and training noise
    eval_seed: int = 1234  # noise for statistics, validation and embeddings (per image)
    shuffle_chunks: int = 32  # rows are shuffled within windows of this many store chunks
    # generators (labels) left out of training and validation; score treats their closed test rows as
    # unseen generators (leave-one-generator-out, `leakpipe sweep --logo`)
    exclude: list[str] = field(default_factory=list)
    # post-processed variants of the training images (`leakpipe postprocess --variants K`, encoded like any
    # split): a manifest whose rows copy train.split's train and val rows (its source column names each
    # one's image). Per image and epoch, training draws the original or one of its variants. auto: the
    # manifest SPLIT-var when it exists, else none; "": none (raw images only, as the paper trains)
    variants: str = "auto"
    variant_p: float = 0.5  # the probability that an epoch sees one of an image's variants instead of it


@dataclass(frozen=True)
class ScoreConfig:
    closed: str = "closed"  # manifest whose train rows fit the comparators and whose test rows are scored
    # manifests of post-processed test copies (variant column: step1, step2, ...), one or several
    postprocessed: list[str] = field(default_factory=lambda: ["closed-pp"])
    open: str = "open"  # unseen generators for the open-set analysis
    # the Mahalanobis comparator's covariance of class c: (1 - maha_shared) x its own diagonal (Eq. 13 as
    # printed at 0) + maha_shared x one Ledoit-Wolf covariance of every class's deviations (Lee et al. 2018
    # at 1): with 20-60 rows a class, its own variances are noise and the shared one misses its shape
    maha_shared: float = 0.5
    # the closed rows it is fitted on: train | train_val (the val rows too: the network has fitted its
    # training rows, whose deviations from their class mean understate an unseen image's; benchmarks/recipe.py)
    maha_rows: str = "train_val"
    maha_floor: float = 1e-3  # Eq. 13 epsilon, relative to the mean per-dimension variance
    kde_bandwidth: float = 0.0  # 0: cross-validated over kde_grid x the embeddings' scale
    kde_grid: list[float] = field(default_factory=lambda: [round(10 ** (-1.5 + k / 6), 5) for k in range(13)])
    kde_folds: int = 5
    kde_dtype: str = "float64"  # float64 | float32
    # KDE reference (closed training embeddings) above this many rows: a seeded subsample of this
    # many; 0 = every row. Bounds the time (quadratic in the reference) and memory of the open set.
    kde_max_reference: int = 20000
    kde_embedding: str = "h_bar"  # what `attribute` flags unseen generators with: h_bar | gated (h_bar * w)
    # the error rate of every decision score states: prediction sets miss the true generator of a known
    # generator's image with probability at most alpha (split conformal on the val partition), and the
    # unseen-generator flag (conformal p-value <= alpha) fires on at most alpha of known generators' images
    alpha: float = 0.1
    # the posterior attribute reports: temperature (one T fitted on val by NLL) | class_temperature
    # (one T per class, the authors' perclass_temp) | none
    calibration: str = "temperature"
    conformal: str = "lac"  # nonconformity of the prediction sets: lac (smallest sets) | aps (adaptive)
    mondrian: bool = False  # one conformal threshold per class (class-conditional coverage)
    # post-processed variants of the closed split's val images (`leakpipe postprocess --variants`): their
    # val rows join the raw val rows in fitting the temperature and the conformal thresholds, so the
    # guarantee covers images post-processed like them. auto: CLOSED-var when it exists; "": raw val only
    variants: str = "auto"
    # with score.variants: one conformal threshold per post-processing level (raw, step1, ...: Mondrian by
    # level), a new image (whose level is unknown) held to the largest: the guarantee then holds at every level
    levels: bool = False
    dual: bool = False  # the paper's "dual" open-set setting (uses ground truth; not a detector)
    embedding_map: str = "pca"  # pca | tsne
    seed: int = 0  # KDE folds, t-SNE, bootstrap resamples
    bootstrap: int = 1000  # resamples for the 95% intervals of every metric; 0 = no intervals
    # a forensic pixel baseline, a linear probe on z0 and the reconstruction baseline, fitted and scored on the
    # same split
    baselines: bool = True
    baseline_max_side: int = 512  # the pixel baseline reads at most this centre crop of each file, never resized
    # the reconstruction baseline (AEROBLADE's idea): each image's distances to its round trip through each of
    # these autoencoders (vae.source values with a decoder), fitted and scored like the others; [] = none
    reconstruction: list[str] = field(default_factory=lambda: ["builtin:taef2"])
    # the centre crop of each file it reads, never resized (on the 8-px grid); bounds the round trips' cost
    reconstruction_max_side: int = 128


@dataclass(frozen=True)
class LogConfig:
    """Execution only: never part of a fingerprint."""

    tensorboard: bool = False  # event files under each result's tensorboard/ (needs leakpipe[tensorboard])
    # validation (precise BatchNorm statistics, then the val rows) every this many training epochs and after
    # the last, under train.select = last (val_loss and val_auc validate every epoch); 0: the last only.
    # The kept weights are the same at any value: history.json and the log show fewer epochs' val figures
    validate_every: int = 1
    # a training checkpoint (weights, optimiser, the best weights and the average: 4x the model) after every
    # epoch (0), or after the first epoch that ends this many seconds after the last checkpoint; a kill loses
    # at most that much training. The weights are the same at any value
    checkpoint_seconds: float = 0.0


@dataclass(frozen=True)
class ComputeConfig:
    """Execution only: never part of a fingerprint."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    memory_budget_gb: float = 4.0  # latents above this are streamed by chunks, not loaded
    eval_batch_size: int = 256
    # fp32 | bf16 | fp16: autocast with fp32 master weights in training and embedding. Changes results,
    # so unlike the rest of this section it is in the training and embedding fingerprints.
    precision: str = "fp32"
    compile: bool = False  # torch.compile the model (train, embed) and the VAE encoder (encode)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no code generation, for checks)
    gpu_cache_gb: float = 8.0  # on CUDA, latents up to this size are held on the GPU (else pinned host memory)


@dataclass(frozen=True)
class Config:
    vae: VaeConfig = field(default_factory=VaeConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, Any] = {  # section name -> its dataclass
    f.name: f.default_factory for f in dataclasses.fields(Config)
}

CHOICES = {
    "vae.dtype": ("float32", "float16", "bfloat16"),
    "preprocess.resize": ("shorter", "none"),
    "preprocess.crop": ("center", "none"),
    "store.dtype": ("float32", "float16"),
    "latent.scale_mode": ("multiply", "divide"),
    "diffusion.schedule": ("cosine", "linear", "scaled_linear"),
    "features.dct_map": ("coeffs", "lowpass", "none"),
    "features.dct_stats": ("per_channel", "per_coefficient"),
    "features.latent_stats": ("per_channel", "per_position"),
    "features.highpass": ("none", "residual"),
    "model.backbone": tuple(BACKBONES),
    "model.gate": ("linear", "mlp"),
    "model.stem": ("auto", "imagenet", "small"),
    "model.prototype_init": ("random", "kmeans"),
    "model.dct_readout": ("none", "linear"),
    "model.latent_readout": ("auto", "none", "linear"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.select": ("last", "val_loss", "val_auc"),
    "train.backbone_dropout_mode": ("skip", "mask"),
    "compute.precision": ("fp32", "bf16", "fp16"),
    "score.kde_dtype": ("float64", "float32"),
    "score.kde_embedding": ("h_bar", "gated"),
    "score.embedding_map": ("pca", "tsne"),
    "score.calibration": ("temperature", "class_temperature", "none"),
    "score.conformal": ("lac", "aps"),
    "score.maha_rows": ("train", "train_val"),
}
# Keys that were replaced: a stored config (a result's or an export's config.json) that has one still
# loads, the key dropped; set in a TOML file or with --set, the error names what replaced it.
RETIRED_KEYS = {
    "score.unseen_tpr": "score.alpha (the unseen-generator flag is a conformal p-value at level "
    "alpha; unseen_tpr = 0.95 reads as alpha = 0.05)",
    "score.maha_covariance": "score.maha_shared (the weight of the shared covariance: class_diagonal "
    "reads as 0, shared as 1)",
}
# Keys added after results were first stored, with the default that reproduces the earlier behaviour:
# at that default a key is left out of fingerprints, so upgrading keeps every stored result valid.
ADDED_KEYS = {
    "features.standardize": True,
    "features.dct_stats": "per_channel",
    "model.init": "",
    "model.gate": "linear",
    "train.time_dropout": 0.0,
    "train.entropy_penalty": 0.0,
    "train.exclude": [],
    "compute.precision": "fp32",
    "model.stem": "imagenet",
    "model.prototype_init": "random",
    "train.lr_schedule": "constant",
    "train.warmup_epochs": 0,
    "train.ema_half_life": 0.0,
    "train.label_smoothing": 0.0,
    "train.augment": [],
    "train.crop": 0,
    "train.select": "val_auc",
    "train.prototype_pull": 0.0,
    "diffusion.noise": True,
    "features.highpass": "none",
    "model.dct_readout": "none",
    "model.prototype_std": 0.5,
    "train.backbone_dropout": 0.0,
    "features.latent_stats": "per_channel",
    "model.latent_readout": "none",
    "score.maha_shared": 0.0,
    "score.maha_rows": "train",
    "score.reconstruction": [],
    "score.reconstruction_max_side": 128,
    "train.backbone_dropout_mode": "mask",
    "train.variants": "",
    "train.variant_p": 0.5,
    "score.variants": "",
    "score.levels": False,
}
# Choices of each item of a list setting
ITEM_CHOICES = {"train.augment": ("hflip", "vflip")}
# Sections that change what stage two learns (its fingerprint); encode/compute are execution only.
TRAIN_SECTIONS = ("latent", "diffusion", "features", "model", "train")


# (key, lowest, highest, what is allowed), checked on load; None = unbounded on that side
RANGES = [
    ("preprocess.size", 8, None, ">= 8 pixels"),
    ("preprocess.max_pixels", 1, None, ">= 1"),
    ("store.chunk_rows", 1, None, ">= 1"),
    ("encode.batch_size", 1, None, ">= 1"),
    ("encode.num_workers", -1, None, ">= 0, or -1 (auto)"),
    ("encode.torch_threads", 0, None, ">= 0"),
    ("encode.workers", 0, None, ">= 0"),
    ("latent.scale", 0, None, "> 0 and finite"),
    ("diffusion.num_steps", 1, None, ">= 1"),
    ("features.dct_k", 1, None, ">= 1"),
    ("model.embed_dim", 1, None, ">= 1"),
    ("model.prototypes_per_class", 1, None, ">= 1"),
    ("model.tau", 0, None, "> 0 and finite"),
    ("model.prototype_std", 0, None, "> 0 and finite"),
    ("train.epochs", 1, None, ">= 1"),
    ("train.batch_size", 1, None, ">= 1"),
    ("train.lr", 0, None, "> 0 and finite"),
    ("train.weight_decay", 0, None, ">= 0 and finite"),
    ("train.grad_clip", 0, None, ">= 0 and finite (0 = off)"),
    ("train.patience", 0, None, ">= 0"),
    ("log.validate_every", 0, None, ">= 0 (0 = after the last epoch only)"),
    ("log.checkpoint_seconds", 0, None, ">= 0 and finite (0 = after every epoch)"),
    ("train.shuffle_chunks", 1, None, ">= 1"),
    ("train.time_dropout", 0, 0.95, "between 0 and 0.95"),
    ("train.backbone_dropout", 0, 0.95, "between 0 and 0.95"),
    ("train.entropy_penalty", 0, None, ">= 0 and finite"),
    ("train.warmup_epochs", 0, None, ">= 0"),
    ("train.prototype_pull", 0, None, ">= 0 and finite (0 = off)"),
    ("train.ema_half_life", 0, None, ">= 0 and finite (0 = off)"),
    ("train.label_smoothing", 0, 0.5, "between 0 and 0.5"),
    ("train.variant_p", 0, 1, "between 0 (originals only) and 1 (a variant whenever an image has one)"),
    ("train.crop", 0, None, ">= 0 (0 = off)"),
    ("score.maha_floor", 0, None, ">= 0 and finite"),
    ("score.maha_shared", 0, 1, "between 0 (Eq. 13) and 1 (one shared covariance)"),
    ("train.seed", 0, 2**32 - 1, "an integer from 0 to 2**32 - 1"),
    ("train.eval_seed", 0, 2**32 - 1, "an integer from 0 to 2**32 - 1"),
    ("score.seed", 0, 2**32 - 1, "an integer from 0 to 2**32 - 1"),
    ("score.kde_bandwidth", 0, None, ">= 0 and finite (0 = cross-validated)"),
    ("score.kde_folds", 2, None, ">= 2"),
    ("score.kde_max_reference", 0, None, ">= 0 (0 = every row)"),
    ("score.baseline_max_side", 8, None, ">= 8 pixels"),
    ("score.reconstruction_max_side", 8, None, ">= 8 pixels"),
    ("score.bootstrap", 0, None, ">= 0 (0 = no intervals)"),
    ("score.alpha", 0, 1, "between 0 and 1, both excluded"),
    ("compute.memory_budget_gb", 0, None, ">= 0 and finite"),
    ("compute.gpu_cache_gb", 0, None, ">= 0 and finite"),
    ("compute.eval_batch_size", 1, None, ">= 1"),
]
# the lower bound itself is not allowed
_STRICT = {"latent.scale", "model.tau", "model.prototype_std", "train.lr", "score.alpha"}
_STRICT_HIGH = {"score.alpha"}  # nor the upper one
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")  # what compute.device and encode.device take


def validation_problems(cfg: Config) -> list[str]:
    """Every value outside its range, with the range, all at once."""
    import math

    out = []
    for key, low, high, allowed in RANGES:
        v = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        bad = (
            not math.isfinite(v)
            or v < low
            or (key in _STRICT and v == low)
            or (high is not None and v > high)
            or (key in _STRICT_HIGH and v == high)
        )
        if bad:
            out.append(f"{key} = {v!r}: must be {allowed}")
    d = cfg.diffusion
    if (
        not d.timesteps
        or any(not 0 <= t < d.num_steps for t in d.timesteps)
        or len(set(d.timesteps)) != len(d.timesteps)
    ):
        out.append(
            f"diffusion.timesteps = {d.timesteps}: must be distinct steps from 0 to {d.num_steps - 1} "
            "(diffusion.num_steps - 1), at least one"
        )
    for key, v in (("compute.device", cfg.compute.device), ("encode.device", cfg.encode.device)):
        if not DEVICE.fullmatch(v):
            out.append(f"{key} = {v!r}: must be auto, cpu, cuda, cuda:N, mps, xpu or xpu:N")
    if not cfg.score.kde_grid or any(not (g > 0) for g in cfg.score.kde_grid):
        out.append(f"score.kde_grid = {cfg.score.kde_grid}: must be positive bandwidth factors, at least one")
    return out


def canonical_hash(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def section_hash(cfg: Config, *names: str) -> str:
    return canonical_hash({n: dataclasses.asdict(getattr(cfg, n)) for n in names})


def valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# Named starting points under the TOML file and --set. `leakpipe` (the defaults above): the paper's
# method with the training recipe measured in benchmarks/recipe.py. `paper`: the paper as printed, its
# ambiguities resolved as docs/guide/ambiguities.md says. `authors-code`: the defaults of the authors'
# released pipeline/train_eval.py, each checked there (docs/guide/configuration.md, "Profiles").
# `pixels`: the model on the pixels themselves, the recipe benchmarks/codecs.py measured on real codec
# chains (what the report advises when the forensic baseline finds traces the encoder loses).
_PAPER = (
    "model.stem=imagenet",
    "model.dct_readout=none",
    "model.latent_readout=none",
    "model.prototype_std=0.5",
    "features.dct_stats=per_channel",
    "features.latent_stats=per_channel",
    "train.backbone_dropout=0",
    "model.prototype_init=random",
    "train.lr_schedule=constant",
    "train.warmup_epochs=0",
    "train.ema_half_life=0",
    "train.label_smoothing=0",
    "train.select=val_auc",
    "score.maha_shared=0",
    "score.maha_rows=train",
    "train.variants=",  # the paper trains on raw images only
)
PROFILES: dict[str, tuple[str, ...]] = {
    "leakpipe": (),
    "paper": _PAPER,
    "authors-code": (
        *_PAPER,
        "diffusion.schedule=linear",
        "diffusion.timesteps=0",
        "model.prototypes_per_class=6",
        "features.dct_map=none",
        "features.standardize=false",
        "model.prototype_std=0.01",
        "model.tau_learnable=true",
        "model.tau=1.0",
        "model.gate=mlp",
        "train.time_dropout=0.3",
        "train.entropy_penalty=0.1",
        "train.lr=3e-4",
        "train.batch_size=16",
        "train.epochs=10",
        "train.select=val_loss",
        "train.patience=10",
        "train.seed=42",
        "train.grad_clip=5.0",
    ),
    "pixels": (
        "vae.source=pixels",  # z0 is the image itself (the authors' latent mode off)
        "preprocess.resize=none",  # a resampler would overwrite the traces; small images are mirror-filled
        "features.highpass=residual",  # content out, codec and resampling traces in
        "features.dct_map=none",
        "diffusion.timesteps=0",  # one timestep, no noise: a pixel's last bit is the signal
        "diffusion.noise=false",
        "train.crop=64",  # random 64-px crops on the 8-px grid; evaluation tiles the whole image
    ),
}
DEFAULT_PROFILE = "leakpipe"
