"""Proto-LeakNet: a shared ResNet over f_t, temporal attention, gating and prototypes (Eq. 5-11).

The ResNets are written in plain torch (torchvision's wheels are CUDA builds that do not import with
the CPU torch used here); their layout and parameter counts are torchvision's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------ equations as pure functions
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


def responsibilities(d: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. 15: pi_cm = softmax_m(-d_cm / tau), which prototype of each class explains the sample."""
    return torch.softmax(-d / tau, dim=-1)


# ------------------------------------------------------------------ ResNets
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3)),
           "resnet101": (Bottleneck, (3, 4, 23, 3))}


class ResNet(nn.Module):
    """torchvision's ResNet up to global average pooling, with `in_channels` inputs (Eq. 5)."""

    def __init__(self, name: str = "resnet18", in_channels: int = 8):
        super().__init__()
        block, layers = RESNETS[name]
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


# ------------------------------------------------------------------ the model
@dataclass
class Output:
    logits: torch.Tensor  # (B, C): log of the class posterior up to a constant
    h_t: torch.Tensor  # (B, T, D)
    a_t: torch.Tensor  # (B, T)
    h_bar: torch.Tensor  # (B, D)
    w: torch.Tensor  # (B, D)
    distances: torch.Tensor | None  # (B, C, M) or None for the linear head


class ProtoLeakNet(nn.Module):
    def __init__(self, n_classes: int, in_channels: int = 8, backbone: str = "resnet18",
                 embed_dim: int = 128, prototypes: bool = True, prototypes_per_class: int = 4,
                 gating: bool = True, tau: float = 1.0, tau_learnable: bool = False):
        super().__init__()
        self.backbone = ResNet(backbone, in_channels)
        self.proj = nn.Linear(self.backbone.out_features, embed_dim)
        self.attn = nn.Linear(embed_dim, embed_dim)  # W_a, b_a (Eq. 6)
        self.q = nn.Parameter(torch.randn(embed_dim) / embed_dim ** 0.5)
        self.gate = nn.Linear(embed_dim, embed_dim) if gating else None  # A, b (Eq. 8)
        if prototypes:
            self.prototypes = nn.Parameter(torch.randn(n_classes, prototypes_per_class, embed_dim) * 0.5)
            self.head = None
        else:
            self.prototypes = None
            self.head = nn.Linear(embed_dim, n_classes)
        log_tau = torch.tensor(float(tau)).log()
        self.log_tau = nn.Parameter(log_tau) if tau_learnable else None
        self.register_buffer("fixed_log_tau", log_tau)

    @property
    def tau(self) -> torch.Tensor:
        return (self.log_tau if self.log_tau is not None else self.fixed_log_tau).exp()

    def embed_timesteps(self, f: torch.Tensor) -> torch.Tensor:
        """Eq. 5: h_t = proj(ResNet(f_t)), one backbone shared by all timesteps. (B, T, ...) -> (B, T, D)."""
        b, t = f.shape[:2]
        return self.proj(self.backbone(f.flatten(0, 1))).view(b, t, -1)

    def forward(self, f: torch.Tensor) -> Output:
        h = self.embed_timesteps(f)
        a, h_bar = temporal_attention(h, self.attn(h), self.q)
        w = gate(h_bar, self.gate.weight, self.gate.bias) if self.gate is not None else torch.ones_like(h_bar)
        if self.prototypes is None:
            return Output(self.head(h_bar * w), h, a, h_bar, w, None)
        d = prototype_distances(h_bar, w, self.prototypes)
        return Output(class_logits(soft_min_distance(d, self.tau)), h, a, h_bar, w, d)
