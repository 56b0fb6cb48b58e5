"""The paper's remaining rows: Table 4 backbones with torchvision's layouts, model.init, the pixels
encoder, the authors-code profile, and the DCT statistics options."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leakpipe.pipeline.config import PROFILES, ConfigError
from leakpipe.pipeline.config_files import load_config
from leakpipe.pipeline.engine.trained import build_model, init_backbone
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.math.features import RunningStats, standardise
from leakpipe.pipeline.nn.backbones import EfficientNet, ResNet, VisionTransformer, adapt_state
from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode, train
from tests.conftest import synth_workspace

# torchvision's documented parameter counts of the 1000-class, 3-channel models
TORCHVISION_PARAMS = {"efficientnet_b4": 19_341_616, "vit_b_16": 86_567_656, "resnet18": 11_689_512}
FAST = ["train.epochs=1", "model.embed_dim=8", "model.prototypes_per_class=1", "train.batch_size=16"]


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_torchvision():
    assert count(EfficientNet(3, num_classes=1000)) == TORCHVISION_PARAMS["efficientnet_b4"]
    assert count(VisionTransformer(3, 224, 16, num_classes=1000)) == TORCHVISION_PARAMS["vit_b_16"]
    assert count(ResNet("resnet18", 3, num_classes=1000)) == TORCHVISION_PARAMS["resnet18"]


def test_state_dict_keys_follow_torchvision_names():
    e = EfficientNet(3, num_classes=1000).state_dict()
    assert {
        "features.0.0.weight",
        "features.0.1.running_mean",
        "features.1.0.block.1.fc1.weight",
        "features.2.0.block.0.0.weight",
        "features.8.0.weight",
        "classifier.1.weight",
    } <= e.keys()
    assert len([k for k in e if k.startswith("features.") and k.endswith(".block.0.0.weight")]) == 32  # 32 MBConvs
    v = VisionTransformer(3, 224, 16, num_classes=1000).state_dict()
    assert {
        "conv_proj.weight",
        "class_token",
        "encoder.pos_embedding",
        "encoder.layers.11.ln_1.weight",
        "encoder.layers.0.self_attention.in_proj_weight",
        "encoder.layers.0.mlp.0.weight",
        "encoder.layers.0.mlp.3.bias",
        "encoder.ln.weight",
        "heads.head.weight",
    } <= v.keys()
    assert v["encoder.pos_embedding"].shape == (1, 197, 768)


@pytest.mark.parametrize("backbone", ["efficientnet_b4", "vit_b_16"])
def test_each_backbone_takes_a_training_step(backbone):
    cfg = load_config(None, [*FAST, f"model.backbone={backbone}"])
    torch.manual_seed(0)
    model = build_model(cfg, 3, (4, 32, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    f, y = torch.randn(4, 3, 8, 32, 32), torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(model(f).logits, y)
    loss.backward()
    opt.step()
    after = model.backbone.state_dict()
    assert torch.isfinite(loss) and any(not torch.equal(before[k], after[k]) for k in before)
    first = model.backbone.first_conv + ".weight"
    assert after[first].shape[1] == 8  # the 2C feature channels


def test_first_conv_adaptation_and_its_errors(tmp_path):
    src = ResNet("resnet18", 3, num_classes=1000)
    state, notes = adapt_state(src.state_dict(), ResNet("resnet18", 8))
    w3 = src.conv1.weight.detach()
    torch.testing.assert_close(state["conv1.weight"], w3.mean(1, keepdim=True).repeat(1, 8, 1, 1) * 3 / 8)
    # a flat input excites the adapted kernel as it does the RGB one
    flat3, flat8 = torch.ones(1, 3, 7, 7), torch.ones(1, 8, 7, 7)
    torch.testing.assert_close((state["conv1.weight"] * flat8).sum((1, 2, 3)), (w3 * flat3).sum((1, 2, 3)))
    assert "fc.weight" not in state and any("conv1.weight: 3 input channels -> 8" in n for n in notes)
    with pytest.raises(ValueError, match="shapes differ.*layer1.0.conv1.weight"):
        adapt_state(ResNet("resnet50", 3).state_dict(), ResNet("resnet18", 8))
    vit = VisionTransformer(3, 224, 16, num_classes=10).state_dict()
    small, notes = adapt_state(vit, VisionTransformer(8, 32, 4))
    assert small["conv_proj.weight"].shape == (768, 8, 4, 4) and small["encoder.pos_embedding"].shape == (1, 65, 768)
    torch.testing.assert_close(small["encoder.pos_embedding"][:, 0], vit["encoder.pos_embedding"][:, 0])
    # through the config: a file that fits loads, one that does not is an error naming the file
    cfg = load_config(None, FAST)
    model = build_model(cfg, 3, (4, 32, 32))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "rn18.safetensors")
    init_backbone(model, tmp_path / "rn18.safetensors")  # the default small stem: a resized 3 x 3 kernel
    torch.testing.assert_close(
        model.backbone.conv1.weight, adapt_state(src.state_dict(), model.backbone)[0]["conv1.weight"]
    )
    save_file({"conv1.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "bad.safetensors")  # 32 filters, not 64
    with pytest.raises(UserError, match=r"bad.safetensors does not fit model.backbone.*conv1.weight"):
        init_backbone(model, tmp_path / "bad.safetensors")


def test_profile_authors_code_reaches_the_model_and_the_loop():
    cfg = load_config(None, (), profile="authors-code")
    assert (cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.model.prototypes_per_class) == ("linear", [0], 6)
    assert (cfg.features.dct_map, cfg.features.standardize, cfg.model.gate) == ("none", False, "mlp")
    assert cfg.model.tau_learnable and (cfg.train.time_dropout, cfg.train.entropy_penalty) == (0.3, 0.1)
    model = build_model(cfg, 3, (4, 32, 32))
    assert model.backbone.conv1.in_channels == 4  # no DCT map: z_t / sigma_t alone
    assert isinstance(model.gate, torch.nn.Sequential) and model.prototypes.shape[1] == 6
    # the released code's ProtoHead draws its prototypes at 0.01; no DCT map, so no readout to drop
    assert cfg.model.prototype_std == 0.01 and model.readout is None
    paper = load_config(None, (), profile="paper")
    assert (paper.model.prototype_std, paper.model.dct_readout, paper.train.backbone_dropout) == (0.5, "none", 0)
    assert paper.features.dct_stats == "per_channel" and build_model(paper, 3, (4, 32, 32)).readout is None
    assert (paper.model.latent_readout, paper.features.latent_stats) == ("none", "per_channel")
    with torch.no_grad():
        model.log_tau.fill_(np.log(50.0))
    assert float(model.tau.detach()) == pytest.approx(5.0)  # clamped as in their LSEAggregator
    # the TOML and --set still win over the profile
    assert load_config(None, ["diffusion.timesteps=0,5"], profile="authors-code").diffusion.timesteps == [0, 5]
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(None, (), profile="nope")
    assert set(PROFILES) == {"leakpipe", "paper", "authors-code", "pixels"}


def test_time_dropout_and_entropy_penalty():
    from leakpipe.pipeline.engine.training import attention_entropy_penalty, time_dropout_mask

    g = torch.Generator().manual_seed(0)
    mask = time_dropout_mask(10_000, 3, 0.3, g)
    assert not mask.all(dim=1).any()  # never every timestep
    assert mask[:, 1:].float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert time_dropout_mask(5, 3, 0.0, g) is None and time_dropout_mask(5, 1, 0.3, g) is None
    assert float(attention_entropy_penalty(torch.full((4, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_entropy_penalty(torch.tensor([[1.0, 0.0, 0.0]]))) == pytest.approx(np.log(3), abs=1e-4)
    cfg = load_config(None, [*FAST, "diffusion.timesteps=0,5,10", "model.gate=mlp"])
    model = build_model(cfg, 2, (4, 32, 32)).train()
    out = model(torch.randn(2, 3, 8, 32, 32), torch.tensor([[False, True, True], [False, False, False]]))
    assert torch.equal(out.h_t[0, 1:], torch.zeros_like(out.h_t[0, 1:]))


def test_dct_statistics_per_coefficient():
    f = torch.randn(50, 2, 8, 4, 4) * torch.arange(1, 17).float().view(1, 1, 1, 4, 4)
    stats = RunningStats()
    stats.update(f[:20]), stats.update(f[20:])
    mean, std = stats.result()
    assert mean.shape == (2, 8)
    torch.testing.assert_close(mean, f.double().mean(dim=(0, 3, 4)).float(), atol=1e-5, rtol=1e-5)
    mean4, std4 = stats.result(dct_channels=4)
    assert mean4.shape == (2, 8, 4, 4)
    torch.testing.assert_close(std4[:, 4:], f.double().std(dim=0, unbiased=False)[:, 4:].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std4[:, :4], std[:, :4, None, None].expand(2, 4, 4, 4))
    z = standardise(f, mean4, std4)
    assert z[:, :, 4:].std(dim=0).mean().item() == pytest.approx(1.0, abs=0.05)
    # features.latent_stats = per_position: the first channels (z_t / sigma_t) per position too
    both_mean, both_std = stats.result(dct_channels=4, latent_channels=4)
    torch.testing.assert_close(both_std, f.double().std(dim=0, unbiased=False).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both_mean, f.double().mean(dim=0).float(), atol=1e-5, rtol=1e-5)
    latent_mean, latent_std = stats.result(latent_channels=4)
    torch.testing.assert_close(latent_std[:, 4:], std[:, 4:, None, None].expand(2, 4, 4, 4))
    torch.testing.assert_close(latent_mean[:, :4], both_mean[:, :4])


@pytest.fixture(scope="module")
def pixels_ws(tmp_path_factory):
    root = synth_workspace(tmp_path_factory.mktemp("pixels"))
    return root


def test_pixels_encoder_end_to_end(pixels_ws):
    """vae.source = pixels: stage one stores the preprocessed image as z0's mean, under its own
    fingerprint, and training reads it like any latent store."""
    ws = Workspace(pixels_ws)
    cfg = ws.config(None, [*FAST, "vae.source=pixels"])
    res = encode.run(graph(ws, cfg), "closed", log=lambda m: None)
    lat = graph(ws, cfg).plan("encode", "closed").data
    assert lat.store != graph(ws, ws.config(None, FAST)).plan("encode", "closed").data.store  # another encoder
    store = latent_store.open_store(lat.store)
    assert store["mean"].shape[1:] == (3, 32, 32)
    from leakpipe.pipeline.engine.images import load_image
    from leakpipe.pipeline.engine.images import to_model_range

    img = load_image(lat.manifest.abspath(0), cfg.preprocess)
    want = to_model_range(torch.from_numpy(img)[None]).numpy()[0]
    np.testing.assert_allclose(latent_store.read_rows(store, np.array([0]))["mean"][0], want, atol=1e-6)
    assert "pixels" in res.summary()
    assert encode.run(graph(ws, cfg), "closed", log=lambda m: None).up_to_date
    t = train.run(graph(ws, cfg), "px", log=lambda m: None)
    meta = json.loads((runs.pointed(ws, "px") / "config.json").read_text())
    assert meta["vae"]["source"] == "pixels" and t.val_macro_auc > 0


def test_eq14_contributions_sum_to_the_distance_and_eq15_is_stored():
    from leakpipe.pipeline.nn.model import contributions, explanation, responsibilities

    torch.manual_seed(1)
    cfg = load_config(None, [*FAST, "model.prototypes_per_class=3", "model.tau=0.7"])
    model = build_model(cfg, 4, (4, 32, 32)).eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 8, 32, 32))
        pi_cm, r = explanation(out, model.prototypes, model.tau)
    c = out.logits.argmax(1)
    m = pi_cm[torch.arange(5), c].argmax(1)
    torch.testing.assert_close(r.sum(1), out.distances[torch.arange(5), c, m])  # Eq. 14 sums to d_cm
    torch.testing.assert_close(pi_cm, responsibilities(out.distances, 0.7))
    torch.testing.assert_close(pi_cm.sum(-1), torch.ones(5, 4))
    full = contributions(out.h_bar[:, None, None], out.w[:, None, None], model.prototypes[None]).sum(-1)
    torch.testing.assert_close(full, out.distances)


def test_profile_settings_reach_the_features():
    """authors-code: linear schedule, T = {0}, no DCT map, no standardisation: f_t is z_t / sigma_t."""
    from leakpipe.pipeline.engine.data import FeatureBuilder
    from leakpipe.pipeline.math import diffusion

    cfg = load_config(None, (), profile="authors-code")
    build = FeatureBuilder(cfg, torch.device("cpu"), torch.zeros(1, 4), torch.full((1, 4), 7.0))
    mean, logvar = np.random.default_rng(0).normal(size=(2, 2, 4, 8, 8)).astype(np.float32)
    eps = torch.randn(2, 1, 4, 8, 8)
    abar = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)[0]
    want = (abar.sqrt() * 0.18215 * torch.from_numpy(mean) + (1 - abar).sqrt() * eps[:, 0]) / (1 - abar).sqrt()
    torch.testing.assert_close(build(mean, logvar, eps)[:, 0], want.float())  # standardisation not applied
    assert diffusion.betas("linear")[0].item() == pytest.approx(0.00085)


def test_sweep_entry_that_changes_the_encoder_encodes_first(pixels_ws):
    from tests.conftest import cli

    r = cli(
        pixels_ws,
        "sweep",
        "--only",
        "pixels",
        *[
            a
            for s in [*FAST, "score.postprocessed=", "score.baselines=false", "score.bootstrap=50"]
            for a in ("--set", s)
        ],
    )
    assert r.exit_code == 0, r.output
    assert "encode open: " in r.output and "VAE pixels" in r.output  # closed: encoded by the test above
    assert "| pixels |" in r.stdout
