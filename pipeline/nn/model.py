"""Proto-LeakNet: a shared backbone over f_t, temporal attention, gating and prototypes (Eq. 5-11).

The backbones (paper Table 4) are in `backbones.py`; this module holds the equations and the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from leakpipe.pipeline.nn.backbones import ResNet, build as build_backbone  # noqa: F401 (ResNet re-exported)

if TYPE_CHECKING:  # nn sits below config in the layers: the section is only a type here
    from leakpipe.pipeline.config import ModelConfig

TAU_RANGE = (0.5, 5.0)  # a learnable tau is clamped to this, as in the authors' code
# model.latent_readout = auto reads z_t up to this many positions (SD latents of 512-px images): above it
# (pixels mode on whole images) the readout's weights would outgrow the backbone's
LATENT_READOUT_MAX = 64 * 64


def resolve_latent_readout(setting: str, positions: int) -> str:
    """`model.latent_readout` for maps of `positions` positions: "auto" is linear up to LATENT_READOUT_MAX."""
    return ("linear" if positions <= LATENT_READOUT_MAX else "none") if setting == "auto" else setting


# ------------------------------------------------------------------ equations as pure functions
def dct_block(f: torch.Tensor, channels: int, k: int) -> torch.Tensor:
    """The DCT_low block (Eq. 4) of f_t's last `channels` channels, each coefficient in its own place:
    (N, C, h, w) -> (N, channels k^2). Samples row and column ceil(i h / k), i < k: the one position of
    coefficient i in the nearest-upsampled map (dct_map = coeffs); of the low-pass map (lowpass) they are
    k distinct samples of k cosines, from which the block is a fixed invertible linear map."""
    h, w = f.shape[-2:]
    rows = [-(-i * h // k) for i in range(k)]
    cols = [-(-i * w // k) for i in range(k)]
    return f[:, -channels:][:, :, rows][:, :, :, cols].flatten(1)


def readout_input(f: torch.Tensor, dct: tuple[int, int], latent: int) -> torch.Tensor:
    """What the linear readout of h_t reads (Eq. 5 + R x): the DCT_low block of f_t's last dct[0] channels
    (`dct_block`), then z_t / sigma_t (f_t's first `latent` channels) flattened, each value in its place."""
    parts = [dct_block(f, *dct)] if dct[0] else []
    return torch.cat(parts + ([f[:, :latent].flatten(1)] if latent else []), dim=1)


def temporal_attention(h: torch.Tensor, u: torch.Tensor, q: torch.Tensor):
    """Eq. 6-7: a_t = softmax_t(q^T u_t), h_bar = sum_t a_t h_t. h, u (B, T, D); q (D,)."""
    a = torch.softmax(u @ q, dim=1)
    return a, (a.unsqueeze(-1) * h).sum(dim=1)


def gate(h_bar: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Eq. 8: w = sigmoid(A h_bar + b)."""
    return torch.sigmoid(F.linear(h_bar, weight, bias))


def prototype_distances(h_bar: torch.Tensor, w: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. 9: d_cm = sum_i w_i (h_bar_i - p_cm,i)^2. h_bar, w (B, D); prototypes (C, M, D) -> (B, C, M)."""
    diff = h_bar[:, None, None, :] - prototypes[None]
    return (w[:, None, None, :] * diff * diff).sum(-1)


def soft_min_distance(d: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. 10: s_c = -tau log sum_m exp(-d_cm / tau), a soft minimum over the class's prototypes."""
    return -tau * torch.logsumexp(-d / tau, dim=-1)


def class_logits(s: torch.Tensor) -> torch.Tensor:
    """Eq. 11 with the sign that lets the nearest prototype win: pi_c = softmax_c(-s_c)."""
    return -s


def contributions(h_bar: torch.Tensor, w: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """Eq. 14: r_i = w_i (h_bar_i - p_cm,i)^2, feature i's share of d_cm (they sum to d_cm). (B, D)."""
    diff = h_bar - prototype
    return w * diff * diff


def responsibilities(d: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. 15: pi_cm = softmax_m(-d_cm / tau), which prototype of each class explains the sample."""
    return torch.softmax(-d / tau, dim=-1)


# ------------------------------------------------------------------ the model
@dataclass
class Output:
    logits: torch.Tensor  # (B, C): log of the class posterior up to a constant
    h_t: torch.Tensor  # (B, T, D)
    a_t: torch.Tensor  # (B, T)
    h_bar: torch.Tensor  # (B, D)
    w: torch.Tensor  # (B, D)
    distances: torch.Tensor | None  # (B, C, M) or None for the linear head


def explanation(out: "Output", prototypes: torch.Tensor, tau) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_cm (B, C, M) of Eq. 15 for every class and prototype, r (B, D) of Eq. 14 for the winning
    prototype: the predicted class's most responsible one)."""
    pi_cm = responsibilities(out.distances, tau)
    c = out.logits.argmax(1)
    m = pi_cm[torch.arange(len(c)), c].argmax(1)
    return pi_cm, contributions(out.h_bar, out.w, prototypes[c, m])


class ProtoLeakNet(nn.Module):
    """f_t (B, T, C, h, w), or tiles of it (B, K, T, C, h, w), to the class posterior (Eq. 5-11), built
    from the `model` section of the config for feature maps of `in_channels` channels and side `side`."""

    def __init__(
        self,
        cfg: ModelConfig,
        n_classes: int,
        in_channels: int = 8,
        side: int = 32,
        dct: tuple[int, int] = (0, 0),
        latent: tuple[int, int, int] = (0, 0, 0),
        skip_dropped: bool = True,
    ):
        """`dct` (channels, k): where f_t's DCT_low map is, for model.dct_readout = linear; (0, 0): no map.
        `latent` (channels, h, w): f_t's first channels (z_t / sigma_t) that model.latent_readout reads.
        `skip_dropped`: images dropped by train.backbone_dropout skip the backbone (train.backbone_dropout_mode)."""
        super().__init__()
        self.skip_dropped = skip_dropped
        self.backbone = build_backbone(cfg.backbone, in_channels, side, cfg.stem)
        self.proj = nn.Linear(self.backbone.out_features, cfg.embed_dim)
        self.dct = (dct[0], min(dct[1], side)) if cfg.dct_readout == "linear" else (0, 0)
        self.latent = latent[0]
        n_in = self.dct[0] * self.dct[1] ** 2 + latent[0] * latent[1] * latent[2]
        self.readout = nn.Linear(n_in, cfg.embed_dim) if n_in else None
        self.attn = nn.Linear(cfg.embed_dim, cfg.embed_dim)  # W_a, b_a (Eq. 6)
        self.q = nn.Parameter(torch.randn(cfg.embed_dim) / cfg.embed_dim**0.5)
        self.gate_kind = cfg.gate if cfg.gating else "none"
        if self.gate_kind == "linear":
            self.gate = nn.Linear(cfg.embed_dim, cfg.embed_dim)  # A, b (Eq. 8)
        elif self.gate_kind == "mlp":  # the authors' FeatureAttention, applied to each h_t
            self.gate = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.ReLU(), nn.Linear(cfg.embed_dim, cfg.embed_dim)
            )
        else:
            self.gate = None
        if cfg.prototypes:
            shape = (n_classes, cfg.prototypes_per_class, cfg.embed_dim)
            self.prototypes = nn.Parameter(torch.randn(shape) * cfg.prototype_std)
            self.head = None
        else:
            self.prototypes = None
            self.head = nn.Linear(cfg.embed_dim, n_classes)
        log_tau = torch.tensor(float(cfg.tau)).log()
        self.log_tau = nn.Parameter(log_tau.clone()) if cfg.tau_learnable else None
        # its own memory: safetensors refuses to save two tensors that share it
        self.register_buffer("fixed_log_tau", log_tau)

    @property
    def tau(self) -> torch.Tensor:
        if self.log_tau is None:
            return self.fixed_log_tau.exp()
        return self.log_tau.exp().clamp(*TAU_RANGE)

    def embed_timesteps(self, f: torch.Tensor, backbone_dropped: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 5: h_t = proj(backbone(f_t)), one backbone shared by all timesteps, plus R x for x the DCT_low
        block and z_t / sigma_t that model.dct_readout and model.latent_readout read. (B, T, ...) -> (B, T, D).
        Tiles (B, K, T, ...) of one image are pooled like the positions of one map: their h_t are averaged
        (tiled evaluation of a model trained on crops).
        `backbone_dropped` (B,) bool: images whose h_t is the readout's alone (train.backbone_dropout); with
        `skip_dropped` the backbone runs on the other images only, so BatchNorm's batch statistics are theirs."""
        tiles = f.shape[1] if f.dim() == 6 else 1
        f = f.flatten(0, 1) if f.dim() == 6 else f
        b, t = f.shape[:2]
        x = f.flatten(0, 1)
        if getattr(self, "channels_last_inputs", False):
            x = x.contiguous(memory_format=torch.channels_last)
        if self.readout is None:
            return self.proj(self.backbone(x)).view(b // tiles, tiles, t, -1).mean(1)
        r = self.readout(readout_input(x, self.dct, self.latent)).view(b // tiles, tiles, t, -1)
        if backbone_dropped is None:
            return (self.proj(self.backbone(x)).view_as(r) + r).mean(1)
        kept = ~backbone_dropped.view(-1, 1).expand(-1, tiles * t).reshape(-1)
        if self.skip_dropped and int(kept.sum()) >= 2:  # BatchNorm needs 2 inputs; DDP every parameter used
            seen = kept.nonzero()[:, 0]
            h = r.new_zeros((len(x), r.shape[-1])).index_copy(0, seen, self.proj(self.backbone(x[seen])))
        else:  # computed and zeroed: the dropped images count in BatchNorm's batch statistics
            h = self.proj(self.backbone(x)).masked_fill(~kept.view(-1, 1), 0.0)
        return (h.view_as(r) + r).mean(1)

    def forward(
        self, f: torch.Tensor, dropped: torch.Tensor | None = None, backbone_dropped: torch.Tensor | None = None
    ) -> Output:
        """`dropped` (B, T) bool: timesteps whose h_t (and w_t) are zeroed (time-dropout, training only);
        `backbone_dropped` (B,) bool: images whose h_t is the readout's alone (training only)."""
        h = self.embed_timesteps(f, backbone_dropped)
        if dropped is not None:
            h = h.masked_fill(dropped.unsqueeze(-1), 0.0)
        a, h_bar = temporal_attention(h, self.attn(h), self.q)
        if self.gate_kind == "linear":
            w = gate(h_bar, self.gate.weight, self.gate.bias)
        elif self.gate_kind == "mlp":
            w_t = torch.sigmoid(self.gate(h))
            if dropped is not None:
                w_t = w_t.masked_fill(dropped.unsqueeze(-1), 0.0)
            w = (a.unsqueeze(-1) * w_t).sum(dim=1)
        else:
            w = torch.ones_like(h_bar)
        if self.prototypes is None:
            return Output(self.head(h_bar * w), h, a, h_bar, w, None)
        d = prototype_distances(h_bar, w, self.prototypes)
        return Output(class_logits(soft_min_distance(d, self.tau)), h, a, h_bar, w, d)
