"""Issue 34's adversarial probes, repeated on a tiny scored workspace: each tries to lose data, to use
damaged bytes, or to lock a user out, and says whether leakpipe held.

    python benchmarks/redteam.py [--keep DIR]

The workspace (3 generators x 16 images of 32 px and 2 unseen, the tiny random VAE, 1 epoch) is
built once; every probe works on its own copy. A probe is a *defect* if leakpipe broke a promise
(damaged bytes used or vouched for, data lost, a user locked out, a wrong number with exit 0) and
*weak* if the answer was right but unclear or incomplete; the issue's 5 defects and 11 weak items are
among them, tagged with their number. Probes that need an unprivileged user run through `setpriv`
as uid 65534 (root only) and are skipped otherwise. Prints one line per probe and the counts for
benchmarks/RESULTS.md; exits 1 if any probe broke.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from click.testing import CliRunner
from PIL import Image

from leakpipe.pipeline.cli import main
from leakpipe.pipeline.engine.attributor import record_checksum

# the smallest training and scoring that exercise every file: 1 epoch, no bootstrap, no baselines
FAST = {
    "train.epochs": 1,
    "model.embed_dim": 8,
    "model.prototypes_per_class": 1,
    "train.batch_size": 16,
    "score.kde_folds": 2,
    "score.postprocessed": "",
    "score.bootstrap": 0,
    "score.baselines": "false",
}
SETS = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class Skip(Exception):
    pass


@dataclass
class Probe:
    name: str
    kind: str  # what breaking it would be: "defect" or "weak"
    issue: str  # "D2", "W7": the issue's item it repeats, or "" for one that held before
    run: Callable[["Lab"], str | None]  # None: held; else what broke


def leakpipe(ws: Path | None, *args: str, cwd: Path | None = None):
    """`leakpipe ARGS [-C ws]` in-process, as a user runs it: (exit code, output)."""
    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [*args, *(["-C", str(ws)] if ws else [])])
    finally:
        os.chdir(here)
    return r.exit_code, r.output


def as_nobody(ws: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        raise Skip("needs root and setpriv")
    code = "from leakpipe.pipeline.cli import main; main()"
    env = {**os.environ, "HOME": str(cwd), "MPLCONFIGDIR": str(cwd)}
    return subprocess.run(
        [*NOBODY, sys.executable, "-c", code, *args, "-C", str(ws)], capture_output=True, text=True, env=env, cwd=cwd
    )


def flip(path: Path, at: int = -1, keep_stat: bool = True) -> None:
    """One byte flipped; with `keep_stat` the size and mtime stay (bit rot)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class Lab:
    """The scored workspace and its export, and a fresh copy of either for each probe."""

    def __init__(self, top: Path):
        self.top, self.n = top, 0
        self.base = self._build(top / "base")
        self.export = top / "export"
        self.ok(self.base, "export", str(self.export), *SETS)

    def _build(self, root: Path) -> Path:
        from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
        from leakpipe.pipeline.engine.vae import save_random_vae

        write_benchmark(root / "data", root / "manifests", SynthSpec(3, 2, 16, 32, 0.1, 0, ()), workers=1)
        save_random_vae(root / "vae", (8, 16), seed=0)
        (root / "leakpipe.toml").write_text(
            '[vae]\nsource = "./vae"\n[preprocess]\nsize = 32\n[encode]\nnum_workers = 0\n'
            '[store]\nchunk_rows = 8\n[model]\nstem = "imagenet"\n'
        )
        for args in (["encode", "--split", "closed", "--split", "open"], ["train", *SETS], ["score", *SETS]):
            self.ok(root, *args)
        return root

    def ok(self, ws, *args, cwd=None) -> str:
        code, out = leakpipe(ws, *args, cwd=cwd)
        if code != 0:
            raise AssertionError(f"leakpipe {' '.join(args)} exited {code}:\n{out}")
        return out

    def copy(self, what: str = "base") -> Path:
        self.n += 1
        dest = self.top / f"{what}-{self.n}"
        shutil.copytree(self.base if what == "base" else self.export, dest, symlinks=True)
        return dest

    def store(self, ws: Path, split: str = "closed") -> Path:
        return next((ws / "cache" / "latents" / split).glob("*.zarr"))

    def result(self, ws: Path) -> Path:
        return (ws / "cache" / "runs" / "default").resolve()

    def image(self, ws: Path) -> str:
        from leakpipe.pipeline.manifest import read_manifest

        m = read_manifest(ws / "manifests" / "closed.csv")
        return str(m.abspath(m.column("partition").index("test")))


