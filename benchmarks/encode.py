"""Stage-one throughput, measured side by side in one run on the same images.

    python benchmarks/encode.py [--n 16] [--device cpu|cuda] [--batch-sizes 8,16] [--vaes sd21,taef2]
                                [--dtypes float32,bfloat16,float16] [--compile] [--source-size 512] [--size 256]

Prints (1) for each encoder (--vaes), dtype, compile setting and batch size: a bare VAE forward (tensors
already on the device), `leakpipe encode` end to end (decoding --source-size PNGs in worker processes,
resizing to --size, encoding, writing Zarr), their ratio, the FLOP limit of the device (FLOPs per image
counted by torch, peak rate from --peak-tflops or the datasheet table below) and how long the device
waited for decoded images and for writes; a naive loop (decode, encode one image, np.save) per dtype;
(2) the wall time of a no-op `leakpipe encode` on a 10,000-row manifest of small images, start-up
included. Encoders: sd21 is SD2.1's VAE architecture with random weights (same FLOPs), demo the demo's
random one (SD2.1's layout at a quarter of its width), taef2 the TAEF2 shipped with leakpipe
(builtin:taef2), each measured in the same run on the same images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leakpipe.pipeline.engine import vae as vae_lib  # noqa: E402
from leakpipe.pipeline.engine.autoencoders import load_encoder  # noqa: E402
from leakpipe.pipeline.config import Config, PreprocessConfig, VaeConfig  # noqa: E402
from leakpipe.pipeline.engine.images import load_image, to_model_range  # noqa: E402
from leakpipe.pipeline.engine.precision import channels_last, compiled  # noqa: E402
from leakpipe.pipeline.manifest import build_rows, scan_tree, write_manifest  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import graph, encode as stage  # noqa: E402

SD21 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
# the encoders --vaes names: each gives vae.source under a temporary folder
VAES = {
    "sd21": lambda tmp: str(vae_lib.save_random_vae(tmp / "sd21-vae", **SD21)),
    "demo": lambda tmp: str(vae_lib.save_random_vae(tmp / "demo-vae", (32, 64, 64, 64))),
    "taef2": lambda tmp: "builtin:taef2",
}


def make_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "g").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "g" / f"{i:05d}.png", compress_level=1)


def make_workspace(ws: Path, data: Path, vae_dir: Path | str, split: str = "bench", **settings) -> Config:
    rows, _ = build_rows(scan_tree(data), None)
    write_manifest(ws / "manifests" / f"{split}.csv", data, rows)
    settings.setdefault("vae", {})["source"] = str(vae_dir)
    lines = [f"[{k}]\n" + "".join(f"{a} = {json.dumps(v)}\n" for a, v in d.items()) for k, d in settings.items()]
    (ws / "leakpipe.toml").write_text("".join(lines))
    return Workspace(ws).config()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(vae, x, batch, device, repeats=1) -> float:
    """img/s of the VAE alone on full batches already on the device, laid out as encode lays them."""
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    starts = range(0, len(x) - batch + 1, batch)
    with torch.inference_mode():
        vae.encode(x[:batch]).latent_dist.mean.sum().item()  # warm-up (and compilation)
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            for k in starts:
                vae.encode(x[k : k + batch]).latent_dist.mean.sum()
        sync(device)
    return repeats * len(starts) * batch / (time.perf_counter() - t)


def naive(vae, paths, cfg, device, dtype, out: Path) -> float:
    out.mkdir(exist_ok=True)
    t = time.perf_counter()
    with torch.inference_mode():
        for i, p in enumerate(paths):
            x = to_model_range(torch.from_numpy(load_image(p, cfg.preprocess))[None].to(device))
            post = vae.encode(x.to(dtype)).latent_dist
            np.save(out / f"{i}.npy", torch.cat([post.mean, post.logvar], 1).float().cpu().numpy())
    sync(device)
    return len(paths) / (time.perf_counter() - t)


# Dense tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity); float32 is the plain
# FP32 rate (TF32 off). Used only to print the FLOP limit; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def peak_tflops(device, dtype: str, override: float) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((table[dtype] for key, table in PEAK_TFLOPS.items() if key in name), None)


def flops_per_image(vae, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vae.encode(x[:1]).latent_dist.mean.sum()
    return float(counter.get_total_flops())


def throughput(args, tmp: Path) -> list[str]:
    data = tmp / "data"
    make_images(data, args.n, args.source_size)  # decoded, resized to --size and cropped like real inputs
    lines = [
        "| encoder | dtype | compile | batch | GFLOP/img | bare VAE img/s | leakpipe encode img/s | encode/bare "
        "| FLOP limit img/s | bare/limit | device waited: decode / write s | naive loop img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.vaes.split(","):
        lines += encoder_rows(args, tmp, name, VAES[name](tmp), data)
    return lines


def encoder_rows(args, tmp: Path, name: str, source: str, data: Path) -> list[str]:
    device = torch.device(args.device)
    src = vae_lib.resolve(VaeConfig(source=source))
    paths = sorted((data / "g").glob("*.png"))
    lines = []
    for dtype in args.dtypes.split(","):
        torch_dtype = getattr(torch, dtype)
        cfg = dataclasses.replace(Config(), preprocess=PreprocessConfig(size=args.size))
        x = torch.stack([to_model_range(torch.from_numpy(load_image(p, cfg.preprocess))[None])[0] for p in paths]).to(
            device, torch_dtype
        )
        plain = load_encoder(src, dtype, device)
        flops = flops_per_image(plain, x)
        peak = peak_tflops(device, dtype, args.peak_tflops)
        limit = peak * 1e12 / flops if peak else None
        naive_rate = naive(plain, paths[: max(4, args.n // 4)], cfg, device, torch_dtype, tmp / "naive")
        print(
            f"{name} {dtype}: {flops / 1e9:.1f} GFLOP per image (counted)"
            + (f", peak {peak} TFLOP/s -> at most {limit:.0f} img/s" if peak else ""),
            flush=True,
        )
        for compile_ in [False, True] if args.compile else [False]:
            model = load_encoder(src, dtype, device)
            channels_last(model, device)
            model.encode = compiled(model.encode, compile_)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                bare_rate = bare(model, x, batch, device)
                ws = tmp / f"ws-{name}-{dtype}-{batch}-{compile_}"
                cfg = make_workspace(
                    ws,
                    data,
                    source,
                    vae={"dtype": dtype},
                    preprocess={"size": args.size},
                    encode={"batch_size": batch, "num_workers": args.workers, "device": args.device},
                    compute={"compile": compile_},
                    store={"chunk_rows": max(64, batch)},
                )
                stage.run(graph(Workspace(ws), cfg), "bench", log=lambda m: None)  # model load, compile, warm caches
                shutil.rmtree(ws / "cache" / "latents")
                t = time.perf_counter()
                res = stage.run(graph(Workspace(ws), cfg), "bench", log=lambda m: None)
                enc_rate = res.encoded / (time.perf_counter() - t)
                lim = f"{limit:.0f} | {bare_rate / limit:.3f}" if limit else "n/a | n/a"
                lines.append(
                    f"| {name} | {dtype} | {'on' if compile_ else 'off'} | {batch} | {flops / 1e9:.1f} | "
                    f"{bare_rate:.2f} | {enc_rate:.2f} | {enc_rate / bare_rate:.3f} | {lim} | "
                    f"{res.waited.get('decode', 0):.2f} / {res.waited.get('write', 0):.2f} | {naive_rate:.2f} |"
                )
                print(lines[-1], flush=True)
    return lines


def noop(rows: int, tmp: Path) -> list[str]:
    data, ws = tmp / "small", tmp / "ws-noop"
    rng = np.random.default_rng(1)
    for i in range(rows):
        d = data / f"g{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    vae_dir = vae_lib.save_random_vae(tmp / "tiny-vae", (8, 16), seed=0)
    make_workspace(
        ws,
        data,
        vae_dir,
        preprocess={"size": 16},
        encode={"batch_size": 256, "num_workers": 1},
        store={"chunk_rows": 256},
    )
    cmd = [sys.executable, "-m", "leakpipe.pipeline.cli", "encode", "--split", "bench", "-C", str(ws)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    first = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times.append(time.perf_counter() - t)
        assert "up to date" in out, out
    return [
        f"no-op rerun, {rows} rows: {min(times):.2f} s (median {sorted(times)[1]:.2f} s; first encode {first:.1f} s)"
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images for the throughput table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--vaes", default="sd21,taef2", help=f"encoders, side by side: {', '.join(VAES)}")
    ap.add_argument("--size", type=int, default=256, help="preprocess.size: the side the encoder sees")
    ap.add_argument("--workers", type=int, default=-1, help="decode worker processes (-1: encode's automatic choice)")
    ap.add_argument("--source-size", type=int, default=512, help="side of the PNGs that are decoded and resized to 256")
    ap.add_argument("--compile", action="store_true", help="also measure with compute.compile = true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak for the dtype")
    ap.add_argument("--noop-rows", type=int, default=10_000)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"device: {args.device} ({dev}), {os.cpu_count()} cores; torch {torch.__version__}, "
        f"python {platform.python_version()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        lines = [] if args.skip_throughput else throughput(args, Path(tmp))
        lines += noop(args.noop_rows, Path(tmp)) if args.noop_rows else []
    print("\n".join(lines))


if __name__ == "__main__":
    main()
