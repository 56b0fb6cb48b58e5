"""Stage-one throughput, measured side by side in one run on the same images.

    python benchmarks/encode.py [--n 16] [--device cpu|cuda] [--batch-sizes 8,16] [--dtypes float32]

Prints (1) bare VAE forward img/s (tensors already on the device), `leakpipe encode` img/s
(decode workers + batching + Zarr writes), a naive loop (decode, encode one image, np.save) img/s,
and the ratios; (2) the wall time of a no-op `leakpipe encode` on a 10,000-row manifest of small
images, process start-up included. SD2.1's VAE architecture with random weights (same FLOPs).
"""
from __future__ import annotations

import argparse
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
from leakpipe.pipeline.config import Config, VaeConfig  # noqa: E402
from leakpipe.pipeline.engine.images import load_image, to_model_range  # noqa: E402
from leakpipe.pipeline.manifest import build_rows, scan_tree, write_manifest  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import encode as stage  # noqa: E402

SD21 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)


def make_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "g").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "g" / f"{i:05d}.png", compress_level=1)


def make_workspace(ws: Path, data: Path, vae_dir: Path, split: str = "bench", **settings) -> Config:
    rows, _ = build_rows(scan_tree(data), None)
    write_manifest(ws / "manifests" / f"{split}.csv", data, rows)
    settings.setdefault("vae", {})["source"] = str(vae_dir)
    lines = [f"[{k}]\n" + "".join(f"{a} = {json.dumps(v)}\n" for a, v in d.items())
             for k, d in settings.items()]
    (ws / "leakpipe.toml").write_text("".join(lines))
    return Workspace(ws).config()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(vae, x, batch, device, repeats=1) -> float:
    with torch.inference_mode():
        vae.encode(x[:batch]).latent_dist.mean.sum().item()  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            for k in range(0, len(x), batch):
                vae.encode(x[k:k + batch]).latent_dist.mean.sum()
        sync(device)
    return repeats * len(x) / (time.perf_counter() - t)


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


def throughput(args, tmp: Path) -> list[str]:
    device = torch.device(args.device)
    vae_dir = vae_lib.save_random_vae(tmp / "sd21-vae", **SD21)
    data = tmp / "data"
    make_images(data, args.n, 320)  # decoded, resized to 256 and cropped like real inputs
    lines = ["| dtype | batch | bare VAE img/s | leakpipe encode img/s | naive loop img/s | encode/bare | encode/naive |",
             "|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        torch_dtype = getattr(torch, dtype)
        model = vae_lib.load_vae(vae_lib.resolve(VaeConfig(source=str(vae_dir))), dtype, device)
        paths = sorted((data / "g").glob("*.png"))
        cfg = Config()
        x = torch.stack([to_model_range(torch.from_numpy(load_image(p, cfg.preprocess))[None])[0]
                         for p in paths]).to(device, torch_dtype)
        naive_rate = naive(model, paths[:max(4, args.n // 4)], cfg, device, torch_dtype, tmp / "naive")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            bare_rate = bare(model, x, batch, device)
            ws = tmp / f"ws-{dtype}-{batch}"
            cfg = make_workspace(ws, data, vae_dir, vae={"dtype": dtype},
                                 encode={"batch_size": batch, "num_workers": args.workers,
                                         "device": args.device}, store={"chunk_rows": max(64, batch)})
            stage.run(Workspace(ws), "bench", cfg, log=lambda m: None)  # model load + warm caches
            shutil.rmtree(ws / "cache" / "latents")
            t = time.perf_counter()
            res = stage.run(Workspace(ws), "bench", cfg, log=lambda m: None)
            enc_rate = res.encoded / (time.perf_counter() - t)
            lines.append(f"| {dtype} | {batch} | {bare_rate:.2f} | {enc_rate:.2f} | {naive_rate:.2f} | "
                         f"{enc_rate / bare_rate:.3f} | {enc_rate / naive_rate:.2f} |")
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
    make_workspace(ws, data, vae_dir, preprocess={"size": 16}, encode={"batch_size": 256, "num_workers": 1},
                   store={"chunk_rows": 256})
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
    return [f"no-op rerun, {rows} rows: {min(times):.2f} s (median {sorted(times)[1]:.2f} s; "
            f"first encode {first:.1f} s)"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images for the throughput table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--workers", type=int, default=1, help="decode worker processes")
    ap.add_argument("--noop-rows", type=int, default=10_000)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {args.device} ({dev}), {os.cpu_count()} cores; torch {torch.__version__}, "
          f"python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [] if args.skip_throughput else throughput(args, Path(tmp))
        lines += noop(args.noop_rows, Path(tmp)) if args.noop_rows else []
    print("\n".join(lines))


if __name__ == "__main__":
    main()