def chunk_file(store: Path, array: str, k: int) -> Path:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[k]


# ---------------------------------------------------------------- latents and the hash cache
def bit_rot(array: str, k: int):
    def probe(lab: Lab) -> str | None:
        ws = lab.copy()
        flip(chunk_file(lab.store(ws), array, k), 10)
        code, out = leakpipe(ws, "verify")
        if code == 0:
            return "verify passed a flipped chunk"
        if "rows damaged" not in leakpipe(ws, "status")[1]:
            return "status does not say rows are damaged after verify found them"
        out = lab.ok(ws, "encode", "--split", "closed")
        if "damaged and re-encoded" not in out and "encoded" not in out:
            return f"encode did not repair: {out}"
        return None if leakpipe(ws, "verify")[0] == 0 else "verify still fails after encode"

    return probe


def chunk_removed(lab: Lab) -> str | None:
    ws = lab.copy()
    chunk_file(lab.store(ws), "mean", 2).unlink()
    if "output missing" not in lab.ok(ws, "status"):
        return "status does not see a missing chunk"
    return None if "8 rows damaged and re-encoded" in lab.ok(ws, "encode", "--split", "closed") else "not repaired"


def encode_verify(lab: Lab) -> str | None:
    ws = lab.copy()
    flip(chunk_file(lab.store(ws), "logvar", 3), 10)
    out = lab.ok(ws, "encode", "--split", "closed", "--verify")
    return None if "8 rows damaged and re-encoded" in out else f"encode --verify did not repair: {out}"


def hash_cache_garbage(lab: Lab) -> str | None:
    ws = lab.copy()
    (ws / "cache" / "file-hashes.sqlite").write_bytes(b"not a database" * 100)
    for side in ("-wal", "-shm"):
        Path(f"{ws / 'cache' / 'file-hashes.sqlite'}{side}").unlink(missing_ok=True)
    code, out = leakpipe(ws, "status")
    return None if code == 0 and "set aside" in out else f"a damaged hash cache: {out[-300:]}"


def image_changed_in_place(lab: Lab) -> str | None:
    ws = lab.copy()
    image = Path(lab.image(ws))
    hour_ago = image.stat().st_mtime_ns - 3600 * 10**9  # past the hash cache's racy window
    os.utime(image, ns=(hour_ago, hour_ago))
    lab.ok(ws, "encode", "--split", "closed")
    flip(image, -1)  # the IEND chunk's CRC: same size, mtime and pixels
    if "up to date" not in leakpipe(ws, "encode", "--split", "closed")[1]:
        return "the stat test saw it (unexpected)"
    code, out = leakpipe(ws, "verify", "--contents")
    if code == 0 or "changed in place" not in out:
        return "verify --contents did not find an image changed in place"
    return None if "1 file changed" in lab.ok(ws, "status") else "status does not show the change afterwards"


def stale_shm(lab: Lab) -> str | None:
    top = Path(tempfile.mkdtemp(prefix="redteam-shm-"))
    try:
        ws = top / "ws"
        shutil.copytree(lab.base, ws, symlinks=True)
        db = ws / "cache" / "file-hashes.sqlite"
        for side in ("-wal", "-shm"):
            Path(f"{db}{side}").unlink(missing_ok=True)
        subprocess.run(["chown", "-R", "65534:65534", str(top)], check=True)
        db.chmod(0o444)
        as_nobody(ws, "status", cwd=top)
        shm = Path(f"{db}-shm")
        if not shm.exists():
            shm.write_bytes(b"")
            os.chown(shm, 65534, 65534)
        shm.chmod(0o444)
        db.chmod(0o644)
        r = as_nobody(ws, "status", cwd=top)
        return None if r.returncode == 0 and "not writable" not in r.stderr else f"still read-only: {r.stderr[-300:]}"
    finally:
        shutil.rmtree(top)


