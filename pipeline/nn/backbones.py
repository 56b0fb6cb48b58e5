"""The backbones of Eq. 5 (paper Table 4) in plain torch, with torchvision's module and parameter names.

torchvision's wheels do not import with the CPU torch used here, and timm needs torchvision, so the
networks are written out. Their layouts and parameter counts are torchvision's (tested), so a
torchvision state dict loads (`model.init`). Each backbone maps (B, C, H, W) to pooled features
(B, out_features), and `stages` gives the pooled features after each stage (paper Fig. 3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from leakpipe.pipeline.nn.zoo import BACKBONES


# ------------------------------------------------------------------ ResNet 18/50/101
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


STEMS = ("imagenet", "small")


def _stem_is_small(stem: str) -> bool:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")
    return stem == "small"


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


RESNETS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """torchvision's ResNet up to global average pooling (and its `fc` with `num_classes`).

    stem "imagenet": torchvision's 7 x 7 stride-2 convolution and 3 x 3 stride-2 max-pool, which keep
    1 position in 16 before the first block; "small": a 3 x 3 stride-1 convolution and no max-pool
    (the CIFAR layout), for 16-64 px inputs such as latents. The parameter names are the same.
    """

    first_conv = "conv1"

    def __init__(self, name: str = "resnet18", in_channels: int = 8, num_classes: int = 0, stem: str = "imagenet"):
        super().__init__()
        block, layers = RESNETS[name]
        small = _stem_is_small(stem)
        self.conv1 = nn.Conv2d(in_channels, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, n in enumerate(layers):
            width = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = cin
        self.fc = nn.Linear(cin, num_classes) if num_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self, x) -> list[torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x.mean(dim=(2, 3)))
        return out

    def forward(self, x):
        return self.stages(x)[-1]


# ------------------------------------------------------------------ EfficientNet-B4
def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of 8, never more than 10% down."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), batch norm, SiLU (keys 0, 1)."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.SiLU(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int, drop: float):
        super().__init__()
        hidden = _divisible(cin * expand)
        layers = [_conv_bn(cin, hidden, 1)] if hidden != cin else []
        layers += [
            _conv_bn(hidden, hidden, k, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, cin // 4)),
            _conv_bn(hidden, cout, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.residual, self.drop = stride == 1 and cin == cout, drop

    def forward(self, x):
        out = self.block(x)
        if not self.residual:
            return out
        if self.training and self.drop > 0:  # stochastic depth, per row, as torchvision's "row" mode
            keep = torch.empty(len(x), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - self.drop)
            out = out * keep / (1 - self.drop)
        return out + x


# (expand ratio, kernel, stride, in, out, layers) of EfficientNet-B0; B4 scales width 1.4, depth 1.8
_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class EfficientNet(nn.Module):
    """torchvision's efficientnet_b4 (width 1.4, depth 1.8, stochastic depth 0.2) up to pooling; with
    stem "small" its first convolution has stride 1."""

    first_conv = "features.0.0"

    def __init__(
        self,
        in_channels: int = 8,
        num_classes: int = 0,
        width: float = 1.4,
        depth: float = 1.8,
        stochastic_depth: float = 0.2,
        stem: str = "imagenet",
    ):
        super().__init__()
        conf = [
            (e, k, s, _divisible(i * width), _divisible(o * width), int(math.ceil(n * depth)))
            for e, k, s, i, o, n in _B0
        ]
        total, done = sum(c[-1] for c in conf), 0
        layers: list[nn.Module] = [_conv_bn(in_channels, conf[0][3], 3, 1 if _stem_is_small(stem) else 2)]
        for e, k, s, i, o, n in conf:
            stage = []
            for j in range(n):
                stage.append(MBConv(e, k, s if j == 0 else 1, i if j == 0 else o, o, stochastic_depth * done / total))
                done += 1
            layers.append(nn.Sequential(*stage))
        self.out_features = 4 * conf[-1][4]
        layers.append(_conv_bn(conf[-1][4], self.out_features, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = (
            nn.Sequential(nn.Dropout(0.4), nn.Linear(self.out_features, num_classes)) if num_classes else None
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stages(self, x) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i > 0:
                out.append(x.mean(dim=(2, 3)))
        return out

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


# ------------------------------------------------------------------ ViT-B/16
class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, heads: int, dim: int, hidden: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, hidden) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    """torchvision's vit_b_16 layout (12 layers, 12 heads, width 768, MLP 3072), its class token as the
    pooled feature. On 32 x 32 latents it uses 4 x 4 patches (an 8 x 8 grid of 64 tokens; 16 x 16
    patches would leave 4) and learned position embeddings for that grid; `model.init` resizes a
    torchvision checkpoint's patch kernel and 14 x 14 position grid to these (see `adapt_state`)."""

    first_conv = "conv_proj"

    def __init__(
        self,
        in_channels: int = 8,
        image_size: int = 32,
        patch_size: int = 4,
        num_classes: int = 0,
        layers: int = 12,
        heads: int = 12,
        dim: int = 768,
        hidden: int = 3072,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit_b_16: the input side {image_size} is not a multiple of the patch size {patch_size}")
        self.image_size, self.patch_size, self.out_features = image_size, patch_size, dim
        self.conv_proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((image_size // patch_size) ** 2 + 1, layers, heads, dim, hidden)
        self.heads = nn.Sequential()  # torchvision's classifier, `heads.head`, only with num_classes
        if num_classes:
            self.heads.add_module("head", nn.Linear(dim, num_classes))
        fan_in = in_channels * patch_size**2
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)

    def stages(self, x) -> list[torch.Tensor]:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vit_b_16 was built for {self.image_size} x {self.image_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1) + self.encoder.pos_embedding
        out = []
        for i, block in enumerate(self.encoder.layers):
            x = block(x)
            if i % 3 == 2:  # 4 stages of 3 layers each, for the per-stage maps
                out.append((self.encoder.ln(x) if i == len(self.encoder.layers) - 1 else x)[:, 0])
        return out

    def forward(self, x):
        return self.stages(x)[-1]


# How each family of zoo.BACKBONES is built for (name, in_channels, side, stem); the ViT's patch size
# adapts to `side` instead of taking a stem
FAMILIES = {
    "resnet": lambda name, in_channels, side, stem: ResNet(name, in_channels, stem=stem),
    "efficientnet": lambda name, in_channels, side, stem: EfficientNet(in_channels, stem=stem),
    "vit": lambda name, in_channels, side, stem: VisionTransformer(
        in_channels, side, patch_size=4 if side <= 64 else 16
    ),
}


SMALL_INPUT = 64  # stem "auto": z0 up to this side gets the small stem


def resolve_stem(stem: str, side: int) -> str:
    """`model.stem` for z0 of side `side`: "auto" is "small" up to SMALL_INPUT (the latents of images
    up to 512 px), else "imagenet" (pixels, whose 7 x 7 stride-2 stem still sees every pixel)."""
    return ("small" if side <= SMALL_INPUT else "imagenet") if stem == "auto" else stem


def build(name: str, in_channels: int, side: int, stem: str = "imagenet") -> nn.Module:
    """A backbone of Table 4 (nn/zoo.py) for `in_channels` feature maps of side `side`, without its
    classifier. The ViT's patch size adapts to `side` instead of taking a stem."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return FAMILIES[BACKBONES[name]](name, in_channels, side, resolve_stem(stem, side))


def adapt_state(state: dict, backbone: nn.Module) -> tuple[dict, list[str]]:
    """A torchvision-named state dict made to fit `backbone`: (state, what was adapted, in words).

    - The first convolution of an RGB checkpoint takes the feature channels: each of the C input
      channels gets the mean of the 3 RGB kernels, scaled by 3 / C, so a flat input excites it as it
      would the RGB network (the same mean-kernel idea as the authors' code, without copying RGB
      kernels onto unrelated channels).
    - A first kernel of another size (a ViT's patches, the small stem's 3 x 3 against ImageNet's
      7 x 7) is resized bilinearly, scaled to keep its response to a flat input; a ViT's position
      grid is resized bicubically to the token grid; the class token's stays.
    - The classifier (`fc`, `classifier`, `heads`) is dropped: the model has its own head.
    Shapes that still differ are an error naming each key.
    """
    own, notes = backbone.state_dict(), []
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "heads."))}
    key = f"{backbone.first_conv}.weight"
    if key in state and state[key].shape[1] != own[key].shape[1]:
        w, c = state[key], own[key].shape[1]
        state[key] = w.mean(dim=1, keepdim=True).repeat(1, c, 1, 1) * (w.shape[1] / c)
        notes.append(f"{key}: {w.shape[1]} input channels -> {c} (mean RGB kernel x {w.shape[1]}/{c})")
    if key in state and state[key].shape[-2:] != own[key].shape[-2:]:  # ViT patches, or the small stem
        w, k = state[key], own[key].shape[-1]
        state[key] = F.interpolate(w, size=(k, k), mode="bilinear", align_corners=False) * (w.shape[-1] / k) ** 2
        notes.append(
            f"{key}: {w.shape[-1]} x {w.shape[-1]} kernel -> {k} x {k} (bilinear, same response to a flat input)"
        )
    pos = "encoder.pos_embedding"
    if pos in state and state[pos].shape != own[pos].shape:
        p, n_own = state[pos], own[pos].shape[1] - 1
        g, g_own = math.isqrt(p.shape[1] - 1), math.isqrt(n_own)
        grid = p[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g_own, g_own), mode="bicubic", align_corners=False)
        state[pos] = torch.cat([p[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n_own, -1)], dim=1)
        notes.append(f"{pos}: {g} x {g} grid -> {g_own} x {g_own} (bicubic)")
    bad = [
        f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if bad or missing or unexpected:
        raise ValueError(
            "; ".join(
                filter(
                    None,
                    [
                        f"shapes differ ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})" if bad else "",
                        f"missing {len(missing)} keys ({', '.join(missing[:5])})" if missing else "",
                        f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:5])})" if unexpected else "",
                    ],
                )
            )
        )
    return state, notes
