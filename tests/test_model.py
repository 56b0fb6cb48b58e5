"""The model: ResNet layouts, shapes, attention, and the prototype posterior (Eq. 5-11)."""

import math

import pytest
import torch

from leakpipe.pipeline.config import ModelConfig
from leakpipe.pipeline.nn.model import ProtoLeakNet as _ProtoLeakNet, ResNet


def ProtoLeakNet(n_classes, in_channels=8, side=16, **model):
    """The model from its config section, as the stage builds it (imagenet stem unless given)."""
    return _ProtoLeakNet(ModelConfig(**{"stem": "imagenet", **model}), n_classes, in_channels, side)


# torchvision's resnet18/50/101 have 11,689,512 / 25,557,032 / 44,549,160 parameters with a
# 1000-class fc on 3-channel input; without the fc (512*1000+1000 or 2048*1000+1000) that is:
BACKBONE_PARAMS = {"resnet18": 11_176_512, "resnet50": 23_508_032, "resnet101": 42_500_160}


@pytest.mark.parametrize("name", BACKBONE_PARAMS)
def test_resnet_parameter_counts_match_torchvision(name):
    net = ResNet(name, in_channels=3)
    assert sum(p.numel() for p in net.parameters()) == BACKBONE_PARAMS[name]


def test_first_conv_takes_the_feature_channels():
    net = ResNet("resnet18", in_channels=8)
    assert net.conv1.weight.shape == (64, 8, 7, 7)
    assert net(torch.randn(2, 8, 32, 32)).shape == (2, 512)


def test_small_stem_keeps_every_position():
    net = ResNet("resnet18", in_channels=8, stem="small")
    assert net.conv1.weight.shape == (64, 8, 3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    x = torch.randn(2, 8, 16, 16)
    assert net.layer1(net.maxpool(net.bn1(net.conv1(x)))).shape[-2:] == (16, 16)  # ImageNet's keeps 4 x 4
    from leakpipe.pipeline.nn.backbones import build, resolve_stem

    assert resolve_stem("auto", 32) == "small" and resolve_stem("auto", 256) == "imagenet"
    assert build("resnet18", 8, 32, "auto").conv1.kernel_size == (3, 3)
    assert build("resnet18", 8, 256, "auto").conv1.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="unknown stem"):
        ResNet("resnet18", stem="tiny")


def test_tiles_are_pooled_like_positions():
    """(B, K, T, ...) tiles: the backbone's pooled features averaged over the K tiles of an image."""
    torch.manual_seed(0)
    m = ProtoLeakNet(n_classes=3, embed_dim=8, prototypes_per_class=2).eval()
    f = torch.randn(2, 4, 3, 8, 16, 16)
    with torch.no_grad():
        pooled = m.backbone(f.flatten(0, 2)).view(2, 4, 3, -1).mean(1)
        torch.testing.assert_close(m.embed_timesteps(f), m.proj(pooled))
        assert m(f).logits.shape == (2, 3)


def test_shapes_attention_and_gating():
    torch.manual_seed(0)
    m = ProtoLeakNet(n_classes=5, embed_dim=16, prototypes_per_class=3).eval()
    out = m(torch.randn(4, 3, 8, 16, 16))
    assert out.logits.shape == (4, 5) and out.h_t.shape == (4, 3, 16) and out.a_t.shape == (4, 3)
    assert out.distances.shape == (4, 5, 3)
    torch.testing.assert_close(out.a_t.sum(1), torch.ones(4))
    torch.testing.assert_close(out.h_bar, (out.a_t.unsqueeze(-1) * out.h_t).sum(1))
    assert ((out.w > 0) & (out.w < 1)).all()


def test_backbone_is_shared_across_timesteps():
    torch.manual_seed(0)
    m = ProtoLeakNet(n_classes=2, embed_dim=8).eval()
    f = torch.randn(1, 3, 8, 16, 16)
    f[:, 2] = f[:, 0]
    h = m.embed_timesteps(f)
    torch.testing.assert_close(h[:, 0], h[:, 2])


def test_prototype_posterior_equals_direct_equations():
    torch.manual_seed(1)
    m = ProtoLeakNet(n_classes=3, embed_dim=6, prototypes_per_class=2, tau=0.7).eval()
    out = m(torch.randn(2, 3, 8, 16, 16))
    pi = torch.softmax(out.logits, dim=1)
    for b in range(2):
        s = []
        for c in range(3):
            d = [float((out.w[b] * (out.h_bar[b] - m.prototypes[c, k]) ** 2).sum().detach()) for k in range(2)]
            s.append(-0.7 * torch.log(torch.tensor(d).neg().div(0.7).exp().sum()))
        direct = torch.softmax(-torch.stack(s), dim=0)
        torch.testing.assert_close(pi[b], direct.float(), rtol=1e-4, atol=1e-6)


def test_nearest_prototype_wins():
    m = ProtoLeakNet(n_classes=2, embed_dim=4, prototypes_per_class=1, gating=False).eval()
    with torch.no_grad():
        m.prototypes.zero_()
        m.prototypes[1] += 10.0
    from leakpipe.pipeline.nn.model import class_logits, prototype_distances, soft_min_distance

    h = torch.zeros(1, 4)  # sits on class 0's prototype
    d = prototype_distances(h, torch.ones(1, 4), m.prototypes)
    assert class_logits(soft_min_distance(d, 1.0)).argmax().item() == 0


def test_ablation_heads():
    lin = ProtoLeakNet(n_classes=3, embed_dim=8, prototypes=False, gating=False).eval()
    out = lin(torch.randn(2, 3, 8, 16, 16))
    assert out.distances is None and out.logits.shape == (2, 3) and bool((out.w == 1).all())
    learn = ProtoLeakNet(n_classes=3, embed_dim=8, tau_learnable=True, tau=2.0)
    assert learn.log_tau.requires_grad and float(learn.tau.detach()) == pytest.approx(2.0)


