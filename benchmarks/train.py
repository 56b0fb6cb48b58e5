"""Stage-two speed, measured side by side in one run.

    python benchmarks/train.py [--device cpu|cuda] [--batch 32] [--images 32]
                               [--cache-rows 4096] [--cache-batch 256] [--precisions fp32,bf16,fp16] [--compile]

(a) a training step with the on-the-fly feature path (noise, diffusion, DCT, standardisation)
    against a model-only step on precomputed features: the feature path's overhead;
(b) one epoch from the latent cache against the same epoch with the SD2.1-architecture VAE in the
    loop (decode, encode, then the same step), as the authors' code trains, at 256x256;
(c) training images/s from a Zarr latent cache through the stage's own path (LatentRows,
    FeatureBuilder, train_epoch): per compute.precision, with compute.compile off and on, and on a
    GPU with the cache held on the GPU or in pinned host memory (compute.gpu_cache_gb).
(d) `--recipe`: the default recipe's training images/s on 4 x 32 x 32 latents through the same path,
    before and after issue 36 in one run (epochs interleaved, medians), each `--set` list a side:
    before = train.backbone_dropout_mode=mask (every image through the backbone), after = skip; plus
    the FLOPs of a training image (torch's FLOP counter) against what this CPU sustains on the
    recipe's largest convolution (64 -> 64 channels, 3 x 3, 32 x 32 maps), forward and backward.
    CPU seconds per image on `--threads 1` compare the sides on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leakpipe.pipeline.engine import vae as vae_lib  # noqa: E402
from leakpipe.pipeline.config import Config, VaeConfig  # noqa: E402
from leakpipe.pipeline.engine.data import FeatureBuilder  # noqa: E402
from leakpipe.pipeline.engine.images import to_model_range  # noqa: E402
from leakpipe.pipeline.engine.precision import channels_last, compiled, grad_scaler  # noqa: E402
from leakpipe.pipeline.engine.data import LatentRows  # noqa: E402
from leakpipe.pipeline.engine.training import train_epoch  # noqa: E402
from leakpipe.pipeline.store import latent_store  # noqa: E402
from leakpipe.pipeline.engine.trained import build_model  # noqa: E402

LATENT = (4, 32, 32)  # SD2.1's z0 of a 256-px image: every latent below has this shape


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def _once(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def synthetic_store(path: Path, rows: int, chunk_rows: int = 256) -> Path:
    """A latent store of `rows` random SD-shaped latents (4 x 32 x 32), written as encode writes it."""
    rng = np.random.default_rng(0)
    group = latent_store.row_arrays(latent_store.create(str(path), rows, LATENT, chunk_rows, "float16", {}))
    for start, stop in latent_store.chunk_bounds(rows, chunk_rows):
        n = stop - start
        latents = {
            "mean": rng.normal(size=(n, *LATENT)).astype(np.float16),
            "logvar": np.full((n, *LATENT), -5.0, np.float16),
        }
        latent_store.write_chunk(
            group, start, stop, np.arange(start, stop), latents, rng.integers(1, 255, (n, 16), dtype=np.uint8)
        )
    return path


def from_cache(args, device, tmp: Path) -> list[str]:
    """(c): one warm-up epoch, then the mean img/s of two timed epochs, per setting."""
    store = synthetic_store(tmp / "bench.zarr", args.cache_rows)
    rows = np.arange(args.cache_rows)
    placements = ["gpu", "pinned"] if device.type == "cuda" else ["host"]
    lines = ["| precision | compile | latents | img/s |", "|---|---|---|---|"]
    for prec in args.precisions.split(","):
        for compile_ in [False, True] if args.compile else [False]:
            for place in placements:
                cfg = Config()
                tc = replace(cfg.train, batch_size=args.cache_batch, seed=0)
                torch.manual_seed(0)
                model = channels_last(build_model(cfg, 10, LATENT).to(device), device, prec)  # as the stage lays it out
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                build = FeatureBuilder(cfg, device, torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device))
                data = LatentRows(store, rows, rows % 10, 2**34)
                data.place(device, 2**40 if place == "gpu" else 0)
                forward, scaler = compiled(model, compile_), grad_scaler(device, prec)

                def epoch(k):
                    train_epoch(model, opt, data, build, tc, k, precision=prec, scaler=scaler, forward=forward)  # noqa: B023 (called in this iteration)

                epoch(0)
                seconds = _once(lambda: [epoch(k) for k in (1, 2)], device) / 2
                lines.append(
                    f"| {prec} | {'on' if compile_ else 'off'} | {data.placement.split('latents ')[1]} | "
                    f"{len(rows) / seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    return lines


RECIPE_SIDES = {"before": ["train.backbone_dropout_mode=mask"], "after": ["train.backbone_dropout_mode=skip"]}


def recipe_throughput(args, device, tmp: Path) -> list[str]:
    """(d): img/s of train_epoch per side, epochs interleaved (one warm-up each), medians."""
    from leakpipe.pipeline.config_files import load_config
    from leakpipe.pipeline.engine.fit import optimizer

    store = synthetic_store(tmp / "recipe.zarr", args.cache_rows)
    rows = np.arange(args.cache_rows)
    sides = {}
    for side, sets in RECIPE_SIDES.items():
        cfg = load_config(None, [*sets, "train.seed=0"])
        torch.manual_seed(0)
        model = build_model(cfg, 10, LATENT).to(device)
        build = FeatureBuilder(cfg, device, torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device))
        sides[side] = (model, optimizer(model, cfg.train), build, cfg.train, LatentRows(store, rows, rows % 10, 2**34))
    times = {side: [] for side in sides}
    for k in range(args.recipe_epochs + 1):
        for side, (model, opt, build, tc, data) in sides.items():
            cpu = time.process_time()
            seconds = _once(lambda: train_epoch(model, opt, data, build, tc, k + 1), device)  # noqa: B023
            cpu = time.process_time() - cpu
            if k:  # the first is a warm-up
                times[side].append((seconds, cpu))
            print(
                f"  {side} epoch {k}: {len(rows) / seconds:.2f} img/s, {cpu / len(rows):.3f} CPU s per image",
                flush=True,
            )
    rate = {side: len(rows) / float(np.median([w for w, _ in t])) for side, t in times.items()}
    cpu = {side: float(np.median([c for _, c in t])) / len(rows) for side, t in times.items()}
    flops = tuple(step_flops(sides[side][0], sides[side][2]) for side in ("after", "before"))
    conv = conv_gflops(device)
    return [
        f"(d) default recipe, {args.cache_rows} latents of {LATENT}, batch {sides['after'][3].batch_size}, medians of "
        f"{args.recipe_epochs} interleaved epochs: before {rate['before']:.2f} img/s, after {rate['after']:.2f} img/s: "
        f"{rate['after'] / rate['before']:.2f}x; CPU seconds per image (all threads; robust to other load on 1 "
        f"thread) before {cpu['before']:.3f}, after {cpu['after']:.3f}: {cpu['before'] / cpu['after']:.2f}x",
        f"    FLOPs per training image (forward and backward, torch's counter): before {flops[1]:.2f} G, after "
        f"{flops[0]:.2f} G; achieved before {rate['before'] * flops[1]:.0f} GFLOP/s, after "
        f"{rate['after'] * flops[0]:.0f} GFLOP/s of wall time, {flops[1] / cpu['before']:.0f} and "
        f"{flops[0] / cpu['after']:.0f} per CPU second; the 64 -> 64 3 x 3 convolution on 32 x 32 maps sustains "
        f"{conv[0]:.0f} GFLOP/s of wall time, {conv[1]:.0f} per CPU second (forward and backward); load average at "
        f"the end {os.getloadavg()[0]:.2f}",
    ]


def step_flops(model, build) -> float:
    """GFLOP per image of a training step's forward and backward (batch of 8, half the images' backbone
    dropped as train.backbone_dropout = 0.5 draws on average)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 8
    f = build(np.zeros((n, *LATENT), np.float32), np.zeros((n, *LATENT), np.float32), torch.randn(n, 3, *LATENT))
    dropped = torch.arange(n) % 2 == 0
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(f.to(build.device), None, dropped.to(build.device)).logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n / 1e9


