"""Latent stores at a local path, memory:// and S3 (a local moto server) side by side: first encode,
no-op rerun, `status` and `verify` wall times, on one manifest and a tiny random VAE.

    python benchmarks/store_url.py [--n 512] [--chunk-rows 64]

What it isolates is leakpipe's own cost of reaching a store through fsspec (listing, checksums,
chunk PUTs); the moto server runs on this machine, so network latency is not in these figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from leakpipe.pipeline.cli import main as cli_main
from leakpipe.pipeline.engine.vae import save_random_vae


def s3_endpoint():
    """Start moto on a free port and point fsspec's S3 at it; None if moto or s3fs is missing."""
    import importlib.util

    if importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("moto") is None:
        return None
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port).start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{port}"}
    fsspec.filesystem("s3").mkdir("bench")
    return "s3://bench/latents"


def timed(*args: str) -> float:
    from click.testing import CliRunner

    start = time.perf_counter()
    r = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--chunk-rows", type=int, default=64)
    a = ap.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="leakpipe-store-url-"))
    rng = np.random.default_rng(0)
    for i in range(a.n):
        (ws / "data" / f"g{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ws / "data" / f"g{i % 4}" / f"{i}.png")
    vae = save_random_vae(ws / "vae", (8, 16), seed=0)
    (ws / "leakpipe.toml").write_text(
        f'[vae]\nsource = "{vae}"\n[preprocess]\nsize = 32\n[store]\n'
        f"chunk_rows = {a.chunk_rows}\n[encode]\nnum_workers = 0\nbatch_size = 16\n"
    )
    timed("manifest", "build", str(ws / "data"), "--split", "closed", "-C", str(ws))
    where = {"local": "", "memory://": "memory://bench/latents"}
    if (s3 := s3_endpoint()) is not None:
        where["s3 (moto)"] = s3
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores; {a.n} rows of 32x32 images, chunks of "
        f"{a.chunk_rows} rows, tiny random VAE; seconds, and the ratio to the local store"
    )
    print("| store | first encode | no-op rerun | status | verify |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, url in where.items():
        sets = ["--set", f"store.url={url}", "-C", str(ws)]
        row = [
            timed("encode", "--split", "closed", *sets),
            timed("encode", "--split", "closed", *sets),
            timed("status", *sets),
            timed("verify", *sets),
        ]
        base = base or row
        print(f"| {name} | " + " | ".join(f"{t:.2f} ({t / b:.2f}x)" for t, b in zip(row, base)) + " |")


if __name__ == "__main__":
    main()
