"""Scale (issues 25 and 36): what each command costs at 1 k, 10 k, 100 k and 1 M rows, side by side in one run,
and against an earlier checkout of leakpipe (`--baseline`) on the same images in the same run.

    python benchmarks/scale.py [--sizes 1000,100000,1000000] [--baseline PYTHON] [--workdir DIR]
    python benchmarks/scale.py --score-rows 100000,1000000 --sizes "" [--baseline PYTHON]
    python benchmarks/scale.py --ovl-error | --kde-error

Per size: 4 classes of 8x8 PNGs (written once per --workdir, then reused), the tiny random VAE (blocks
8, 16), chunks of 1,024 rows. Each command runs as its own process (the `leakpipe` command's entry
point, start-up included), timed by wall clock, its peak RSS taken from wait4: `manifest build`, the
first `encode`, a no-op `encode`, `status`, `verify`, and one added image (`manifest build`, then
`encode`), once appended at the end of the last class (rows stay: a resize) and once at the end of the
first (every later row moves: a relayout).

The first encode and the added images run with a null encoder (a test double: every image reads as
zeros without opening its file, the VAE returns zero latents), so what they measure is encode's
bookkeeping: the manifest, the files' hashes, the plan, the store's writes and checksums, the lock.
`first encode, tiny VAE` is the same command with the images decoded and the tiny VAE run, in a
workspace of its own (`--vae-sizes`).

The stat floor of each size is the cost of stat-ing the manifest's files, measured beside the commands:
Python's os.stat over the paths in one thread, in 4 threads and in two processes (half each, as
store/stats.py does), and `find -printf` (C, fstatat); the floor is the fastest of the four.
With `--baseline`, the earlier checkout's workspace is then handed to this one: its first `encode` must
find the latents up to date (the lock's format is upgraded, nothing is encoded), and the no-op after it
is timed.

Every image has its own random pixels, so every file its own content hash, as in real data. They are
written by a minimal PNG encoder (zlib + crc32), four times faster than Pillow for 8x8 images.

`score`: the evaluation stage three runs on embeddings (`report.scoring.evaluate`: closed set,
calibration, prediction sets, open set with KDE gating off and on, per unseen generator, the unseen
threshold; not the figures, nor the pixel baselines, which read images), on synthetic embeddings
(4 known classes and 4 unseen generators in 128-D, `--score-rows` closed test rows, as many training
rows, a fifth as many validation and open rows), because training a model on a million latents is not
practical on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
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
from concurrent.futures import ThreadPoolExecutor
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
    """n images in data/g0..g3, unless a finished earlier run left them there (its `done` file)."""
    done = data / f"done-{n}"
    if done.exists():
        return 0.0
    shutil.rmtree(data, ignore_errors=True)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (data / f"g{c}").mkdir(parents=True, exist_ok=True)
    for lo in range(0, n, 65536):
        block = rng.integers(0, 256, (min(65536, n - lo), 8, 8, 3), dtype=np.uint8)
        for k, px in enumerate(block):
            i = lo + k
            (data / f"g{i % CLASSES}" / f"{i:07d}.png").write_bytes(png(px))
    done.write_text("")
    return time.perf_counter() - start


def timed(cmd: list[str], cwd: Path, timeout: float | None = None) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS in MiB, output, CPU seconds) of one process; (inf, nan, output, nan)
    past `timeout`. CPU seconds (user + system, every thread) say what a figure is made of when the
    machine's load stretches its wall time."""
    start = time.perf_counter()
    with open(os.devnull, "rb") as nothing, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=nothing, stdout=out, stderr=subprocess.STDOUT)
        while not (done := os.wait4(proc.pid, os.WNOHANG))[0]:
            if timeout is not None and time.perf_counter() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                out.seek(0)
                return float("inf"), float("nan"), out.read().decode(errors="replace"), float("nan")
            time.sleep(0.002)
        seconds = time.perf_counter() - start
        _, status, usage = done
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text, usage.ru_utime + usage.ru_stime