def conv_gflops(device, batch: int = 96, repeats: int = 5) -> tuple[float, float]:
    """GFLOP per second of wall time and per CPU second of the recipe's largest convolution, forward and
    backward, as this device runs it (the CPU figure averages the warm-up call in)."""
    conv = torch.nn.Conv2d(64, 64, 3, 1, 1, bias=False).to(device)
    x = torch.randn(batch, 64, 32, 32, device=device, requires_grad=True)
    flops = 3 * 2 * batch * 64 * 64 * 9 * 32 * 32  # forward, and the input and weight gradients

    def step():
        conv(x).sum().backward()

    cpu = time.process_time()
    wall = timed(step, device, repeats)
    cpu = (time.process_time() - cpu) / (repeats + 1)  # timed() runs one warm-up call
    return flops / wall / 1e9, flops / cpu / 1e9


def cpu_name() -> str:
    """The CPU's model name and core count (platform.processor() is empty on many Linux systems)."""
    model = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=32, help="epoch size for (b)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cache-rows", type=int, default=4096, help="latents in the cache for (c)")
    ap.add_argument("--cache-batch", type=int, default=256, help="train.batch_size for (c)")
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help="compute.precision values for (c)")
    ap.add_argument("--compile", action="store_true", help="(c) also with compute.compile = true")
    ap.add_argument("--only-cache", action="store_true", help="run (c) alone")
    ap.add_argument("--recipe", action="store_true", help="run (d) alone")
    ap.add_argument("--recipe-epochs", type=int, default=3, help="timed epochs per side for (d)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(
        f"device: {device} ({name}); torch {torch.__version__}{cuda}, {torch.get_num_threads()} threads; "
        f"batch {args.batch}; {load}",
        flush=True,
    )
    if args.recipe:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(recipe_throughput(args, device, Path(tmp))))
        return
    if args.only_cache:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(from_cache(args, device, Path(tmp))))
        return
    cfg = Config()
    torch.manual_seed(0)
    model = build_model(cfg, 10, LATENT).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    build = FeatureBuilder(cfg, device, torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device))
    b = args.batch
    mean = np.random.default_rng(0).normal(size=(b, *LATENT)).astype(np.float32)
    logvar = np.full_like(mean, -5.0)
    y = torch.randint(0, 10, (b,), device=device)
    feats = build(mean, logvar, torch.randn(b, 3, *LATENT))

    def step(f):
        loss = F.cross_entropy(model(f).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def with_features():
        step(build(mean, logvar, torch.randn((b, 3, *LATENT), device=device)))

    # interleaved, medians: sequential blocks drift by +-25% on a busy 2-core machine
    samples = {"model-only": [], "full": [], "features": []}
    for fn in (lambda: step(feats), with_features):
        fn()
    for _ in range(args.repeats):
        for key, fn in (
            ("model-only", lambda: step(feats)),
            ("full", with_features),
            ("features", lambda: build(mean, logvar, torch.randn((b, 3, *LATENT), device=device))),
        ):
            samples[key].append(_once(fn, device))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    print(
        f"(a) medians of {args.repeats} interleaved: model-only step {med['model-only'] * 1e3:.1f} ms, "
        f"with feature path {med['full'] * 1e3:.1f} ms (overhead {100 * (med['full'] / med['model-only'] - 1):.1f}%); "
        f"feature path alone {med['features'] * 1e3:.2f} ms = {100 * med['features'] / med['model-only']:.1f}% "
        "of a step (goal <= 5%)",
        flush=True,
    )

    tmp = Path("/tmp/leakpipe-bench-train")
    vae_dir = vae_lib.save_random_vae(tmp / "sd21", (128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
    vae = vae_lib.load_vae(vae_lib.resolve(VaeConfig(source=str(vae_dir))), "float32", device)
    images = torch.randint(0, 255, (args.images, 256, 256, 3), dtype=torch.uint8)
    n_batches = max(1, args.images // b)

    def epoch_cache():
        for _ in range(n_batches):
            with_features()

    def epoch_vae():
        for k in range(n_batches):
            x = to_model_range(images[k * b : (k + 1) * b].to(device))
            with torch.no_grad():
                post = vae.encode(x).latent_dist
            m = post.mean.cpu().numpy()
            step(build(m, post.logvar.cpu().numpy(), torch.randn((len(m), 3, *LATENT), device=device)))

    t_cache = timed(epoch_cache, device, 3)
    t_vae = timed(epoch_vae, device, 1)
    print(
        f"(b) epoch of {n_batches * b} images: from cache {t_cache:.2f} s, VAE in the loop {t_vae:.2f} s: "
        f"{t_vae / t_cache:.0f}x faster (goal >= 100x)",
        flush=True,
    )
    print("(c) training from a Zarr latent cache through the stage's path:")
    print("\n".join(from_cache(args, device, tmp)))


if __name__ == "__main__":
    main()
