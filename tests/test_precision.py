"""The GPU path's settings on a CPU: every precision and the compile path train and reach the fp32
result within a stated tolerance, fp32 stays bitwise deterministic, the precision is a training
input while compile is not, and the CUDA-only pieces fall back or say what to do."""

import json
import re

from dataclasses import replace

import numpy as np
import pytest
import torch

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.config_files import load_config
from leakpipe.pipeline.engine import data as data_module, precision
from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
from leakpipe.pipeline.engine.trained import build_model
from leakpipe.pipeline.engine.training import predict, recalibrate_batchnorm, train_epoch
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.math import metrics
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, train
from leakpipe.pipeline.ledger.graph import values
from tests.conftest import cli
from tests.helpers import FAST, train_run, weights

# Measured here on tws (4 generators, 3 epochs, embed_dim 16), best validation macro AUC: fp32 0.952,
# bf16 0.973, fp16 0.980; fp32 over training seeds 0-4: 0.940-0.952. The half precisions land a little
# above fp32's seed range, not below it; the bound is about twice the largest difference seen (0.028).
TOLERANCE = 0.05
# bf16 trains with the small stem: under model.stem = imagenet tws's z0 (side 16) shrinks to a 1 x 1
# map before layer4, whose emulated bf16 weight gradient reads uninitialised memory on a CPU with
# AVX-512 but no AVX512_BF16 (fit.CPU_HALF_NOTE; a CI machine's run gave NaN there). fp16 keeps the
# imagenet stem: it never failed so, and its CPU kernels are slow on larger maps (153 s, not 7 s).
STEM = {"bf16": ["model.stem=small"], "fp16": []}


def best_val_auc(root, run) -> float:
    return max(
        h["val_macro_auc"] for h in json.loads((train.run_dir(Workspace(root), run) / "history.json").read_text())
    )


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_each_precision_trains_through_the_stage(tws, prec):
    ws = Workspace(tws)
    cfg = ws.config(None, [*FAST, *STEM[prec], "train.epochs=1", f"compute.precision={prec}"])
    result = train.run(graph(ws, cfg), f"{prec}-1", log=lambda m: None)
    fp32 = train.run(
        graph(ws, ws.config(None, [*FAST, *STEM[prec], "train.epochs=1"])), f"fp32-{prec}", log=lambda m: None
    )
    assert result.run_dir != fp32.run_dir  # a training input: its own result
    history = json.loads((result.run_dir / "history.json").read_text())
    assert np.isfinite(history[0]["loss"]) and 0 <= history[0]["val_macro_auc"] <= 1
    saved, reference = weights(tws, f"{prec}-1"), weights(tws, f"fp32-{prec}")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}  # fp32 master weights
    assert any(not torch.equal(saved[k], reference[k]) for k in saved)  # autocast really ran


def test_a_diverged_epoch_stops_training_with_what_to_do(tws):
    """A NaN loss or output stops the stage with the epoch, the precision and what to change, before
    a checkpoint or a model keeps it (the metrics would otherwise fail on NaN scores)."""
    ws = Workspace(tws)
    cfg = ws.config(None, [*FAST, "train.epochs=2", "train.lr=1e30", "train.grad_clip=0"])
    with pytest.raises(UserError, match=r"epoch 1 gave a non-finite .* compute.precision = fp32 .* lower train.lr"):
        train.run(graph(ws, cfg), "diverged", log=lambda m: None)
    assert not (train.run_dir(ws, "diverged") / "model.safetensors").exists()


