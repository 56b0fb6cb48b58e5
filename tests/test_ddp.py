"""Training under torchrun / DistributedDataParallel on 2 CPU processes (gloo).

1. The sharding and loss scaling are exact: with BatchNorm taken out (the one part that sees only a
   rank's shard on CPU, where SyncBatchNorm does not exist), 2 processes x half batches give the
   single-process weights to float32 rounding (tolerance 1e-4; measured max difference 1.8e-5
   after one epoch of SGD, whose steps move weights by ~1e-2).
2. `torchrun ... leakpipe train`: rank 0 writes model, checkpoints and embeddings; the validation
   macro AUC is within 0.15 of a single-process run with the same global batch (measured: 1.000
   single, 0.972 and 0.981 DDP in two runs; the gap comes from per-shard BatchNorm statistics); the lock
   records the world size, and a damaged result retrains to the same model bitwise.
"""

import json
import shutil
from dataclasses import replace
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leakpipe.pipeline.workspace import Workspace
from leakpipe.pipeline.engine.trained import build_model
from leakpipe.stages import graph, encode, train
from leakpipe.pipeline.store.checkpoint import load_tensors
from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
from tests.conftest import TOML, cli, write_images

pytestmark = pytest.mark.timeout(400)
BIN = Path(sys.executable).parent


@pytest.fixture
def tws(ws):
    write_images(ws / "data", labels=("a", "b", "c"), n=12, seed=3)
    assert cli(ws, "manifest", "build", str(ws / "data"), "--split", "closed").exit_code == 0
    encode.run(graph(Workspace(ws), Workspace(ws).config()), "closed", log=lambda m: None)
    return ws


def _steps(rank: int, world: int, root: str, init: str, out: str) -> None:
    """One epoch with BatchNorm removed, in process `rank` of `world`; rank 0 saves the weights."""
    import torch.distributed as dist

    from leakpipe.pipeline.engine.data import FeatureBuilder, LatentRows
    from leakpipe.pipeline.engine.ddp import Ddp, wrap
    from leakpipe.pipeline.engine.fit import rows_of
    from leakpipe.pipeline.engine.training import train_epoch

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    ws = Workspace(root)
    cfg = ws.config(None, ["model.embed_dim=8", "model.prototypes_per_class=2"])
    p = graph(ws, cfg).plan("encode", "closed").data
    tr, tr_y, _, _, classes = rows_of(p)
    data = LatentRows(p.store, tr, tr_y, 2**30)
    build = FeatureBuilder(cfg, torch.device("cpu"))
    build.fit_statistics(data, 64)
    torch.manual_seed(0)
    model = build_model(cfg, len(classes), data.latent_shape)
    for _, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, torch.nn.BatchNorm2d):
                setattr(mod, child, torch.nn.Identity())
    ctx = Ddp(rank, world)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # plain SGD: Adam divides by sqrt(v), which turns float32 rounding of near-zero gradients into
    # full-size steps and would hide whether the gradients themselves agree
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # 18 training rows in batches of 7, 7 and 4: unequal shards (3 + 4) check the loss scaling
    tc = replace(
        cfg.train,
        batch_size=7,
        seed=0,
        grad_clip=0.0,
        lr_schedule="constant",
        warmup_epochs=0,
        lr=0.05,
        label_smoothing=0.0,
    )
    train_epoch(wrap(model, ctx, torch.device("cpu")), opt, data, build, tc, 1, ddp=ctx)
    if rank == 0:
        moved = sum(not torch.equal(v, init[k]) for k, v in model.state_dict().items())
        torch.save({"moved": moved, **{k: v.clone() for k, v in model.state_dict().items()}}, out)
    if world > 1:
        dist.destroy_process_group()


def test_sharded_steps_equal_single_process(tws, tmp_path):
    threads = torch.get_num_threads()
    try:
        _steps(0, 1, str(tws), "", str(tmp_path / "single.pt"))
    finally:  # _steps pins 1 thread; later tests compare bitwise against subprocesses using the default
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(
        _steps, args=(2, str(tws), f"file://{tmp_path / 'rdv'}", str(tmp_path / "ddp.pt")), nprocs=2, join=True
    )
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert a.pop("moved") > 10 and b.pop("moved") > 10  # the steps changed the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")  # noqa: B023 (called here)


def torchrun(ws, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--no-python",
            "--",
            str(BIN / "leakpipe"),
            "train",
            "-C",
            str(ws),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture
def sws(tmp_path, tiny_vae):
    """3 synthetic generators x 30 images of 32 px with strong fingerprints (a learnable signal)."""
    write_benchmark(tmp_path / "data", tmp_path / "manifests", SynthSpec(3, 0, 30, 32, 0.1, 0, ()), workers=1)
    (tmp_path / "leakpipe.toml").write_text(TOML.format(vae=tiny_vae))
    encode.run(graph(Workspace(tmp_path), Workspace(tmp_path).config()), "closed", log=lambda m: None)
    return tmp_path


def test_torchrun_train_matches_single_process_and_resumes(sws):
    tws = sws
    sets = ["--set", "train.epochs=4", "--set", "model.embed_dim=16", "--set", "train.batch_size=16"]
    alone = tws.parent / "alone"  # one process, same config, in its own workspace (its own run cache)
    shutil.copytree(tws, alone, symlinks=True)
    single = cli(alone, "train", "--run", "single", *sets)
    assert single.exit_code == 0, single.output
    out = torchrun(tws, "--run", "ddp", *sets)
    assert "x 2 processes (DDP)" in out and out.count("train ddp: 4 epochs") == 1  # rank 0 reports
    ws = Workspace(tws)
    run = train.run_dir(ws, "ddp")
    for f in ("model.safetensors", "history.json", "train.lock.json", "embeddings/closed.zarr"):
        assert (run / f).exists(), f
    h_ddp = json.loads((run / "history.json").read_text())
    h_one = json.loads((train.run_dir(Workspace(alone), "single") / "history.json").read_text())
    assert json.loads((run / "train.lock.json").read_text())["world_size"] == 2
    assert len(h_ddp) == len(h_one) == 4
    best = lambda h: max(e["val_macro_auc"] for e in h)  # noqa: E731
    print(f"val macro AUC: single {best(h_one):.3f}, ddp {best(h_ddp):.3f}")
    assert abs(best(h_ddp) - best(h_one)) <= 0.15
    assert not (run / "checkpoint").exists()  # a finished result keeps no optimizer state
    weights, meta = load_tensors(run / "model.safetensors")
    (run / "model.safetensors").unlink()  # damaged: the next train trains it again, the same
    out = torchrun(tws, "--run", "ddp", *sets)
    assert "output missing" in out and "train ddp: 4 epochs" in out
    again, meta_again = load_tensors(run / "model.safetensors")
    assert meta_again == meta and again.keys() == weights.keys()
    for k in weights:  # bitwise (the header's key order is safetensors' choice, so not the file bytes)
        assert torch.equal(again[k], weights[k]), k
    assert "up to date" in torchrun(tws, "--run", "ddp", *sets)
