"""Scale (issue 25): what each command costs at 1 k, 10 k, 100 k and 1 M rows, side by side in one run.

    python benchmarks/scale.py [--sizes 1000,10000,100000,1000000] [--workdir DIR] [--score-rows 100000]
                               [--score-bootstrap 0,1000] [--keep]

Per size: a workspace of 4 classes of 8x8 PNGs, the tiny random VAE (blocks 8, 16), chunks of 1,024
rows. Each command runs as its own process (the `leakpipe` command's entry point, start-up included),
timed by wall clock, its peak RSS taken from wait4: `manifest build`, the first `encode`, a no-op
`encode`, `status`, `verify`, and one added image (`manifest build`, then `encode`), once appended
at the end of the last class (rows stay: a resize) and once at the end of the first (every later
row moves: a relayout).

Every image has its own random pixels, so every file its own content hash, as in real data: one
file copied a million times would make every row share one source hash, which the leakage audit
and the relayout's row matching treat as one image. They are written by a minimal PNG encoder
(zlib + crc32), four times faster than Pillow for 8x8 images.

`score`: the evaluation stage three runs on embeddings (closed set with the Mahalanobis comparator,
open set by KDE gating off and on, the unseen-generator threshold), on synthetic embeddings
(4 classes, 128-D, `--score-rows` closed test rows, as many training rows, a fifth as many open
rows), because training a model on a million latents is not practical on a CPU. Figures and the
pixel baselines, which read the images, are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

CLASSES = 4


def png(pixels: np.ndarray) -> bytes:
    """A valid 8-bit RGB PNG of `pixels` (h, w, 3) uint8: signature, IHDR, one IDAT, IEND."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


def write_images(data: Path, n: int, seed: int = 0) -> float:
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (data / f"g{c}").mkdir(parents=True, exist_ok=True)
    for lo in range(0, n, 65536):
        block = rng.integers(0, 256, (min(65536, n - lo), 8, 8, 3), dtype=np.uint8)
        for k, px in enumerate(block):
            i = lo + k
            (data / f"g{i % CLASSES}" / f"{i:07d}.png").write_bytes(png(px))
    return time.perf_counter() - start


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, output) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return seconds, usage.ru_maxrss / 1024, out


def leakpipe(ws: Path, *args: str) -> tuple[float, float, str]:
    # not `python -m leakpipe.pipeline.cli`: run as __main__, the module's commands register on another copy
    return timed([sys.executable, "-c", "from leakpipe.pipeline.cli import main; main()", *args, "-C", str(ws)], ws)


def workspace(root: Path, n: int) -> Path:
    from leakpipe.pipeline.engine.vae import save_random_vae

    ws = root / f"ws-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    print(f"  writing {n} images: {write_images(ws / 'data', n):.0f} s", file=sys.stderr)
    save_random_vae(ws / "vae", (8, 16), seed=0)
    (ws / "leakpipe.toml").write_text(
        '[vae]\nsource = "./vae"\n[preprocess]\nsize = 8\n[store]\nchunk_rows = 1024\n'
        "[encode]\nnum_workers = 0\nbatch_size = 256\n"
    )
    return ws


def added(ws: Path, folder: str, name: str) -> tuple[float, float, float]:
    """(seconds of manifest build, of encode, peak RSS of either) after one more image in `folder`."""
    seed = sum(map(ord, folder + name))  # each added image its own content
    (ws / "data" / folder / name).write_bytes(png(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)))
    build = leakpipe(ws, "manifest", "build", "data", "--split", "closed")
    enc = leakpipe(ws, "encode", "--split", "closed")
    assert "1 encoded" in enc[2], enc[2]
    return build[0], enc[0], max(build[1], enc[1])