@pytest.mark.parametrize("side", [8, 12, 16])
def test_dct_block_reads_each_coefficient_from_its_place(side):
    """The readout's input is the DCT_low block itself (Eq. 4), also when k does not divide the side."""
    from leakpipe.pipeline.math.dct import dct2
    from leakpipe.pipeline.math.features import features
    from leakpipe.pipeline.nn.model import dct_block

    torch.manual_seed(0)
    z = torch.randn(3, 4, side, side)
    f = features(z[:, None], 8, "coeffs")[:, 0]
    torch.testing.assert_close(dct_block(f, 4, 8), dct2(z)[..., :8, :8].flatten(1))


def test_dct_readout_adds_a_linear_map_of_the_block_to_h_t():
    """model.dct_readout = linear: h_t = proj(backbone(f_t)) + R vec(DCT_low); none (and no DCT map): the
    backbone alone. The readout sees where each coefficient sits: moving a coefficient changes h_t."""
    from leakpipe.pipeline.nn.model import dct_block

    torch.manual_seed(0)
    cfg = ModelConfig(stem="imagenet", embed_dim=8, prototypes_per_class=2, dct_readout="linear")
    m = _ProtoLeakNet(cfg, 3, 8, 16, dct=(4, 8)).eval()
    assert m.readout.in_features == 4 * 64
    f = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        x = f.flatten(0, 1)
        want = (m.proj(m.backbone(x)) + m.readout(dct_block(x, 4, 8))).view(2, 3, -1)
        torch.testing.assert_close(m.embed_timesteps(f), want)
    assert _ProtoLeakNet(ModelConfig(dct_readout="none"), 3, 8, 16, dct=(4, 8)).readout is None
    assert _ProtoLeakNet(cfg, 3, 4, 16).readout is None  # features.dct_map = none: no block to read


def test_latent_readout_reads_z_t_in_place_beside_the_block():
    """model.latent_readout = linear: the readout reads the DCT_low block, then z_t / sigma_t flattened
    (f_t's first channels); each value of z_t has its own weights. auto: linear up to 64 x 64 positions."""
    from leakpipe.pipeline.nn.model import dct_block, resolve_latent_readout

    torch.manual_seed(0)
    cfg = ModelConfig(stem="imagenet", embed_dim=8, prototypes_per_class=2)
    m = _ProtoLeakNet(cfg, 3, 8, 16, dct=(4, 8), latent=(4, 16, 16)).eval()
    assert m.readout.in_features == 4 * 64 + 4 * 256
    f = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        x = f.flatten(0, 1)
        read = torch.cat([dct_block(x, 4, 8), x[:, :4].flatten(1)], 1)
        torch.testing.assert_close(m.embed_timesteps(f), (m.proj(m.backbone(x)) + m.readout(read)).view(2, 3, -1))
        g = f.clone()
        g[:, :, 0, 3, 5] += 1.0  # one value of z_t: h_t moves by that value's column of R
        backbone_moved = m.proj(m.backbone(g.flatten(0, 1))) - m.proj(m.backbone(x))
        moved = m.embed_timesteps(g) - m.embed_timesteps(f) - backbone_moved.view(2, 3, -1)
        column = m.readout.weight[:, 4 * 64 + 3 * 16 + 5]
        torch.testing.assert_close(moved, column.expand(2, 3, 8), atol=1e-5, rtol=1e-5)
    # z_t alone (no DCT readout, or no DCT map): only the latent's weights
    alone = _ProtoLeakNet(ModelConfig(dct_readout="none"), 3, 8, 16, dct=(4, 8), latent=(4, 16, 16))
    assert alone.readout.in_features == 4 * 256
    assert [resolve_latent_readout("auto", n) for n in (64 * 64, 64 * 64 + 1)] == ["linear", "none"]
    assert resolve_latent_readout("none", 16) == "none" and resolve_latent_readout("linear", 10**6) == "linear"


def test_small_prototype_init_starts_every_class_at_chance():
    """model.prototype_std: with the default 0.01 every class starts at nearly the same distance (the
    loss at ln C); the paper's 0.5 in D = 128 starts far from it."""
    torch.manual_seed(0)
    f, y = torch.randn(16, 3, 8, 16, 16), torch.arange(16) % 5
    losses = {}
    for std in (0.01, 0.5):
        m = ProtoLeakNet(n_classes=5, embed_dim=128, prototype_std=std).eval()
        assert float(m.prototypes.detach().std()) == pytest.approx(std, rel=0.05)
        with torch.no_grad():
            losses[std] = float(torch.nn.functional.cross_entropy(m(f).logits, y))
    assert abs(losses[0.01] - math.log(5)) < 0.05 < abs(losses[0.5] - math.log(5))


def test_one_registry_names_the_backbones():
    """nn/zoo.py lists each backbone once: `model.backbone`'s choices are its names, each has a family
    that `build` knows (and a ResNet its depth), and another name is refused with the list."""
    from leakpipe.pipeline.config import CHOICES
    from leakpipe.pipeline.nn.backbones import FAMILIES, RESNETS, build
    from leakpipe.pipeline.nn.zoo import BACKBONES

    assert CHOICES["model.backbone"] == tuple(BACKBONES)
    assert {BACKBONES[n] for n in BACKBONES} <= FAMILIES.keys()
    assert {n for n, family in BACKBONES.items() if family == "resnet"} == RESNETS.keys()
    assert isinstance(build("resnet18", 8, 32), ResNet)
    with pytest.raises(ValueError, match="expected one of resnet18, resnet50"):
        build("resnet19", 8, 32)
