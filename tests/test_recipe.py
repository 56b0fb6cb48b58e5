"""The training recipe: every key of it reaches the model and trains through the stage, each piece does
what it says (schedule, weight average, crops and tiles, k-means prototypes, precise BatchNorm on
class-sorted data), and the profiles select it or the paper's settings."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from leakpipe.pipeline.config import Config, ConfigError, ModelConfig
from leakpipe.pipeline.config_files import load_config, with_overrides
from leakpipe.pipeline.engine.data import FeatureBuilder, crop_views, tile_offsets, tiles
from leakpipe.pipeline.engine.training import (
    WeightAverage,
    backbone_dropout_mask,
    lr_factor,
    prototype_pull,
    recalibrate_batchnorm,
    stratified_sample,
)
from leakpipe.pipeline.math import prototypes as proto_math
from leakpipe.pipeline.math.kmeans import class_centres, kmeans
from leakpipe.pipeline.nn.model import ProtoLeakNet, dct_block
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, embed, score, train
from tests.conftest import synth_workspace

SMALL = ["model.embed_dim=16", "model.prototypes_per_class=2", "train.batch_size=16"]


def test_lr_schedule_warms_up_then_decays_to_zero():
    tc = load_config(None, ["train.epochs=10", "train.warmup_epochs=2"]).train
    assert lr_factor(tc, 0.5) == pytest.approx(0.25) and lr_factor(tc, 2.0) == pytest.approx(1.0)
    assert lr_factor(tc, 6.0) == pytest.approx(0.5) and lr_factor(tc, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(tc, a) >= lr_factor(tc, b) for a, b in zip(np.arange(2, 10, 0.5), np.arange(2.5, 10.5, 0.5)))
    tc = load_config(None, ["train.lr_schedule=constant", "train.warmup_epochs=0"]).train
    assert lr_factor(tc, 0.1) == lr_factor(tc, 9.9) == 1.0


def test_weight_average_is_an_exponential_moving_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, half_life_steps=4)
    assert avg.decay == pytest.approx(0.5**0.25)
    want = model.weight.detach().clone()
    for k in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        avg.update(model)
        d = min(avg.decay, (1 + k) / (10 + k))
        want = d * want + (1 - d) * model.weight.detach()
    torch.testing.assert_close(avg.averaged(model).weight, want)
    again = WeightAverage(model, 4, {k: v.clone() for k, v in avg.state().items()})  # as resumed from a checkpoint
    assert again.updates == 30 and torch.equal(again.averaged(model).weight, avg.averaged(model).weight)


def test_crops_start_on_the_8_pixel_grid_and_tiles_cover_the_centre():
    cfg = load_config(None, ["train.crop=64", "preprocess.size=256", "train.augment=hflip,vflip"])
    build = FeatureBuilder(cfg, torch.device("cpu"))
    pixels = (3, 256, 256)  # vae.source = pixels: one z0 pixel per image pixel
    assert build.grid(pixels) == 8 and build.grid((4, 32, 32)) == 1  # an SD latent pixel is 8 image pixels
    views = build.draw_views(500, pixels, torch.Generator().manual_seed(0))
    assert (
        (views[:, :2] % 8 == 0).all()
        and views[:, :2].max() <= 256 - 64
        and set(views[:, 2:].unique().tolist()) == {0, 1}
    )
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    got = crop_views(x, torch.tensor([[0, 4], [4, 0]]), 4, torch.tensor([[True, False], [False, True]]))
    assert torch.equal(got[0], x[0, :, 0:4, 4:8].flip(-1)) and torch.equal(got[1], x[1, :, 4:8, 0:4].flip(-2))
    assert tile_offsets(256, 64, 8) == [0, 64, 128, 192] and tile_offsets(20, 8, 1) == [2, 10]
    assert tiles(x, 4, 1).shape == (2, 4, 3, 4, 4) and torch.equal(tiles(x, 4, 1)[1, 3], x[1, :, 4:, 4:])
    assert build.draw_views(4, pixels, torch.Generator()) is not None
    assert FeatureBuilder(Config(), torch.device("cpu")).draw_views(4, pixels, torch.Generator()) is None


def test_feature_switches_for_pixels():
    cfg = load_config(
        None, ["diffusion.noise=false", "features.dct_map=none", "features.standardize=false", "diffusion.timesteps=0"]
    )
    build = FeatureBuilder(cfg, torch.device("cpu"))
    m = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    f = build(m, m, torch.randn(2, 1, 3, 16, 16))
    torch.testing.assert_close(f[:, 0], torch.from_numpy(m) * cfg.latent.scale * build.alpha[0] / build.sigma[0])
    cfg = with_overrides(cfg, ["features.highpass=residual"])
    flat = np.full((1, 3, 16, 16), 0.3, np.float32)  # no content, no residual
    assert FeatureBuilder(cfg, torch.device("cpu"))(flat, flat, torch.zeros(1, 1, 3, 16, 16)).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="not among hflip, vflip"):
        load_config(None, ["train.augment=rotate"])


def test_stratified_sample_mixes_every_class_of_a_sorted_store():
    labels = np.repeat(np.arange(10), 1000)  # class-sorted, as a manifest of folders is
    pick = stratified_sample(labels, 640, seed=3)
    assert len(pick) == 640 and np.bincount(labels[pick], minlength=10).tolist() == [64] * 10
    assert len(np.unique(labels[pick[:64]])) >= 8  # the first batch already mixes the classes
    assert np.array_equal(pick, stratified_sample(labels, 640, seed=3))
    assert sorted(stratified_sample(labels[:30], 640, 0)) == list(range(30))  # all rows when they fit


def test_precise_batchnorm_sees_every_class_of_a_class_sorted_store(tmp_path):
    """BatchNorm statistics recomputed over the whole class-sorted training set: the running mean of
    the first layer is the mean over all classes, not the first classes' mean (the old walk in store
    order with max_batches = 100 saw only the first 100 batches)."""
    from leakpipe.pipeline.engine.data import LatentRows
    from leakpipe.pipeline.store import latent_store

    n, classes = 1200, 6
    labels = np.repeat(np.arange(classes), n // classes)
    mean = (labels[:, None, None, None] * 2.0 + np.random.default_rng(0).normal(size=(n, 1, 4, 4))).astype(np.float32)
    mean = np.repeat(mean, 4, axis=1)
    group = latent_store.create(str(tmp_path / "s.zarr"), n, mean.shape[1:], 64, "float32", {})
    for start, stop in latent_store.chunk_bounds(n, 64):
        rows = np.arange(start, stop)
        latent_store.write_chunk(
            group, start, stop, rows, {"mean": mean[rows], "logvar": 0 * mean[rows]}, np.ones((len(rows), 16), np.uint8)
        )
    data = LatentRows(str(tmp_path / "s.zarr"), np.arange(n), labels, 2**30)
    cfg = load_config(None, ["diffusion.timesteps=0", "features.dct_map=none", "features.standardize=false"])
    build = FeatureBuilder(cfg, torch.device("cpu"))
    bn = torch.nn.BatchNorm2d(4)
    net = torch.nn.Sequential(torch.nn.Flatten(0, 1), bn)  # (B, T=1, C, h, w) -> BN over C
    recalibrate_batchnorm(net, data, build, batch_size=8, max_rows=600)
    f = build(mean, mean, torch.zeros(n, 1, 4, 4, 4))[:, 0]
    want = f.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, want, rtol=0.05, atol=0.05)
    assert float(bn.running_var.mean()) > 0.5 * float(f.var(dim=(0, 2, 3)).mean())  # between-class variance kept


def test_kmeans_finds_separated_modes_and_prototype_usage_sees_collapse():
    rng = np.random.default_rng(0)
    modes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([m + rng.normal(0, 0.5, (50, 2)) for m in modes])
    got = kmeans(x, 3, seed=1)
    assert np.abs(np.sort(got, axis=0) - np.sort(modes, axis=0)).max() < 0.3
    labels = np.zeros(150, np.int64)
    w = np.ones((150, 2))
    distinct = class_centres(x, labels, 1, 3, 0)
    u = proto_math.usage(x, w, labels, distinct)
    assert u["per_class"][0]["winning"] == 3 and u["winning_fraction"] == 1 and u["median_separation"] > 1
    collapsed = np.repeat(x.mean(0, keepdims=True)[None], 3, axis=1) + np.array([0, 1e-3, 2e-3])[None, :, None]
    u = proto_math.usage(x, w, labels, collapsed)
    assert u["per_class"][0]["winning"] < 3 and u["median_separation"] < 1e-3


def test_prototype_pull_is_the_distance_of_each_prototype_to_its_nearest_image():
    d = torch.tensor([[[1.0, 5.0], [9.0, 9.0]], [[3.0, 2.0], [9.0, 9.0]], [[9.0, 9.0], [4.0, 7.0]]])
    labels = torch.tensor([0, 0, 1])  # class 0: prototypes' nearest images at 1 and 2; class 1: 4 and 7
    assert float(prototype_pull(d, labels)) == pytest.approx((1 + 2 + 4 + 7) / 4)


@pytest.fixture(scope="module")
def rws(tmp_path_factory):
    """The shared small workspace (3 generators x 16 images of 32 px, tiny VAE), encoded."""
    from leakpipe.stages import encode

    root = synth_workspace(tmp_path_factory.mktemp("recipe-ws"))
    ws = Workspace(root)
    for split in ("closed", "open"):
        encode.run(graph(ws, ws.config()), split, log=lambda m: None)
    return root


def _train(root, run, sets, profile="leakpipe"):
    ws = Workspace(root)
    cfg = ws.config(None, [*SMALL, *sets], profile)
    logs = []
    result = train.run(graph(ws, cfg), run, log=logs.append)
    embed.run(graph(ws, cfg), run, log=lambda m: None)
    return result, cfg, logs


def test_backbone_dropout_leaves_the_readout_alone_and_draws_nothing_when_off():
    gen = torch.Generator().manual_seed(0)
    assert backbone_dropout_mask(1000, 0.0, gen) is None
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    assert 0.45 < float(backbone_dropout_mask(4000, 0.5, gen).float().mean()) < 0.55
    torch.manual_seed(0)
    cfg = ModelConfig(stem="imagenet", embed_dim=8, prototypes_per_class=2)
    model = ProtoLeakNet(cfg, 3, 8, 16, dct=(4, 8)).eval()
    f, dropped = torch.randn(4, 3, 8, 16, 16), torch.tensor([True, False, True, False])
    with torch.no_grad():
        h = model.embed_timesteps(f, dropped)
        alone = model.readout(dct_block(f.flatten(0, 1), 4, 8)).view(4, 3, -1)
        torch.testing.assert_close(h[dropped], alone[dropped])
        torch.testing.assert_close(h[~dropped], model.embed_timesteps(f)[~dropped])
    # train.backbone_dropout_mode: skip runs the backbone on the kept images alone (their BatchNorm batch
    # statistics are theirs), mask runs it on every image and zeroes the dropped ones' h_t
    model.train()
    with torch.no_grad():
        skipped = model.embed_timesteps(f, dropped)
        torch.testing.assert_close(skipped[~dropped], model.embed_timesteps(f[~dropped]))
        model.skip_dropped = False
        masked = model.embed_timesteps(f, dropped)
        torch.testing.assert_close(masked[dropped], skipped[dropped])
        assert not torch.allclose(masked[~dropped], skipped[~dropped])
        kept = model.proj(model.backbone(f.flatten(0, 1))).view(4, 3, -1)[~dropped]
        torch.testing.assert_close(masked[~dropped], kept + alone[~dropped])


def test_the_default_recipe_trains_through_the_stage(rws):
    """Every recipe key at its default: the small stem, the warm-up and cosine schedule, the weight
    average, label smoothing, small random prototypes, the DCT readout with backbone dropout, the last
    epoch kept; the train log says how strong the noise is against z0 and which latent.scale would
    give this random VAE unit-variance latents."""
    result, cfg, logs = _train(rws, "recipe", ["train.epochs=3", "model.stem=auto"])  # the workspace sets imagenet
    note = next(line for line in logs if "z0 after latent.scale = 0.18215" in line)
    assert "the noise at t = 10 is" in note and "latent.scale = " in note.split("for this VAE")[1]
    weights = load_file(str(result.run_dir / "model.safetensors"))
    assert weights["backbone.conv1.weight"].shape[-2:] == (3, 3)  # 16 x 16 latents: the small stem
    assert not any("k-means" in line for line in logs)
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and result.best_epoch == 3  # select = last
    assert history[0]["lr"] == pytest.approx(cfg.train.lr) and history[-1]["lr"] == pytest.approx(0, abs=1e-12)
    assert all(np.isfinite(h["val_loss"]) for h in history)
    paper, _, logs = _train(rws, "paper", ["train.epochs=3"], profile="paper")
    weights = load_file(str(paper.run_dir / "model.safetensors"))
    assert weights["backbone.conv1.weight"].shape[-2:] == (7, 7) and not any("k-means" in line for line in logs)
    assert {h["lr"] for h in json.loads((paper.run_dir / "history.json").read_text())} == {cfg.train.lr}


def test_validating_the_last_epoch_alone_keeps_the_weights(rws):
    """log.validate_every = 0 (train.select = last) validates after the last epoch only: the weights are
    bitwise those of a run validated every epoch, and history.json and the log have the last epoch's
    validation figures alone. An execution setting: the same result folder."""
    common = ["train.epochs=3", "model.stem=imagenet"]
    every, _, _ = _train(rws, "v-every", common)
    want = load_file(str(every.run_dir / "model.safetensors"))
    was = json.loads((every.run_dir / "history.json").read_text())
    shutil.rmtree(every.run_dir)
    last, _, logs = _train(rws, "v-last", [*common, "log.validate_every=0"])
    assert last.run_dir == every.run_dir
    got = load_file(str(last.run_dir / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    history = json.loads((last.run_dir / "history.json").read_text())
    assert ["val_loss" in h for h in history] == [False, False, True] and history[-1] == was[-1]
    assert [h["loss"] for h in history] == [h["loss"] for h in was]
    assert [line.startswith("epoch") and "val" in line for line in logs if line.startswith("epoch")] == [0, 0, 1]


def test_checkpointing_once_a_minute_keeps_the_weights_and_the_result(rws, monkeypatch):
    """log.checkpoint_seconds: with an hour, a 2-epoch training writes no checkpoint (it would have
    written 1: none after the last epoch, whose result is written then) and ends with the same weights,
    bitwise, in the same result folder: an execution setting. A negative value is refused, naming the key."""
    from leakpipe.pipeline.engine import fit

    saves = []
    real = fit.save_checkpoint
    monkeypatch.setattr(fit, "save_checkpoint", lambda folder, *a: (saves.append(folder), real(folder, *a)))
    common = ["train.epochs=2", "model.stem=imagenet", "train.seed=7"]  # a training no other test makes
    every, _, _ = _train(rws, "c-every", common)
    assert len(saves) == 1
    want = load_file(str(every.run_dir / "model.safetensors"))
    shutil.rmtree(every.run_dir)
    hourly, _, _ = _train(rws, "c-hourly", [*common, "log.checkpoint_seconds=3600"])
    assert len(saves) == 1 and hourly.run_dir == every.run_dir  # none written, the same result
    got = load_file(str(hourly.run_dir / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(ConfigError, match="log.checkpoint_seconds"):
        Workspace(rws).config(None, ["log.checkpoint_seconds=-1"])


# Each piece of the recipe off (or on); one case each, so that pytest-xdist's workers share them
RECIPE_KEYS = [
    "train.ema_half_life=0",
    "train.label_smoothing=0",
    "model.prototype_init=kmeans",
    "train.lr_schedule=constant",
    "train.augment=hflip",
    "train.prototype_pull=0.1",
    "model.prototype_std=0.5",
    "train.backbone_dropout=0",
    "train.backbone_dropout_mode=skip",
    "features.dct_stats=per_channel",
    "model.dct_readout=none",
    "model.latent_readout=none",
    "features.latent_stats=per_channel",
]
KEYS_COMMON = ["train.epochs=2", "model.stem=imagenet"]  # the cheaper stem on a CPU; the default test's is small


def _recipe_base(rws):
    """The two epochs with the recipe (trained by the first case of a worker, restored by the others)."""
    base, _, _ = _train(rws, "k-base", KEYS_COMMON)
    return base, load_file(str(base.run_dir / "model.safetensors"))


@pytest.mark.parametrize("key", RECIPE_KEYS)
def test_each_recipe_key_changes_the_trained_weights(rws, key):
    """Two epochs with one piece off (or on), against the same two epochs with the recipe: every key
    reaches the training and changes what it learns."""
    base, want = _recipe_base(rws)
    other, _, _ = _train(rws, "k-" + key.split("=")[0].split(".")[1], [*KEYS_COMMON, key])
    assert other.run_dir != base.run_dir  # a training input: its own result
    got = load_file(str(other.run_dir / "model.safetensors"))
    assert got.keys() == want.keys() and any(not torch.equal(got[k], want[k]) for k in got)
    # without one of the two readouts, the readout reads the other's part alone
    part = {"model.dct_readout=none": 4 * 16 * 16, "model.latent_readout=none": 4 * 8 * 8}.get(key)
    assert part is None or got["readout.weight"].shape == (16, part)
    if key == "features.latent_stats=per_channel":  # one std per channel of z_t, over positions
        z_std = got["feature_std"][:, :4]
        assert torch.equal(z_std, z_std[..., :1, :1].expand_as(z_std))


def test_the_recipe_reads_both_parts_and_keeps_the_epoch_train_select_names(rws):
    _, want = _recipe_base(rws)
    # the default's readout reads the 4 x 8 x 8 DCT_low block and z_t (4 x 16 x 16) of the 16 x 16 latents
    assert want["readout.weight"].shape == (16, 4 * 8 * 8 + 4 * 16 * 16)
    # per-position statistics of z_t (features.latent_stats) and per-coefficient ones of the DCT map
    z_std = want["feature_std"][:, :4]
    assert z_std.shape[-2:] == (16, 16) and not torch.equal(z_std, z_std[..., :1, :1].expand_as(z_std))
    # which epoch is kept: the one of least validation loss, recorded with the model
    kept, _, _ = _train(rws, "k-select", [*KEYS_COMMON, "train.select=val_loss"])
    losses = [h["val_loss"] for h in json.loads((kept.run_dir / "history.json").read_text())]
    assert kept.best_epoch == 1 + int(np.argmin(losses))
    assert (
        json.loads(safe_open(str(kept.run_dir / "model.safetensors"), "pt").metadata()["best_epoch"]) == kept.best_epoch
    )


def test_crops_train_and_tiles_evaluate_through_the_stage(rws):
    """train.crop = 8 on 16 x 16 latents: training on random crops, evaluation over 4 tiles; embeddings,
    score and attribute all take that path."""
    from leakpipe.stages import attribute

    result, cfg, _ = _train(rws, "crop", ["train.epochs=2", "train.crop=8", "features.dct_k=4", "score.bootstrap=50"])
    ws = Workspace(rws)
    m = score.run(graph(ws, cfg), "crop", log=lambda m: None).metrics
    assert 0 <= m["closed"]["raw"]["head"]["top1"] <= 1 and "prototypes" in m
    image = ws.root / "data" / "closed" / "closed00" / "00000.png"
    got = attribute.run(graph(ws, cfg), [image], "crop")
    assert got[0]["top"][0]["generator"] in m["classes"]
    with pytest.raises(Exception, match="train.crop = 16 is not smaller"):
        _train(rws, "crop-big", ["train.epochs=1", "train.crop=16"])


def test_the_authors_code_profile_trains_and_scores(rws):
    """The profile as a user runs it: trained through the stage (its learnable tau and the fixed one
    are saved as separate tensors), embedded and scored."""
    result, cfg, _ = _train(rws, "authors", ["train.epochs=1", "score.bootstrap=50"], profile="authors-code")
    weights = load_file(str(result.run_dir / "model.safetensors"))
    assert {"log_tau", "fixed_log_tau"} <= weights.keys() and weights["backbone.conv1.weight"].shape[1] == 4
    assert cfg.model.prototype_std == 0.01 and "readout.weight" not in weights  # the released code's init
    m = score.run(graph(Workspace(rws), cfg), "authors", log=lambda m: None).metrics
    assert m["closed"]["raw"]["head"]["n"] > 0