# ---------------------------------------------------------------- results, runs, gc, kills
def metrics_same_size(lab: Lab) -> str | None:
    ws = lab.copy()
    path = lab.result(ws) / "metrics.json"
    i = path.read_text().index('"top1": 0.') + len('"top1": 0.')
    flip(path, i)
    if "STALE" not in [ln for ln in lab.ok(ws, "status", *SETS).splitlines() if ln.startswith("score")][0]:
        return "status says score is up to date"
    if leakpipe(ws, "export", str(ws / "e"), *SETS)[0] == 0 or leakpipe(ws, "attribute", lab.image(ws), *SETS)[0] == 0:
        return "export or attribute used the edited metrics"
    return None


def model_flipped(lab: Lab) -> str | None:
    ws = lab.copy()
    flip(lab.result(ws) / "model.safetensors", 4000)
    code, out = leakpipe(ws, "verify")
    if code == 0 or "leakpipe train --run default" not in out:
        return "verify did not name the damaged model and the command that retrains it"
    return None if leakpipe(ws, "attribute", lab.image(ws), *SETS)[0] != 0 else "attribute used a damaged model"


def embeddings_flipped(lab: Lab) -> str | None:
    ws = lab.copy()
    emb = lab.result(ws) / "embeddings" / "closed.zarr"
    flip(sorted(p for p in emb.rglob("*") if p.is_file() and "/c/" in str(p))[0], 10)
    if leakpipe(ws, "export", str(ws / "e"), *SETS)[0] == 0:
        return "export used damaged embeddings"
    lab.ok(ws, "score", *SETS)
    return None if leakpipe(ws, "verify")[0] == 0 else "score did not embed again"


KILLER = """
import os, signal, sys
target, seen, real = int(sys.argv[1]), [0], os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith("checkpoint.safetensors"):
        seen[0] += 1
        if seen[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from leakpipe.pipeline.cli import main
main(sys.argv[2:])
"""


def killed_in_epoch_4_of_5(lab: Lab) -> str | None:
    """Kept by gc, listed by runs, resumed after epoch 3, equal byte for byte to an uninterrupted run."""
    sets = [*SETS, "--set", "train.epochs=5", "--set", "model.embed_dim=4"]
    ws, ref = lab.copy(), lab.copy()
    lab.ok(ref, "train", *sets)
    r = subprocess.run([sys.executable, "-c", KILLER, "4", "train", *sets, "-C", str(ws)], capture_output=True)
    if r.returncode != -signal.SIGKILL:
        return f"not killed ({r.returncode})"
    if "interrupted after epoch 3 of 5, resumes" not in lab.ok(ws, "runs", *sets):
        return "runs does not list the interrupted training as resumable"
    lab.ok(ws, "gc", *sets)
    if "(resumed after epoch 3)" not in lab.ok(ws, "train", *sets):
        return "gc removed it, or train did not resume it"
    same = all(
        (lab.result(ws) / n).read_bytes() == (lab.result(ref) / n).read_bytes()
        for n in ("model.safetensors", "history.json")
    )
    return None if same else "the resumed training differs from the uninterrupted one"


# ---------------------------------------------------------------- exports and attribute --model
def resigned(edit: Callable[[dict], None], says: str):
    def probe(lab: Lab) -> str | None:
        att = lab.copy("export")
        record = json.loads((att / "attributor.json").read_text())
        edit(record)
        record["checksum"] = record_checksum(record)
        (att / "attributor.json").write_text(json.dumps(record))
        code, out = leakpipe(None, "attribute", "--model", str(att), lab.image(lab.base), "--json")
        if code == 0:
            return f"accepted (exit 0): {out[:200]}"
        return None if says in out else f"refused without the reason ({says!r}): {out[-300:]}"

    return probe


def at(*keys, value):
    def edit(record):
        for k in keys[:-1]:
            record = record[k]
        record[keys[-1]] = value

    return edit


def file_tampered(name: str, how: str):
    def probe(lab: Lab) -> str | None:
        att = lab.copy("export")
        if how == "append":
            with open(att / name, "a") as fh:
                fh.write("\n# edited\n")
        elif how == "flip":
            flip(att / name, 100)
        else:
            (att / name).unlink()
        code, out = leakpipe(None, "attribute", "--model", str(att), lab.image(lab.base))
        return None if code != 0 and name in out else f"{name} {how}: used ({code})"

    return probe