def one_size(root: Path, n: int) -> dict:
    ws = workspace(root, n)
    row = {"rows": n}
    for key, args in (
        ("manifest build", ("manifest", "build", "data", "--split", "closed")),
        ("first encode", ("encode", "--split", "closed")),
        ("no-op encode", ("encode", "--split", "closed")),
        ("status", ("status",)),
        ("verify", ("verify",)),
    ):
        row[key] = leakpipe(ws, *args)[:2]
        print(f"  {n}: {key} {row[key][0]:.2f} s, {row[key][1]:.0f} MiB", file=sys.stderr)
    assert "up to date" in leakpipe(ws, "encode", "--split", "closed")[2]
    for key, folder, name in (
        ("added, rows stay", f"g{CLASSES - 1}", "zz-added.png"),
        ("added, rows move", "g0", "zz-added.png"),
    ):
        build, enc, rss = added(ws, folder, name)
        row[key] = (build + enc, rss)
        row[key + " (build, encode)"] = (build, enc)
        print(f"  {n}: {key}: build {build:.2f} s + encode {enc:.2f} s, {rss:.0f} MiB", file=sys.stderr)
    row["disk"] = {
        "store MiB": du(ws / "cache" / "latents") / 2**20,
        "hash cache MiB": du(ws / "cache" / "file-hashes.sqlite") / 2**20,
        "lock MiB": sum(p.stat().st_size for p in (ws / "cache" / "latents").rglob("*.lock.json")) / 2**20,
    }
    return row


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# ---------------------------------------------------------------- score on synthetic embeddings
def score_only(n_test: int, n_boot: int, kde_cap: int) -> None:
    """Runs in its own process (the parent takes its peak RSS): stage three's evaluation."""
    from leakpipe.pipeline.config import ScoreConfig
    from leakpipe.pipeline.report import evaluate as ev

    rng = np.random.default_rng(0)
    classes = [f"g{c}" for c in range(CLASSES)]
    centres = rng.normal(0, 1, (CLASSES + 2, 128))

    def split(name, n, offset=0, partition="test"):
        y = rng.integers(0, CLASSES, n) + offset
        h = (centres[y] + rng.normal(0, 1.5, (n, 128))).astype(np.float32)
        logits = (h @ centres[:CLASSES].T).astype(np.float32)
        arrays = {"h_bar": h, "w": rng.uniform(0.5, 1, (n, 128)).astype(np.float32), "logits": logits}
        labels = np.array([f"g{c}" for c in y], dtype=object)
        return ev.Split(name, arrays, labels, np.full(n, partition, dtype=object), np.full(n, "raw", dtype=object))

    cfg = ScoreConfig(bootstrap=n_boot, kde_folds=5, kde_max_reference=kde_cap)
    train, val, test = (
        split("train", n_test, partition="train"),
        split("val", n_test // 5, partition="val"),
        split("test", n_test),
    )
    opened = split("open", n_test // 5, offset=CLASSES - 2)
    start = time.perf_counter()
    closed = ev.closed_set(ev.comparator(train, classes, cfg), {"raw": test}, classes, cfg.bootstrap, cfg.seed)
    t_closed = time.perf_counter() - start
    res = ev.open_set(train, test, opened, cfg)
    unseen, _ = ev.calibrate_unseen(res.kdes["gating_off"], val, "h_bar")
    print(
        json.dumps(
            {
                "closed_s": t_closed,
                "total_s": time.perf_counter() - start,
                "top1": closed["raw"]["head"]["top1"],
                "auroc": res.metrics["gating_off"]["auroc"],
                "kde_reference": res.metrics["gating_off"].get("kde_reference"),
                "threshold": unseen,
            }
        )
    )


def score(n_test: int, n_boot: int, kde_cap: int) -> tuple[float, float, dict]:
    seconds, rss, out = timed(
        [
            sys.executable,
            __file__,
            "--score-only",
            str(n_test),
            "--score-bootstrap",
            str(n_boot),
            "--score-kde-cap",
            str(kde_cap),
        ],
        Path.cwd(),
    )
    return seconds, rss, json.loads(out.strip().splitlines()[-1])


def kde_cap_error(n: int = 8000, dim: int = 16, caps=(4000, 2000, 1000), seeds=(0, 1, 2)) -> str:
    """score.kde_max_reference against the exact KDE where both fit: n references of 4 classes,
    1,000 closed and 1,000 open queries (the classes shifted by 1.2), bandwidth cross-validated on each
    (2 folds, 5 factors, to keep the exact fit to a minute here)."""
    from leakpipe.pipeline.math.kde import GaussianKDE
    from leakpipe.pipeline.math.metrics import open_auroc

    out = [
        f"| cap (of {n:,} references, {dim}-D) | open-set AUROC, exact -> capped (per seed) | "
        "median abs log-density error (nats) | bandwidth ratio |",
        "|---:|---|---:|---:|",
    ]
    per_cap = {c: [] for c in caps}
    for seed in seeds:
        r = np.random.default_rng(seed)
        centres = r.normal(0, 1.5, (4, dim))
        x = centres[r.integers(0, 4, n)] + r.normal(0, 1, (n, dim))
        q = np.r_[
            centres[r.integers(0, 4, 1000)] + r.normal(0, 1, (1000, dim)),
            centres[r.integers(0, 4, 1000)] + r.normal(0, 1, (1000, dim)) + 1.2,
        ]
        kw = dict(folds=2, grid_factors=(0.1, 0.2, 0.4, 0.8, 1.6), seed=seed)
        exact = GaussianKDE(**kw).fit(x)
        e = exact.score_samples(q)
        for cap in caps:
            kde = GaussianKDE(max_reference=cap, **kw).fit(x)
            c = kde.score_samples(q)
            per_cap[cap].append(
                (
                    open_auroc(e[:1000], e[1000:]),
                    open_auroc(c[:1000], c[1000:]),
                    float(np.median(np.abs(c - e))),
                    kde.bandwidth_ / exact.bandwidth_,
                )
            )
    for cap, rows in per_cap.items():
        out.append(
            f"| {cap:,} | "
            + ", ".join(f"{a:.3f} -> {b:.3f} ({b - a:+.3f})" for a, b, _, _ in rows)
            + f" | {np.mean([r[2] for r in rows]):.2f} | {np.mean([r[3] for r in rows]):.3f} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- tables
CMDS = ("manifest build", "first encode", "no-op encode", "status", "verify", "added, rows stay", "added, rows move")
GOALS = {"no-op encode": 2, "status": 2, "added, rows stay": 3}  # at 100 k, within this ratio of 1 k


def tables(rows: list[dict]) -> str:
    base = rows[0]
    out = ["| command | " + " | ".join(f"{r['rows']:,} rows" for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for cmd in CMDS:
        cells = [f"{r[cmd][0]:.2f} s ({r[cmd][0] / base[cmd][0]:.1f}x), {r[cmd][1]:.0f} MiB" for r in rows]
        out.append(f"| {cmd} | " + " | ".join(cells) + " |")
    for key in ("store MiB", "hash cache MiB", "lock MiB"):
        out.append(f"| {key} on disk | " + " | ".join(f"{r['disk'][key]:.1f}" for r in rows) + " |")
    out += [
        "",
        "seconds (ratio to the smallest size), peak RSS; 'added': manifest build + encode "
        "(build / encode: "
        + "; ".join(
            f"{r['rows']:,}: "
            + ", ".join(
                f"{r[k + ' (build, encode)'][0]:.2f} / {r[k + ' (build, encode)'][1]:.2f}"
                for k in ("added, rows stay", "added, rows move")
            )
            for r in rows
        )
        + ")",
    ]
    return "\n".join(out)


def goals(rows: list[dict]) -> str:
    by = {r["rows"]: r for r in rows}
    out = []
    if 1000 in by and 100000 in by:
        for cmd, limit in GOALS.items():
            ratio = by[100000][cmd][0] / by[1000][cmd][0]
            out.append(
                f"- {cmd} at 100 k / 1 k: {ratio:.2f}x (goal <= {limit}x): {'met' if ratio <= limit else 'MISSED'}"
            )
    if 1000000 in by:
        big = by[1000000]
        for cmd in ("no-op encode", "status"):
            out.append(f"- {cmd} at 1 M: {big[cmd][0]:.2f} s (goal <= 3 s): {'met' if big[cmd][0] <= 3 else 'MISSED'}")
        rss = max(v[1] for k, v in big.items() if k in CMDS)
        out.append(f"- peak RSS at 1 M, any command: {rss:.0f} MiB (goal < 2048): {'met' if rss < 2048 else 'MISSED'}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--workdir", type=Path, help="where the workspaces go [a new temporary folder]")
    ap.add_argument("--score-rows", type=int, default=100000, help="closed test rows of the score run (0: none)")
    ap.add_argument("--score-bootstrap", default="0,1000", help="score.bootstrap values to run score with")
    ap.add_argument(
        "--score-kde-cap",
        type=int,
        default=2000,
        help="score.kde_max_reference of the score run: the KDE's time is (test + open rows) x cap "
        "plus 13 x cap^2 for its bandwidth, whatever the training set",
    )
    ap.add_argument("--kde-error", action="store_true", help="only measure the capped KDE against the exact one")
    ap.add_argument("--score-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the workspaces")
    a = ap.parse_args()
    if a.score_only:
        return score_only(a.score_only, int(a.score_bootstrap), a.score_kde_cap)
    if a.kde_error:
        return print(kde_cap_error())
    root = a.workdir or Path(tempfile.mkdtemp(prefix="leakpipe-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f} at the start; workspaces in {root}"
    )
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        rows.append(one_size(root, n))
        if not a.keep:
            shutil.rmtree(root / f"ws-{n}", ignore_errors=True)
    print(tables(rows) + "\n\n" + goals(rows))
    for n_boot in (int(b) for b in a.score_bootstrap.split(",") if b) if a.score_rows else ():
        seconds, rss, facts = score(a.score_rows, n_boot, a.score_kde_cap)
        print(
            f"- score, {a.score_rows:,} closed test rows (synthetic embeddings), score.bootstrap = {n_boot}: "
            f"{seconds:.1f} s, peak RSS {rss:.0f} MiB (goal < 4096: {'met' if rss < 4096 else 'MISSED'}); "
            f"KDE reference {facts['kde_reference']}"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