def test_half_precision_inference_agrees_with_fp32(tws):
    """A trained fp32 model's validation outputs under bf16/fp16 autocast (as embed computes them)."""
    from leakpipe.pipeline.engine.trained import load_trained

    train_run(tws, "fp32")
    model, build, classes, cfg = load_trained(train.run_dir(Workspace(tws), "fp32"), torch.device("cpu"))
    p = graph(Workspace(tws), cfg).plan("encode", "closed").data
    rows = read_manifest(tws / "manifests" / "closed.csv").rows
    val = np.array([i for i, r in enumerate(rows) if r["partition"] == "val"])
    labels = np.array([classes.index(rows[i]["label"]) for i in val])
    data = LatentRows(p.store, val, labels, 2**30)
    out = {
        prec: predict(precision.channels_last(model, build.device, prec), data, build, 64, prec)
        for prec in ("fp32", "bf16", "fp16")
    }
    auc = {k: metrics.point(metrics.macro_auc, metrics.softmax(v["logits"]), labels) for k, v in out.items()}
    for prec in ("bf16", "fp16"):
        agree = (out[prec]["logits"].argmax(1) == out["fp32"]["logits"].argmax(1)).mean()
        print(f"{prec}: val macro AUC {auc[prec]:.3f} (fp32 {auc['fp32']:.3f}), top-1 agreement {agree:.3f}")
        assert abs(auc[prec] - auc["fp32"]) <= 0.02 and agree >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_each_precision_reaches_the_fp32_validation_auc(tws, prec):
    """The full comparison (about 80 s per precision on 2 cores: this CPU has no bf16/fp16 kernels)."""
    train_run(tws, f"fp32-for-{prec}", *STEM[prec])
    train_run(tws, prec, *STEM[prec], f"compute.precision={prec}")
    fp32, low = best_val_auc(tws, f"fp32-for-{prec}"), best_val_auc(tws, prec)
    print(f"best val macro AUC: fp32 {fp32:.3f}, {prec} {low:.3f}")
    assert abs(low - fp32) <= TOLERANCE


def test_precision_is_a_training_input_and_compile_is_not(tws):
    ws = Workspace(tws)
    keys = values(Config(), train.KEYS)
    assert "compute.precision" not in keys  # at fp32 the fingerprint of every earlier result is unchanged
    bf16 = ws.config(None, ["compute.precision=bf16"])
    assert values(bf16, train.KEYS)["compute.precision"] == "bf16"
    assert not {"compute.compile", "compute.compile_backend", "compute.gpu_cache_gb"} & set(train.KEYS)
    train_run(tws, "fp32")
    status = cli(tws, "status", "--set", "compute.precision=bf16").output
    assert re.search(r"train  fp32 +STALE: compute.precision: fp32 -> bf16", status), status  # not "(unset)"
    again = train_run(tws, "fp32", "compute.compile=true", "compute.gpu_cache_gb=0")
    assert again.up_to_date  # execution settings: the stored result serves


def _engine(root, cfg, epochs, forward=None):
    """Train through the engine (as the stage does, minus the ledger) and return (model, val macro AUC)."""
    ws = Workspace(root)
    store = graph(ws, cfg).plan("encode", "closed").data.store
    rows = read_manifest(root / "manifests" / "closed.csv").rows
    classes = sorted({r["label"] for r in rows})
    part = {p: np.array([i for i, r in enumerate(rows) if r["partition"] == p]) for p in ("train", "val")}
    label = np.array([classes.index(r["label"]) for r in rows])
    tr, va = (LatentRows(store, part[p], label[part[p]], 2**30) for p in ("train", "val"))
    torch.manual_seed(0)
    model = build_model(cfg, len(classes), tr.latent_shape)
    build = FeatureBuilder(cfg, torch.device("cpu"))
    build.fit_statistics(tr, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    for epoch in range(1, epochs + 1):
        train_epoch(
            model,
            opt,
            tr,
            build,
            replace(cfg.train, batch_size=16, seed=0, epochs=epochs),
            epoch,
            forward=None if forward is None else forward(model),
        )
    recalibrate_batchnorm(model, tr, build, 16)
    val = predict(model, va, build, 64)
    return model, metrics.point(metrics.macro_auc, metrics.softmax(val["logits"]), va.labels)


def test_compiled_training_matches_eager(tws):
    """torch.compile through dynamo and AOTAutograd (the aot_eager backend: inductor's code generation
    takes minutes per model on 2 cores; `pytest -m slow` runs inductor itself)."""
    cfg = Workspace(tws).config(None, ["model.embed_dim=16", "model.prototypes_per_class=2"])
    eager, auc = _engine(tws, cfg, 1)
    compiled, auc_c = _engine(tws, cfg, 1, lambda m: precision.compiled(m, True, "aot_eager"))
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), k
    assert abs(auc - auc_c) <= 0.01