def fig(result: tuple) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds) of a `timed` result."""
    return result[0], result[1], result[3]


def null_encoder() -> None:
    """A test double for the encoder: every image reads as zeros without opening its file, and the VAE
    returns zero latents of its shape. What is left of `encode` is its bookkeeping: the manifest, the
    files' hashes, the plan, the store's writes and checksums, the lock."""
    from leakpipe.pipeline.engine import encoding

    def read_image(path, cfg):
        return np.zeros((cfg.size, cfg.size, 3), np.uint8)

    def encode_batch(vae, device, images, store_dtype):
        c, side = vae.config.latent_channels, images.shape[1] // 2 ** (len(vae.config.block_out_channels) - 1)
        zeros = np.zeros((len(images), c, side, side), store_dtype)
        return zeros, zeros.copy()

    encoding.read_image, encoding.encode_batch = read_image, encode_batch


def leakpipe(python: str, ws: Path, *args: str, null: bool = False) -> tuple[float, float, str, float]:
    # not `python -m leakpipe.pipeline.cli`: run as __main__, the module's commands register on another copy
    code = "from leakpipe.pipeline.cli import main; main()"
    if null:
        here = str(Path(__file__).resolve().parent)
        code = f"import sys; sys.path.insert(0, {here!r}); import scale; scale.null_encoder(); {code}"
    return timed([python, "-c", code, *args, "-C", str(ws)], ws)


def workspace(python: str, root: Path, name: str, data: Path) -> Path:
    ws = root / name
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "data").symlink_to(data)
    code = "import sys; from leakpipe.pipeline.engine.vae import save_random_vae as save; save(sys.argv[1], (8, 16))"
    subprocess.run([python, "-c", code, str(ws / "vae")], check=True)
    (ws / "leakpipe.toml").write_text(
        '[vae]\nsource = "./vae"\n[preprocess]\nsize = 8\n[store]\nchunk_rows = 1024\n'
        "[encode]\nnum_workers = 0\nbatch_size = 256\n"
    )
    return ws


BUILD = ("manifest", "build", "data", "--split", "closed")
ENCODE = ("encode", "--split", "closed")


def added(python: str, ws: Path, folder: str, name: str) -> tuple[float, float, float]:
    """(seconds of manifest build, of encode, peak RSS of either) after one more image in `folder`."""
    seed = sum(map(ord, folder + name))  # each added image its own content
    (ws / "data" / folder / name).write_bytes(png(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)))
    build = leakpipe(python, ws, *BUILD)
    enc = leakpipe(python, ws, *ENCODE, null=True)
    assert "1 encoded" in enc[2], enc[2]
    return build[0], enc[0], max(build[1], enc[1]), build[3] + enc[3]


def commands(python: str, ws: Path, n: int, tag: str) -> dict:
    """Every command of one size with one leakpipe; the added images are taken out again after."""
    row = {}
    for key, args, null in (
        ("manifest build", BUILD, False),
        ("first encode", ENCODE, True),
        ("no-op encode", ENCODE, False),
        ("status", ("status",), False),
        ("verify", ("verify",), False),
    ):
        row[key] = fig(leakpipe(python, ws, *args, null=null))
        print(f"  {tag} {n}: {key} {cell(row[key])}", file=sys.stderr)
    assert "up to date" in leakpipe(python, ws, *ENCODE)[2]
    try:
        for key, folder, name in (
            ("added, rows stay", f"g{CLASSES - 1}", "zz-added.png"),
            ("added, rows move", "g0", "zz-added.png"),
        ):
            build, enc, rss, cpu = added(python, ws, folder, name)
            row[key], row[key + " (build, encode)"] = (build + enc, rss, cpu), (build, enc)
            print(f"  {tag} {n}: {key}: build {build:.2f} s + encode {enc:.2f} s, {rss:.0f} MiB", file=sys.stderr)
    finally:  # the images as they were, for the other leakpipe, and this workspace up to date with them
        for folder in (f"g{CLASSES - 1}", "g0"):
            (ws / "data" / folder / "zz-added.png").unlink(missing_ok=True)
        leakpipe(python, ws, *BUILD)
        leakpipe(python, ws, *ENCODE, null=True)
    row["disk"] = {
        "store MiB": du(ws / "cache" / "latents") / 2**20,
        "hash cache MiB": du(ws / "cache" / "file-hashes.sqlite") / 2**20,
        "lock MiB": sum(p.stat().st_size for p in (ws / "cache" / "latents").rglob("*.lock.json")) / 2**20,
        "lock's rows MiB": sum(p.stat().st_size for p in (ws / "cache" / "latents").rglob("*.lock.json.rows")) / 2**20,
    }
    return row


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def stat_floor(data: Path, threads: int = 4) -> dict:
    """Seconds to stat every image under `data` (best of 3 each): os.stat in one thread, in `threads`
    threads, in two processes (half each), each keeping its stat results in a list or dropping each as it
    comes (a result is about 0.7 kB of Python objects: held by the hundred thousand, their page faults
    are part of the time), and `find -printf` (C: fstatat, no Python)."""
    paths = sorted(str(p) for p in data.glob("g*/*.png"))

    def serial(keep):
        (list if keep else _drained)(map(os.stat, paths))

    def parallel(keep):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda k: (list if keep else _drained)(map(os.stat, paths[k::threads])), range(threads)))

    def processes(keep):  # the other half in a forked copy, as hashing's stats do: no Python shared between them
        half = len(paths) // 2
        pid = os.fork()
        if pid == 0:
            (list if keep else _drained)(map(os.stat, paths[half:]))
            os._exit(0)
        (list if keep else _drained)(map(os.stat, paths[:half]))
        os.waitpid(pid, 0)

    def find(keep):
        subprocess.run(
            ["find", "-L", str(data), "-name", "*.png", "-printf", "%i %s %T@\n"], stdout=subprocess.DEVNULL, check=True
        )

    out = {}
    ways = [
        (f"python, {name}{', kept' if keep else ', dropped'}", functools.partial(fn, keep))
        for name, fn in (("1 thread", serial), (f"{threads} threads", parallel), ("2 processes", processes))
        for keep in (True, False)
    ]
    for name, fn in [*ways, ("find -printf", functools.partial(find, False))]:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = best
    out["floor"] = min(out.values())
    return out


def _drained(results) -> None:
    collections.deque(results, maxlen=0)


def one_size(root: Path, n: int, pythons: dict, vae_sizes: set) -> dict:
    data = root / f"data-{n}"
    print(f"  writing {n} images: {write_images(data, n):.0f} s", file=sys.stderr)
    out = {"rows": n, "floor": stat_floor(data)}
    print(f"  {n}: stat floor {out['floor']}", file=sys.stderr)
    for tag, python in pythons.items():
        out[tag] = commands(python, workspace(python, root, f"ws-{tag}-{n}", data), n, tag)
    if "before" in pythons:  # the earlier checkout's workspace, read by this one
        ws, python = root / f"ws-before-{n}", pythons["after"]
        first = leakpipe(python, ws, *ENCODE)
        assert "up to date" in first[2] and "encoded" not in first[2], first[2]
        out["upgrade"] = {"first encode after": fig(first), "no-op after": fig(leakpipe(python, ws, *ENCODE))}
        print(f"  {n}: upgrade {out['upgrade']}", file=sys.stderr)
    if n in vae_sizes:
        for tag, python in pythons.items():
            ws = workspace(python, root, f"ws-{tag}-{n}-vae", data)
            leakpipe(python, ws, *BUILD)
            out[tag]["first encode, tiny VAE"] = fig(leakpipe(python, ws, *ENCODE))
            print(f"  {tag} {n}: first encode, tiny VAE {out[tag]['first encode, tiny VAE']}", file=sys.stderr)
    return out


# ---------------------------------------------------------------- score on synthetic embeddings
class SyntheticReader:
    """What `report.scoring.evaluate` reads of a trained result (its Reader), made up: 4 known classes
    in 128-D (train, val and test rows in one closed split) and 4 unseen generators (the open split)."""

    name, random_vae, prototypes = "synthetic", False, None

    def __init__(self, n_test: int):
        from leakpipe.pipeline.config import Config

        self.run_cfg = Config()
        rng = np.random.default_rng(0)
        centres = rng.normal(0, 0.15, (2 * CLASSES, 128))  # classes that overlap: top-1 about 0.9
        parts = {"train": n_test, "val": n_test // 5, "test": n_test}
        self.splits = {
            "closed": self._split(rng, centres, "closed", parts, 0),
            "open": self._split(rng, centres, "open", {"": n_test // 5}, CLASSES),
        }

    @staticmethod
    def _split(rng, centres, name: str, parts: dict, offset: int):
        from leakpipe.pipeline.report import evaluate as ev

        n = sum(parts.values())
        y = rng.integers(0, CLASSES, n) + offset
        # made in chunks of rows, from the same draws in the same order as whole arrays (what a store
        # reads is float32; the float64 draws of 1 M rows would double this benchmark's own peak)
        chunks = [slice(s, min(n, s + (1 << 16))) for s in range(0, n, 1 << 16)]
        h, w, logits = (np.empty((n, d), np.float32) for d in (128, 128, CLASSES))
        for c in chunks:
            h[c] = centres[y[c]] + rng.normal(0, 1, (c.stop - c.start, 128))
        for c in chunks:
            w[c] = rng.uniform(0.5, 1, (c.stop - c.start, 128))
            logits[c] = 4 * h[c] @ centres[:CLASSES].T
        arrays = {"h_bar": h, "w": w, "logits": logits, "a_t": np.full((n, 3), 1 / 3, np.float32)}
        labels = np.array([f"g{c}" for c in y], dtype=object)
        partition = np.array([p for p, k in parts.items() for _ in range(k)], dtype=object)
        paths = np.array([f"{lab}/{i:07d}.png" for i, lab in enumerate(labels)], dtype=object)
        ids = {"path": paths, "row": np.arange(n)}
        return ev.Split(name, arrays, labels, partition, np.full(n, "raw", dtype=object), 0, ids)

    def split(self, name: str):
        return self.splits[name], {"classes": [f"g{c}" for c in range(CLASSES)], "timesteps": [0, 5, 10]}

    def manifest_path(self, name: str) -> Path:
        return Path(f"manifests/{name}.csv")

    def stage_features(self, rows) -> dict:
        return {}


class RssProfile:
    """Where the memory goes: a thread that reads this process's RSS every `every` seconds and files
    it under what the main thread is doing then, keeping each phase's lowest and highest RSS: the phase
    by its outermost leakpipe frames (scoring's step, then what it calls) and by its innermost line.
    Large arrays are mmap'd and unmapped when freed, so RSS follows the live arrays. Past `limit` MiB
    it prints what it has and ends the process (exit status 3): a guard for a shared machine."""

    def __init__(self, every: float = 0.01, limit: float = float("inf")):
        import threading

        self.every, self.limit, self.outer, self.inner = every, limit, {}, {}
        self.main, self.stop = threading.main_thread().ident, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _frames(self) -> list[str]:
        """The main thread's leakpipe frames, innermost first, as module.function:line."""
        frame, names = sys._current_frames().get(self.main), []
        while frame is not None:
            mod = frame.f_globals.get("__name__", "")
            if mod.startswith("leakpipe."):
                names.append(f"{mod.rsplit('.', 1)[-1]}.{frame.f_code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return names

    def _run(self):
        while not self.stop.wait(self.every):
            rss, names = self.rss_mib(), self._frames()
            outer = " > ".join(n.split(":")[0] for n in names[::-1][1:4]) or "(outside leakpipe)"
            for table, key in ((self.outer, outer), (self.inner, names[0] if names else outer)):
                lo, hi, k = table.get(key, (rss, rss, 0))
                table[key] = (min(lo, rss), max(hi, rss), k + 1)
            if rss > self.limit:
                print(f"{self.report()}\nRSS {rss:.0f} MiB, above the limit {self.limit:.0f}", file=sys.stderr)
                os._exit(3)

    def __enter__(self):
        self.base = self.rss_mib()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def report(self, top: int = 12) -> str:
        def rows(table):
            return [f"  {lo:7.0f} {hi:7.0f} {k * self.every:7.2f} s  {p}" for p, (lo, hi, k) in table]

        inner = sorted(self.inner.items(), key=lambda kv: -kv[1][1])[:top]
        return "\n".join(
            [f"RSS before evaluate: {self.base:.0f} MiB. By step (lowest, highest MiB; seconds sampled):"]
            + rows(self.outer.items())
            + ["By innermost line, highest first:"]
            + rows(inner)
        )


def score_only(n_test: int, n_boot: int, kde_cap: int, profile: bool = False, dump: str = "") -> None:
    """Runs in its own process (the parent takes its peak RSS): stage three's numbers,
    `report.scoring.evaluate`, on synthetic embeddings; without the pixel baselines (they read images).
    `profile`: an RssProfile of the run to stderr; `dump`: the whole metrics dict to that JSON file
    (facts carry its digest either way, so that two runs can be compared number for number)."""
    import contextlib
    import dataclasses
    import hashlib

    from leakpipe.pipeline.config import Config
    from leakpipe.pipeline.report import scoring

    reader = SyntheticReader(n_test)
    base = Config()
    score = dataclasses.replace(
        base.score, bootstrap=n_boot, kde_max_reference=kde_cap, baselines=False, postprocessed=[]
    )
    cfg = dataclasses.replace(base, score=score)
    start = time.perf_counter()
    limit = float(os.environ.get("LEAKPIPE_SCALE_RSS_LIMIT_MIB", "inf"))
    with RssProfile(limit=limit) if profile else contextlib.nullcontext() as prof:
        m, _ = scoring.evaluate(reader, cfg, ["closed", "open"], [])
    if prof is not None:
        print(prof.report(), file=sys.stderr, flush=True)
    text = json.dumps(m, sort_keys=True, default=lambda x: np.asarray(x).tolist())
    if dump:
        Path(dump).write_text(text)
    head, off = m["closed"]["raw"]["head"], m["open"]["gating_off"]
    facts = {"seconds": time.perf_counter() - start, "top1": head["top1"], "top1_ci": head.get("ci", {}).get("top1")}
    facts.update({k: off[k] for k in ("auroc", "ovl")}, ovl_ci=off.get("ci", {}).get("ovl"))
    facts["metrics_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(json.dumps(facts))


def score(python: str, n_test: int, n_boot: int, kde_cap: int, timeout: float, extra=()) -> tuple:
    """(wall seconds, peak RSS MiB, CPU seconds, facts, what the run wrote before its facts) of one
    score run in its own process; `extra`: --score-profile, --score-dump."""
    cmd = [
        python,
        __file__,
        "--score-only",
        str(n_test),
        "--score-bootstrap",
        str(n_boot),
        "--score-kde-cap",
        str(kde_cap),
        *extra,
    ]
    seconds, rss, out, cpu = timed(cmd, Path.cwd(), timeout)
    if seconds == float("inf"):
        return seconds, rss, cpu, {}, out
    *before, last = out.strip().splitlines()
    return seconds, rss, cpu, json.loads(last), "\n".join(before)


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


def ovl_error(sizes=(2000, 20000), n_boot: int = 30) -> str:
    """OVL from binned kernels (above metrics.EXACT_ROWS rows) against every kernel summed, on the test
    suite's known mixtures: the estimate, the resamples and the basic interval's ends."""
    from scipy import stats

    from leakpipe.pipeline.math import bootstrap, metrics

    cases = {
        "narrow mode inside a wide mixture": (
            lambda r, n: r.normal(-100, 2, n),
            lambda r, n: np.where(r.random(n) < 0.1, r.normal(-100, 2, n), r.normal(-250, 50, n)),
        ),
        "heavy tails (t, 2 dof)": (
            lambda r, n: stats.t.rvs(2, size=n, random_state=r),
            lambda r, n: stats.t.rvs(2, loc=3, size=n, random_state=r),
        ),
        "bimodal against unimodal": (
            lambda r, n: np.where(r.random(n) < 0.5, r.normal(-3, 0.5, n), r.normal(3, 0.5, n)),
            lambda r, n: r.normal(0, 2, n),
        ),
        "shifted normals": (lambda r, n: r.normal(0, 1, n), lambda r, n: r.normal(2, 1, n)),
        "scores rounded to 0.1 (ties)": (
            lambda r, n: np.round(r.normal(0, 1, n), 1),
            lambda r, n: np.round(r.normal(1, 1, n), 1),
        ),
    }
    out = [
        f"| case | rows (each side) | exact OVL | binned - exact | max abs over {n_boot} resamples | interval ends, "
        "binned - exact | seconds exact / binned |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for n in sizes:
        for name, (fa, fb) in cases.items():
            r = np.random.default_rng(0)
            a, b = fa(r, n), fb(r, n)
            w = np.r_[metrics.unit(2 * n), bootstrap.weights(2 * n, n_boot, 1)]
            t0 = time.perf_counter()
            e = metrics.ovl(a, b, w, metrics.ovl_kernels(a, b, binned=False))
            t1 = time.perf_counter()
            g = metrics.ovl(a, b, w, metrics.ovl_kernels(a, b, binned=True))
            t2 = time.perf_counter()
            ie, ig = bootstrap.basic_interval(e[0], e[1:]), bootstrap.basic_interval(g[0], g[1:])
            out.append(
                f"| {name} | {n:,} | {e[0]:.4f} | {g[0] - e[0]:+.1e} | {np.abs(g - e).max():.1e} | "
                f"{ig[0] - ie[0]:+.1e}, {ig[1] - ie[1]:+.1e} | {t1 - t0:.1f} / {t2 - t1:.1f} |"
            )
            print(out[-1], file=sys.stderr)
    return "\n".join(out)


# ---------------------------------------------------------------- tables
CMDS = (
    "manifest build",
    "first encode",
    "no-op encode",
    "status",
    "verify",
    "added, rows stay",
    "added, rows move",
    "first encode, tiny VAE",
)


def cell(v, base=None) -> str:
    if v is None:
        return "-"
    text = f"{v[0]:.2f} s ({v[2]:.2f} cpu), {v[1]:.0f} MiB"
    return text + (f", {v[0] / base[0]:.2f}x" if base else "")


def tables(rows: list[dict], tags: list[str]) -> str:
    head = "| command | " + " | ".join(f"{t}, {r['rows']:,} rows" for r in rows for t in tags) + " |"
    out = [head, "|---|" + "---:|" * (len(rows) * len(tags))]
    for cmd in CMDS:
        cells = []
        for r in rows:
            for t in tags:
                before = r.get("before", {}).get(cmd) if t == "after" and "before" in r else None
                cells.append(cell(r[t].get(cmd), before))
        out.append(f"| {cmd} | " + " | ".join(cells) + " |")
    for key in ("store MiB", "hash cache MiB", "lock MiB", "lock's rows MiB"):
        out.append(f"| {key} on disk | " + " | ".join(f"{r[t]['disk'][key]:.1f}" for r in rows for t in tags) + " |")
    out.append("")
    out.append(
        "(x): after / before, in the same run. Stat floor (best of 3): "
        + "; ".join(f"{r['rows']:,}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["floor"].items()) for r in rows)
    )
    for r in rows:
        if "upgrade" in r:
            u = r["upgrade"]
            out.append(
                f"Upgrade at {r['rows']:,} rows (the earlier checkout's workspace, read by this one): first "
                f"encode {cell(u['first encode after'])} (up to date, nothing encoded), the no-op after it "
                f"{cell(u['no-op after'])}"
            )
    return "\n".join(out)


def goals(rows: list[dict], tag: str) -> str:
    by, out = {r["rows"]: r for r in rows}, []
    if 1000 in by and 100000 in by:
        for cmd in ("no-op encode", "status"):
            ratio = by[100000][tag][cmd][0] / by[1000][tag][cmd][0]
            out.append(f"- {cmd} at 100 k / 1 k: {ratio:.2f}x (goal <= 2x): {'met' if ratio <= 2 else 'MISSED'}")
    for n, r in sorted(by.items()):
        for cmd in ("no-op encode", "status"):
            ratio = r[tag][cmd][0] / r["floor"]["floor"]
            out.append(
                f"- {cmd} at {n:,}: {r[tag][cmd][0]:.2f} s = {ratio:.2f}x the stat floor ({r['floor']['floor']:.2f} s; "
                f"goal <= 1.5x at 1 M): {'met' if ratio <= 1.5 else 'MISSED'}"
            )
        rate = n / r[tag]["first encode"][0]
        out.append(f"- first encode (null encoder) at {n:,}: {rate:,.0f} rows/s (goal >= 20,000 at 1 M)")
    return "\n".join(out)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--vae-sizes", default="1000,100000,1000000", help="sizes also encoded with the tiny VAE")
    ap.add_argument("--baseline", help="the python of an earlier checkout, measured beside this one")
    ap.add_argument("--workdir", type=Path, help="where the images and workspaces go [a new temporary folder]")
    ap.add_argument("--score-rows", default="", help="closed test rows of the score runs, e.g. 100000,1000000")
    ap.add_argument("--score-bootstrap", default="0,1000", help="score.bootstrap values to run score with")
    ap.add_argument("--score-timeout", type=float, default=1800, help="seconds a score run may take")
    ap.add_argument(
        "--score-kde-cap",
        type=int,
        default=2000,
        help="score.kde_max_reference of the score run: the KDE's time is (test + open rows) x cap "
        "plus 13 x cap^2 for its bandwidth, whatever the training set",
    )
    ap.add_argument("--ovl-error", action="store_true", help="only measure binned OVL against the exact one")
    ap.add_argument("--kde-error", action="store_true", help="only measure the capped KDE against the exact one")
    ap.add_argument("--score-profile", action="store_true", help="print where each score run's memory goes")
    ap.add_argument("--score-dump", help="write each score run's whole metrics to DIR/score-ROWS-BOOT-TAG.json")
    ap.add_argument("--score-only", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (the images are kept in --workdir)")
    a = ap.parse_args()
    if a.score_only:
        return score_only(a.score_only, int(a.score_bootstrap), a.score_kde_cap, a.score_profile, a.score_dump or "")
    if a.kde_error:
        return print(kde_cap_error())
    if a.ovl_error:
        return print(ovl_error())
    import torch

    root = a.workdir or Path(tempfile.mkdtemp(prefix="leakpipe-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    pythons = {**({"before": a.baseline} if a.baseline else {}), "after": sys.executable}
    print(
        f"# {machine()}, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start "
        f"({time.strftime('%Y-%m-%d %H:%M')}); workspaces in {root}"
    )
    rows = []
    for n in (int(s) for s in a.sizes.split(",") if s):
        rows.append(one_size(root, n, pythons, {int(s) for s in a.vae_sizes.split(",") if s}))
        print(f"  load average {os.getloadavg()[0]:.1f} after {n:,} rows", file=sys.stderr)
        if not a.keep:
            for p in root.glob(f"ws-*-{n}*"):
                shutil.rmtree(p, ignore_errors=True)
    if rows:
        print(tables(rows, list(pythons)) + "\n\n" + goals(rows, "after"))
    for n_test in (int(s) for s in a.score_rows.split(",") if s):
        for n_boot in (int(b) for b in a.score_bootstrap.split(",") if b):
            for tag, python in pythons.items():
                extra = ["--score-profile"] if a.score_profile else []
                if a.score_dump:
                    Path(a.score_dump).mkdir(parents=True, exist_ok=True)
                    extra += ["--score-dump", str(Path(a.score_dump, f"score-{n_test}-{n_boot}-{tag}.json"))]
                seconds, rss, cpu, facts, said = score(python, n_test, n_boot, a.score_kde_cap, a.score_timeout, extra)
                if a.score_profile and said:
                    print(said, flush=True)
                print(
                    f"- score ({tag}), {n_test:,} closed test rows, score.bootstrap = {n_boot}, kde cap "
                    f"{a.score_kde_cap}: {seconds:.1f} s ({cpu:.1f} s cpu), peak RSS {rss:.0f} MiB; {json.dumps(facts)}"
                    + (f" (did not finish in {a.score_timeout:.0f} s)" if seconds == float("inf") else "")
                    + f"; load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