def too_few_validation_images(lab: Lab) -> str | None:
    ws = lab.copy()
    sets = [*SETS, "--set", "score.alpha=0.01"]
    lab.ok(ws, "score", *sets)
    lab.ok(ws, "export", str(ws / "att"), *sets)
    code, out = leakpipe(None, "attribute", "--model", str(ws / "att"), lab.image(ws), "--json")
    if code != 0:
        return f"its export is refused: {out[-300:]}"
    return None if len(json.loads(out)[0]["prediction_set"]) == 3 else "the +inf thresholds were not applied"


def no_cache_where_run(lab: Lab) -> str | None:
    here = lab.top / f"elsewhere-{lab.n}"
    here.mkdir()
    lab.ok(None, "attribute", "--model", str(lab.export), lab.image(lab.base), cwd=here)
    return None if not list(here.iterdir()) else f"wrote {[p.name for p in here.iterdir()]} where it was run"


def modes(mask: int):
    def probe(lab: Lab) -> str | None:
        old = os.umask(mask)
        try:
            dest = lab.top / f"umask-{mask:03o}"
            lab.ok(lab.base, "export", str(dest), *SETS)
        finally:
            os.umask(old)
        wrong = [
            p.name for p in dest.iterdir() if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~mask and not p.is_symlink()
        ]
        return None if not wrong else f"not {0o666 & ~mask:o}: {wrong}"

    return probe


def another_user_reads(lab: Lab) -> str | None:
    """A colleague (uid 65534) attributes with an export and reads a workspace made read-only."""
    top = Path(tempfile.mkdtemp(prefix="redteam-ro-"))
    try:
        ws = top / "ws"
        shutil.copytree(lab.base, ws, symlinks=True)
        shutil.copytree(lab.export, top / "att", symlinks=True)
        (top / "home").mkdir()
        subprocess.run(["chmod", "755", str(top), str(ws)], check=True)
        subprocess.run(["chmod", "777", str(top / "home")], check=True)
        subprocess.run(["chmod", "-R", "a-w", str(ws / "cache"), str(ws / "manifests")], check=True)
        image = lab.image(ws)
        for args in (
            ["attribute", "--model", str(top / "att"), image],
            ["status", *SETS],
            ["verify"],
            ["encode", "--split", "closed"],
            ["attribute", image, *SETS],
            ["export", str(top / "home" / "e"), *SETS],
        ):
            r = as_nobody(ws, *args, cwd=top / "home")
            if r.returncode != 0:
                return f"{args[0]}: {r.stderr[-300:]}"
        return None
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(top)], check=True)
        shutil.rmtree(top)


# ---------------------------------------------------------------- inputs
def folder_in_manifest(lab: Lab) -> str | None:
    ws = lab.copy()
    (ws / "data" / "closed" / "closed00" / "dir.png").mkdir()
    rows = (ws / "manifests" / "closed.csv").read_text().splitlines()
    src = rows[3].split(",")[0]
    (ws / "manifests" / "closed.csv").write_text("\n".join([*rows, rows[3].replace(src, "closed00/dir.png", 1)]))
    code, out = leakpipe(ws, "encode", "--split", "closed")
    return None if code != 0 and "a folder, not an image file" in out else f"said: {out[-200:]}"


def empty_split(lab: Lab) -> str | None:
    """A manifest with its header and no rows (every row removed by hand)."""
    ws = lab.copy()
    header_only = "# leakpipe manifest v1\n# root: ../data\npath,label,partition,variant\n"
    (ws / "manifests" / "nothing.csv").write_text(header_only)
    out = lab.ok(ws, "encode", "--split", "nothing")
    return None if "the split is empty" in out else f"encode said: {out}"


def sixteen_bit(lab: Lab) -> str | None:
    grey = np.asarray(Image.open(lab.image(lab.base)).convert("L"), np.uint16) * 257
    path = lab.top / "deep.png"
    Image.fromarray(grey).save(path)  # uint16: Pillow's I;16
    out = lab.ok(lab.base, "attribute", str(path), *SETS)
    return None if "16-bit greyscale scaled to 8 bits" in out else "no note of the conversion to 8 bits"


