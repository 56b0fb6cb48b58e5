import os

# `pytest -n N` (pytest-xdist, the README's test command): N worker processes share the machine's cores, so
# each runs torch, and the subprocesses its tests start, on one thread instead of every worker on all of them
# (set before torch is imported; tests that compare bitwise with a subprocess pass their thread count on)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import atexit
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from leakpipe.pipeline.cli import main
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.vae import save_random_vae

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

# 2 blocks: latents are 4 x size/2 x size/2; tiny and fast on CPU
TINY_BLOCKS = (8, 16)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return save_random_vae(tmp_path_factory.mktemp("vae") / "tiny", TINY_BLOCKS, seed=0)


# The tests train with the ImageNet stem: on their 8 x 8 and 16 x 16 latents the default small stem
# costs several times the compute. tests/test_recipe.py trains the default one through the stage.
CPU_STEM = '[model]\nstem = "imagenet"\n'
# The reconstruction baseline's round trips through TAEF2 run on every score; tests/test_score.py checks
# it, and the other workspaces leave it out to keep the suite fast
NO_RECONSTRUCTION = "[score]\nreconstruction = []\n"


_MADE: dict = {}  # made_once's folders in this process, by key


def made_once(key, make) -> Path:
    """The folder `make(folder)` writes, made once per test process (in a temporary folder removed at exit)
    for the test modules that start from a copy of it: writing a synthetic benchmark and a VAE, and encoding
    it, takes seconds; copying them, a tenth of one."""
    if key not in _MADE:
        folder = Path(tempfile.mkdtemp(prefix="leakpipe-tests-")) / "ws"
        atexit.register(shutil.rmtree, folder.parent, True)
        make(folder)
        _MADE[key] = folder
    return _MADE[key]


def _write_synth(root: Path, per_generator: int, n_open: int) -> None:
    from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark

    spec = SynthSpec(3, n_open, per_generator, 32, 0.1, 0, ())
    write_benchmark(root / "data", root / "manifests", spec, workers=1)
    save_random_vae(root / "vae", TINY_BLOCKS, seed=0)
    (root / "leakpipe.toml").write_text(
        '[vae]\nsource = "./vae"\n[preprocess]\nsize = 32\n'
        "[encode]\nnum_workers = 0\n[store]\nchunk_rows = 8\n" + CPU_STEM + NO_RECONSTRUCTION
    )


def synth_workspace(root: Path, per_generator: int = 16, n_open: int = 2) -> Path:
    """3 generators x 16 images of 32 px (strong fingerprints) plus 2 unseen, the tiny VAE at ./vae,
    chunks of 8 rows: the small workspace the provenance, integrity and fault tests start from (a copy
    of one written once per test process)."""
    made = made_once(("synth", per_generator, n_open), lambda f: _write_synth(f, per_generator, n_open))
    shutil.copytree(made, root, symlinks=True, dirs_exist_ok=True)
    return root


def _encoded_training_set(root: Path) -> None:
    from leakpipe.pipeline.bench.datasets import SynthSpec, write_benchmark
    from leakpipe.pipeline.workspace import Workspace
    from leakpipe.stages import encode, graph

    write_benchmark(root / "data", root / "manifests", SynthSpec(4, 2, 40, 32, 0.1, 0, ()), workers=2)
    save_random_vae(root / "vae", TINY_BLOCKS, seed=0)
    (root / "leakpipe.toml").write_text(
        '[vae]\nsource = "./vae"\n[preprocess]\nsize = 32\n[encode]\nnum_workers = 0\n'
        "[train]\nbatch_size = 16\npatience = 10\n" + CPU_STEM
    )
    ws = Workspace(root)
    for split in ("closed", "open"):
        encode.run(graph(ws, ws.config()), split, log=lambda m: None)


@pytest.fixture(scope="module")
def tws(tmp_path_factory):
    """4 generators x 40 images of 32 px with strong fingerprints (difficulty 0.1), encoded (once per test
    process, copied for each module): the workspace of the training and precision tests (tests/helpers.py
    trains runs of it)."""
    root = tmp_path_factory.mktemp("train-ws")
    shutil.copytree(made_once(("tws",), _encoded_training_set), root, symlinks=True, dirs_exist_ok=True)
    return root


def write_images(root: Path, labels=("a", "b"), n=6, size=(40, 48), seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = root / label / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
            out.append(p)
    return out


TOML = """[vae]
source = "{vae}"
[preprocess]
size = 32
[store]
chunk_rows = 4
[model]
stem = "imagenet"
[encode]
num_workers = 0
batch_size = 3
[score]
reconstruction = []
"""


@pytest.fixture
def ws(tmp_path, tiny_vae) -> Path:
    """A workspace with a tiny VAE, 2 generators x 6 images and the `closed` manifest built."""
    write_images(tmp_path / "data")
    (tmp_path / "leakpipe.toml").write_text(TOML.format(vae=tiny_vae))
    result = cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed")
    assert result.exit_code == 0, result.output
    return tmp_path


SLOWED = """
import sys, time, importlib
module, name, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
mod = importlib.import_module(module)
real = getattr(mod, name)
def slow(*a, **k):
    real(*a, **k)
    time.sleep(pause)
setattr(mod, name, slow)
exec(sys.argv[4])
"""


def kill_midway(slowed: str, pause: float, body: str, ready, timeout: float = 120) -> None:
    """Run `body` in a subprocess with `slowed` ("module.function") sleeping `pause` s after each
    call, SIGKILL it as soon as `ready()` is true, and check it was still running then."""
    module, name = slowed.rsplit(".", 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOWED, module, name, str(pause), body],
        cwd=os.getcwd(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the subprocess finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def cli(ws: Path, *args: str):
    """Run `leakpipe ARGS -C ws` in-process (every command takes -C)."""
    return CliRunner().invoke(main, [*args, "-C", str(ws)], catch_exceptions=False)


@pytest.fixture
def counting(monkeypatch):
    """Counts images passed through the VAE, to prove what was (not) encoded."""
    seen = {"images": 0, "loads": 0}
    real_load = vae_lib.load_vae

    def load(*a, **k):
        seen["loads"] += 1
        model = real_load(*a, **k)
        real_encode = model.encode

        def encode(x):
            seen["images"] += len(x)
            return real_encode(x)

        model.encode = encode
        return model

    monkeypatch.setattr(vae_lib, "load_vae", load)
    return seen


def ok(ws: Path, *args: str):
    """`cli` that must succeed: its result, or a failure that shows the command and its output."""
    r = cli(ws, *args)
    assert r.exit_code == 0, f"leakpipe {' '.join(args)}:\n{r.output}"
    return r