@pytest.mark.slow
def test_inductor_training_reaches_the_eager_auc(tws):
    cfg = Workspace(tws).config(None, ["model.embed_dim=16", "model.prototypes_per_class=2"])
    _, auc = _engine(tws, cfg, 2)
    _, auc_c = _engine(tws, cfg, 2, lambda m: precision.compiled(m, True, "inductor"))
    assert abs(auc - auc_c) <= TOLERANCE


def test_train_and_embed_run_compiled_through_the_stage(tws):
    result = train_run(tws, "compiled", "train.seed=7", "compute.compile=true", "compute.compile_backend=aot_eager")
    assert not result.up_to_date and best_val_auc(tws, "compiled") > 0.6
    assert (result.run_dir / "embeddings" / "closed.zarr").exists()


def test_cuda_only_pieces_fall_back_or_say_what_to_do(tws):
    from leakpipe.pipeline.engine.vae import resolve_device

    cuda = torch.device("cuda")  # a device object needs no GPU; only using it does
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no usable CUDA.*install a CUDA build"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="no usable CUDA"):
            train_run(tws, "nocuda", "compute.device=cuda", "train.seed=11")  # an untrained config
    assert precision.cache_placement(10, torch.device("cpu"), 1e9) == "host"
    assert precision.cache_placement(10, cuda, 100) == "gpu"
    assert precision.cache_placement(1000, cuda, 100) == "pinned"
    assert not precision.grad_scaler(torch.device("cpu"), "bf16").is_enabled()  # bf16 needs no scaler
    assert precision.grad_scaler(torch.device("cpu"), "fp16").is_enabled()
    with pytest.raises(UserError, match="not a torch.compile backend.*inductor"):
        precision.compiled(torch.nn.Linear(2, 2), True, "no-such-backend")
    cfg = load_config(None, ["model.embed_dim=16", "model.stem=imagenet"])
    model = build_model(cfg, 3, (4, 16, 16)).eval()
    f = torch.randn(4, 3, 8, 16, 16)
    with torch.no_grad():
        plain = model(f).logits
        laid_out = precision.channels_last(model, cuda)  # CUDA's layout, checked on the CPU
        assert laid_out.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(laid_out(f).logits, plain, atol=1e-4)
    cpu = torch.device("cpu")  # on a CPU only half precision is laid out NHWC (measured faster there)
    assert precision.channels_last(torch.nn.Conv2d(1, 1, 3), cpu).weight.is_contiguous()
    assert precision.channels_last(torch.nn.Conv2d(1, 1, 3), cpu, "bf16").weight.is_contiguous(
        memory_format=torch.channels_last
    )


def test_placed_latents_give_the_same_batches(tws, monkeypatch):
    """The GPU-resident cache's gather, run with CPU tensors: the same rows as the numpy cache."""
    ws = Workspace(tws)
    store = graph(ws, ws.config()).plan("encode", "closed").data.store
    rows = np.arange(40)
    plain = LatentRows(store, rows, rows % 4, 2**30)
    placed = LatentRows(store, rows, rows % 4, 2**30)
    placed.place(torch.device("cpu"), 2**30)
    assert placed.placement == "latents in host memory"
    monkeypatch.setattr(data_module, "cache_placement", lambda *a: "gpu")
    placed.place(torch.device("cpu"), 2**30)
    assert placed.placement == "latents on the GPU"
    for (p1, m1, lv1, y1), (p2, m2, lv2, y2) in zip(plain.batches(16, seed=3), placed.batches(16, seed=3)):
        assert np.array_equal(p1, p2) and np.array_equal(y1, y2)
        assert isinstance(m2, torch.Tensor) and np.array_equal(m1, m2.numpy()) and np.array_equal(lv1, lv2.numpy())