def empty_image(lab: Lab) -> str | None:
    path = lab.top / "empty.png"
    path.write_bytes(b"")
    code, out = leakpipe(lab.base, "attribute", str(path), *SETS)
    return None if code != 0 and "empty file (0 bytes)" in out else f"said: {out[-200:]}"


# ---------------------------------------------------------------- the web app
def app_page(lab: Lab):
    from leakpipe.workflows import app

    return app.load(str(lab.export), log=lambda msg: None)


def app_bounds_decoded_size(lab: Lab) -> str | None:
    from leakpipe.workflows.app import analyse

    path = lab.top / "huge.png"
    Image.new("L", (9000, 9000)).save(path)
    status = analyse(app_page(lab), [str(path)])[0]
    return None if "more than this page decodes" in status else f"decoded: {status[:200]}"


def app_path_refusal_is_one_line(lab: Lab) -> str | None:
    import contextlib
    import io

    from leakpipe.workflows.app import _gradio

    _gradio()
    import gradio.queueing
    from gradio.exceptions import InvalidPathError

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            raise InvalidPathError("Cannot move /etc/hostname to the gradio cache dir")
        except InvalidPathError:
            gradio.queueing.traceback.print_exc()
    text = err.getvalue()
    return None if "/etc/hostname" not in text and "Traceback" not in text else f"logged: {text[:200]}"


PROBES = [
    Probe(
        "latent chunk (mean) flipped in place, mtime kept: verify, status, encode", "defect", "D2", bit_rot("mean", 1)
    ),
    Probe("latent chunk (logvar) flipped in place: verify, status, encode", "defect", "D2", bit_rot("logvar", 2)),
    Probe("source_hash chunk flipped in place: verify, status, encode", "defect", "D2", bit_rot("source_hash", 0)),
    Probe("latent_hash chunk flipped in place: verify, status, encode", "defect", "D2", bit_rot("latent_hash", 4)),
    Probe("latent chunk flipped: encode --verify repairs in one command", "defect", "D2", encode_verify),
    Probe("latent chunk deleted: status sees it, encode repairs", "defect", "", chunk_removed),
    Probe("file-hashes.sqlite overwritten with garbage: set aside and rebuilt", "defect", "", hash_cache_garbage),
    Probe("image changed in place, stat kept: verify --contents", "weak", "W1", image_changed_in_place),
    Probe("leftover 0444 -shm after a read-only run (uid 65534)", "weak", "W2", stale_shm),
    Probe("metrics.json same-size edit: status, export, attribute agree", "weak", "W4", metrics_same_size),
    Probe("model.safetensors flipped: verify names it and the command", "weak", "", model_flipped),
    Probe("embeddings chunk flipped: export refuses, score embeds again", "defect", "", embeddings_flipped),
    Probe("train killed in epoch 4 of 5: gc keeps, runs says, resumes bitwise", "defect", "D5", killed_in_epoch_4_of_5),
    Probe(
        "temperature 1e-320 (checksum recomputed)",
        "defect",
        "D3",
        resigned(at("decisions", "calibration", "temperature", value=1e-320), "temperature = 1e-320"),
    ),
    Probe(
        "temperature -1",
        "defect",
        "",
        resigned(at("decisions", "calibration", "temperature", value=-1.0), "temperature"),
    ),
    Probe(
        "unseen_threshold.alpha = 1.5",
        "weak",
        "W6",
        resigned(at("unseen_threshold", "alpha", value=1.5), "unseen_threshold.alpha = 1.5"),
    ),
    Probe("p_min = 0.99", "weak", "W6", resigned(at("unseen_threshold", "p_min", value=0.99), "p_min = 0.99")),
    Probe(
        "conformal.level = 0.5 beside alpha = 0.1",
        "weak",
        "W6",
        resigned(at("decisions", "conformal", "level", value=0.5), "level = 0.5"),
    ),
    Probe(
        'mondrian = "yes"',
        "weak",
        "W6",
        resigned(at("decisions", "conformal", "mondrian", value="yes"), "mondrian = 'yes'"),
    ),
    Probe(
        "encoder.preprocess.size changed",
        "weak",
        "W6",
        resigned(at("encoder", "preprocess", "size", value=64), "encoder.preprocess.size = 64"),
    ),
    Probe(
        "encoder.preprocess.max_pixels changed",
        "weak",
        "W6",
        resigned(at("encoder", "preprocess", "max_pixels", value=10), "encoder.preprocess.max_pixels = 10"),
    ),
    Probe("score.maha_shared = 7", "weak", "W6", resigned(at("score", "maha_shared", value=7), "score.maha_shared")),
    Probe(
        "unseen bandwidth NaN",
        "defect",
        "",
        resigned(at("unseen_threshold", "bandwidth", value=math.nan), "bandwidth = nan"),
    ),
    Probe(
        "conformal thresholds of the wrong count",
        "defect",
        "",
        resigned(at("decisions", "conformal", "thresholds", value=[0.5, 0.5]), "one per class"),
    ),
    Probe(
        "log-density cut not the one the validation scores give",
        "weak",
        "",
        resigned(at("unseen_threshold", "log_density_threshold", value=-1.0), "log_density_threshold = -1.0"),
    ),
    Probe(
        "export of a run with too few validation images (+inf thresholds)", "defect", "D4", too_few_validation_images
    ),
    Probe("export's app.py edited", "weak", "W5", file_tampered("app.py", "append")),
    Probe("export's README.md edited", "weak", "W5", file_tampered("README.md", "append")),
    Probe("export's requirements.txt edited", "weak", "W5", file_tampered("requirements.txt", "append")),
    Probe("export's model.safetensors flipped", "defect", "", file_tampered("model.safetensors", "flip")),
    Probe("export's reference.safetensors removed", "defect", "", file_tampered("reference.safetensors", "remove")),
    Probe("export's calibration.safetensors flipped", "defect", "", file_tampered("calibration.safetensors", "flip")),
    Probe("attribute --model outside a workspace writes nothing there", "weak", "W3", no_cache_where_run),
    Probe("export under umask 022: every file 0644", "defect", "D1", modes(0o022)),
    Probe("export under umask 077: every file 0600", "defect", "D1", modes(0o077)),
    Probe("another user: attribute --model, and a read-only workspace", "defect", "D1", another_user_reads),
    Probe("a folder in place of an image in a manifest", "weak", "W9", folder_in_manifest),
    Probe("an empty split", "weak", "W10", empty_split),
    Probe("a 16-bit greyscale PNG", "weak", "W8", sixteen_bit),
    Probe("an empty image file", "weak", "", empty_image),
    Probe("app: a 9000 x 9000 upload", "weak", "W11", app_bounds_decoded_size),
    Probe('app: a crafted {"path": "/etc/hostname"} is one log line', "weak", "W7", app_path_refusal_is_one_line),
]


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="Build the workspace here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    top = args.keep or Path(tempfile.mkdtemp(prefix="leakpipe-redteam-"))
    top.mkdir(parents=True, exist_ok=True)
    os.chmod(top, 0o755)
    start = time.perf_counter()
    lab = Lab(top)
    print(f"workspace built in {time.perf_counter() - start:.0f} s at {top}")
    counts = {"held": 0, "defect": 0, "weak": 0, "skipped": 0}
    for probe in PROBES:
        t = time.perf_counter()
        try:
            broke = probe.run(lab)
        except Skip as exc:
            counts["skipped"] += 1
            print(f"SKIP   {probe.name} ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 -- a crash is a broken promise too
            broke = f"{type(exc).__name__}: {str(exc)[-300:]}"
        counts["held" if broke is None else probe.kind] += 1
        verdict = "held" if broke is None else probe.kind.upper()
        tag = f" [{probe.issue}]" if probe.issue else ""
        print(f"{verdict:<6} {probe.name}{tag} ({time.perf_counter() - t:.0f} s)" + (f": {broke}" if broke else ""))
    tried = len(PROBES) - counts["skipped"]
    print(
        f"\n{tried} probes tried ({counts['skipped']} skipped): {counts['held']} held, {counts['defect']} defects, "
        f"{counts['weak']} weak; {time.perf_counter() - start:.0f} s"
    )
    if not args.keep:
        shutil.rmtree(top, ignore_errors=True)
    return 1 if counts["defect"] or counts["weak"] else 0


if __name__ == "__main__":
    sys.exit(main_())
