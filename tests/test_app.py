"""`leakpipe app` on an exported tiny attributor: the page through gradio's own client (equal to
`attribute --json`), bad uploads, the exported Space entry point, a real headless Chromium, and the
exported VAE location. Servers listen on loopback only, on a free port, and are always stopped."""

import builtins
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from leakpipe.pipeline.cli import main
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import encode, graph
from tests.conftest import cli, synth_workspace

FAST = [
    "train.epochs=1",  # the app serves what attribute says, whatever the weights learned
    "model.embed_dim=8",
    "model.prototypes_per_class=2",
    "train.batch_size=16",
    "score.kde_folds=2",
    "score.postprocessed=",
    "score.bootstrap=50",
    "score.baselines=false",
]
SETS = [a for s in FAST for a in ("--set", s)]
START = 300  # s: a server that has not answered by then has failed (torch + gradio import on a busy machine)
RUN = "from leakpipe.pipeline.cli import main; main()"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A scored synthetic workspace (VAE at the workspace-relative ./vae) exported to a folder, and a
    folder of images with plain names: two closed test images and the bad uploads."""
    root = synth_workspace(tmp_path_factory.mktemp("app-ws"))
    for split in ("closed", "open"):
        ws = Workspace(root)
        encode.run(graph(ws, ws.config()), split, log=lambda m: None)
    for stage in ("train", "score"):
        r = cli(root, stage, *SETS)
        assert r.exit_code == 0, r.output
    att = tmp_path_factory.mktemp("exported") / "att"
    r = cli(root, "export", str(att), *SETS)
    assert r.exit_code == 0, r.output
    images = tmp_path_factory.mktemp("uploads")
    picks = sorted((root / "data" / "closed").rglob("*.png"))
    for name, src in (("first.png", picks[0]), ("second.png", picks[-1])):
        shutil.copyfile(src, images / name)
    (images / "notes.png").write_text("not an image at all")
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(_bomb())
    return root, att, images


def _bomb(side: int = 50_000) -> bytes:
    """A small PNG whose header claims side x side pixels (2.5 gigapixels, over preprocess.max_pixels)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A page served by a subprocess; stopped with SIGINT (then SIGKILL) within bounded time."""

    def __init__(self, args, cwd: Path, logs: Path, env=lambda port: {}, sigint=signal.SIG_DFL):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.out, self.err = logs / "stdout.txt", logs / "stderr.txt"
        self.proc = subprocess.Popen(
            [sys.executable, *args(self.port)],
            cwd=cwd,
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
            env={**os.environ, **env(self.port)},
            # SIGINT's disposition is inherited: pytest run as a script's background job (as CI ran it)
            # has it ignored, and Python then raises no KeyboardInterrupt. The app sat in gradio's
            # block_thread until the SIGKILL (py-spy, 2026-12-02). A terminal's Ctrl+C is SIG_DFL.
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {self.err.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not answer within {START} s: {self.err.read_text()}")

    def alive(self) -> bool:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            return self.proc.poll() is None and r.status == 200

    def stop(self, sig=signal.SIGINT) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            # gradio's shutdown takes about 1 s; over 30 s on a 2-core machine running three trainings
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """`leakpipe app --model ATT` (the real command, no --vae) from a folder that is no workspace."""
    pytest.importorskip("gradio", reason="the web app needs the app extra: pip install 'leakpipe[app]'")
    _, att, _ = exported
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    server = Server(lambda port: ["-c", RUN, "app", "--model", str(att), "--port", str(port)], elsewhere, elsewhere)
    try:
        yield server
    finally:
        server.stop()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _predict(client, *paths):
    from gradio_client import handle_file

    return client.predict([handle_file(str(p)) for p in paths], api_name="/attribute")


def _attribute_json(att: Path, images: Path, *names: str) -> list:
    """`leakpipe attribute --model ATT NAME... --json` run in the images' folder (so `image` is the name)."""
    here = os.getcwd()
    os.chdir(images)
    try:
        r = CliRunner().invoke(main, ["attribute", "--model", str(att), *names, "--json"])
    finally:
        os.chdir(here)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_export_records_the_absolute_vae_and_the_gallery(exported):
    from leakpipe.pipeline.report.scored import load_split
    from leakpipe.pipeline.ledger import runs
    from leakpipe.pipeline.manifest import read_manifest
    from leakpipe.pipeline.report.evaluate import label_index
    from leakpipe.pipeline.report.explain_figures import nearest_to_prototypes, prototype_thumbnails
    from leakpipe.pipeline.ledger.results import load_checked
    from safetensors.numpy import load_file

    root, att, _ = exported
    record = json.loads((att / "attributor.json").read_text())
    assert Workspace(root).config().vae.source == "./vae"  # the workspace has it relative ...
    assert record["encoder"]["vae_source"] == str((root / "vae").resolve())  # ... the export absolute
    assert set(record["files"]) == {
        "model.safetensors",
        "reference.safetensors",
        "config.json",
        "metrics.json",
        "calibration.safetensors",
        "gallery.safetensors",
        "README.md",  # issue 34: the card, and the code a Space runs, are checksummed too
        "app.py",
        "requirements.txt",
    }
    g = load_file(str(att / "gallery.safetensors"))
    assert g["thumbnails"].shape == (3, 2, 3, 64, 64, 3) and g["thumbnails"].dtype == np.uint8
    # the report's gallery: the training images each prototype wins, nearest first, at 64 px
    ws = Workspace(root)
    out = runs.pointed(ws, "default")
    closed, _ = load_split(ws, out, "closed")
    classes = json.loads((out / "metrics.json").read_text())["classes"]
    tr = closed.select((closed.partition == "train") & np.isin(closed.labels, classes))
    protos = load_checked(out, "model.safetensors")[0]["prototypes"].numpy()
    near = nearest_to_prototypes(tr.arrays["h_bar"], tr.arrays["w"], label_index(tr, classes), protos, 3)
    manifest = read_manifest(ws.manifest("closed"))
    expect = prototype_thumbnails(near, lambda i: manifest.abspath(int(tr.ids["row"][i])), ws.config().preprocess)
    assert g["count"].tolist() == [[len(x) for x in per_class] for per_class in expect]
    assert g["count"].sum() > 0
    for c, per_class in enumerate(expect):
        for m, pictures in enumerate(per_class):
            for j, picture in enumerate(pictures):
                assert np.array_equal(g["thumbnails"][c, m, j], picture)
    assert "leakpipe[app]==" in (att / "requirements.txt").read_text()
    assert "from leakpipe.workflows.app import build, launch" in (att / "app.py").read_text()


def test_attribute_model_from_another_folder_without_vae(exported, tmp_path, monkeypatch):
    root, att, images = exported
    inside = json.loads(cli(root, "attribute", str(images / "first.png"), "--json", *SETS).stdout)
    monkeypatch.chdir(tmp_path)  # neither the workspace nor the VAE's folder
    r = CliRunner().invoke(main, ["attribute", "--model", str(att), str(images / "first.png"), "--json"])
    assert r.exit_code == 0, r.output
    outside = json.loads(r.stdout)
    for key in (
        "top",
        "mahalanobis",
        "kde_log_density",
        "unseen_generator",
        "explanation",
        "result",
        "prediction_set",
        "posterior",
        "unseen_p_value",
    ):
        assert inside[0][key] == outside[0][key], key
    assert outside[0]["vae"] == str((root / "vae").resolve())


def test_a_damaged_gallery_is_refused(exported, tmp_path):
    _, att, images = exported
    copy = tmp_path / "att"
    shutil.copytree(att, copy)
    with open(copy / "gallery.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    r = CliRunner().invoke(main, ["attribute", "--model", str(copy), str(images / "first.png")])
    assert r.exit_code != 0 and "gallery.safetensors missing or damaged" in r.output


def _resign(record: dict) -> dict:
    from leakpipe.pipeline.engine.attributor import record_checksum

    return {**record, "checksum": record_checksum(record)}


def _drop(record: dict, *keys: str) -> dict:
    out = json.loads(json.dumps(record))
    *path, last = keys
    inner = out
    for k in path:
        inner = inner[k]
    del inner[last]
    return out


def _with(record: dict, value, *keys: str) -> dict:
    out = json.loads(json.dumps(record))
    *path, last = keys
    inner = out
    for k in path:
        inner = inner[k]
    inner[last] = value
    return out


@pytest.mark.parametrize(
    "edit,says",
    [
        # a hand edit without the checksum updated: refused as such
        (
            lambda r: _with(r, float("nan"), "unseen_threshold", "log_density_threshold"),
            "does not match its own checksum",
        ),
        (lambda r: _with(r, r["classes"][:2], "classes"), "does not match its own checksum"),
        # with the checksum recomputed, the values themselves are checked
        (
            lambda r: _resign(
                _with(
                    _with(r, float("nan"), "unseen_threshold", "log_density_threshold"),
                    float("nan"),
                    "unseen_threshold",
                    "bandwidth",
                )
            ),
            "log_density_threshold = nan: must be a finite log-density (or -inf: never flagged); "
            "unseen_threshold.bandwidth = nan",
        ),
        (lambda r: _resign(_with(r, -1e300, "unseen_threshold", "log_density_threshold")), "a finite log-density"),
        (
            lambda r: _resign(_with(r, 0.0, "unseen_threshold", "bandwidth")),
            "bandwidth = 0.0: must be a finite number > 0",
        ),
        (
            lambda r: _resign(_with(r, r["classes"][:2], "classes")),
            "lists 2 classes (closed00, closed01) but model.safetensors was trained on 3",
        ),
        (lambda r: _resign(_drop(r, "files")), "key 'files' is missing"),
        (lambda r: _resign(_drop(r, "unseen_threshold", "bandwidth")), "bandwidth = (missing)"),
        (lambda r: [1, 2], "holds a JSON list, not an object"),
        (lambda r: _with(_drop(r, "checksum"), "leakpipe-attributor-2", "format"), "carries no checksum of itself"),
        (lambda r: _with(_drop(r, "checksum"), "leakpipe-attributor-3", "format"), "carries no checksum of itself"),
        # the decisions (issue 23) are values attribute applies: validated too
        (
            lambda r: _resign(_with(r, 0.0, "decisions", "calibration", "temperature")),
            "temperature = 0.0: must be within",
        ),
        (lambda r: _resign(_with(r, 1.5, "decisions", "alpha")), "decisions.alpha = 1.5: must be in (0, 1)"),
        (
            lambda r: _resign(_with(r, [0.1, 0.2], "decisions", "conformal", "thresholds")),
            "thresholds = [0.1, 0.2]: one per class (3)",
        ),
        (lambda r: _resign(_drop(r, "decisions")), "key 'decisions' is missing"),
        # issue 34: values accepted and then ignored, or one that made the posterior NaN (exit 0)
        (
            lambda r: _resign(_with(r, 1e-320, "decisions", "calibration", "temperature")),
            "decisions.calibration.temperature = 1e-320: must be within [0.001, 1000]",
        ),
        (
            lambda r: _resign(_with(r, 1.5, "unseen_threshold", "alpha")),
            "unseen_threshold.alpha = 1.5: must be in (0, 1)",
        ),
        (lambda r: _resign(_with(r, 0.99, "unseen_threshold", "p_min")), "unseen_threshold.p_min = 0.99: "),
        (
            lambda r: _resign(_with(r, 0.5, "decisions", "conformal", "level")),
            "decisions.conformal.level = 0.5: must be 1 - decisions.alpha",
        ),
        (
            lambda r: _resign(_with(r, "yes", "decisions", "conformal", "mondrian")),
            "mondrian = 'yes': must be true or false",
        ),
        (
            lambda r: _resign(_with(r, 64, "encoder", "preprocess", "size")),
            "encoder.preprocess.size = 64, but config.json has 32",
        ),
        (
            lambda r: _resign(_with(r, 10, "encoder", "preprocess", "max_pixels")),
            "encoder.preprocess.max_pixels = 10, but config.json has",
        ),
        (lambda r: _resign(_with(r, 7, "score", "maha_shared")), "score.maha_shared = 7.0: must be between 0"),
        (lambda r: _resign(_with(r, "no", "score", "maha_rows")), "score.maha_rows"),
    ],
)
def test_attributor_json_is_checksummed_and_validated(exported, tmp_path, edit, says):
    """Issue 24: NaN thresholds were used ('known generator', exit 0), a shortened class list was
    ignored, and missing keys were tracebacks."""
    _, att, images = exported
    copy = tmp_path / "att"
    shutil.copytree(att, copy)
    record = json.loads((copy / "attributor.json").read_text())
    (copy / "attributor.json").write_text(json.dumps(edit(record)))
    r = CliRunner().invoke(main, ["attribute", "--model", str(copy), str(images / "first.png")], catch_exceptions=False)
    assert r.exit_code != 0 and says in r.output, r.output
    assert "export the run again" in r.output or "--model needs a folder" in r.output


def test_the_reference_holds_the_val_rows_and_an_export_without_them_still_attributes(exported, tmp_path):
    """reference.safetensors holds the closed val rows (score.maha_rows = train_val fits the Mahalanobis
    comparator on them too); an export made before them (training rows only) attributes with the
    comparator on its training rows, and one with half of them is refused, saying what is missing."""
    from leakpipe.pipeline.ledger import runs
    from leakpipe.pipeline.report.scored import load_split
    from leakpipe.pipeline.store.hashing import hash_file
    from safetensors.numpy import load_file, save_file

    root, att, images = exported
    ref = load_file(str(att / "reference.safetensors"))
    ws = Workspace(root)
    closed, _ = load_split(ws, runs.pointed(ws, "default"), "closed")
    val = closed.select(closed.partition == "val")
    assert len(val) and np.array_equal(ref["val_h_bar"], val.arrays["h_bar"]) and len(ref["val_labels"]) == len(val)

    def with_reference(name: str, keys: set) -> Path:
        copy = tmp_path / name
        shutil.copytree(att, copy)
        save_file({k: v for k, v in ref.items() if k in keys}, str(copy / "reference.safetensors"))
        record = json.loads((copy / "attributor.json").read_text())
        record["files"]["reference.safetensors"] = hash_file(copy / "reference.safetensors")
        (copy / "attributor.json").write_text(json.dumps(_resign(record)))
        return copy

    now = _attribute_json(att, images, "first.png")[0]
    before = _attribute_json(with_reference("before", {"h_bar", "w", "labels"}), images, "first.png")[0]
    assert before["top"] == now["top"] and before["kde_log_density"] == now["kde_log_density"]
    assert before["mahalanobis"]["score"] != now["mahalanobis"]["score"]  # fitted on fewer rows
    half = with_reference("half", {"h_bar", "w", "labels", "val_h_bar"})
    r = CliRunner().invoke(main, ["attribute", "--model", str(half), str(images / "first.png")])
    assert r.exit_code != 0 and "val_labels missing" in r.output and "both or neither" in r.output, r.output


def test_page_equals_attribute_json(exported, served):
    _, att, images = exported
    status, results, a_t, gated, gallery, raw = _predict(
        _client(served.url), images / "first.png", images / "second.png"
    )
    assert raw == _attribute_json(att, images, "first.png", "second.png")  # the same numbers, every one
    assert status.startswith("Attributed 2 of 2 images")
    for r in raw:
        assert (
            f"### {r['image']}" in results
            and f"| {r['top'][0]['generator']} | {r['top'][0]['probability']:.3f} |" in results
        )
        assert ("UNSEEN GENERATOR" if r["unseen_generator"] else "known generator") in results
        assert f"KDE log-density {r['kde_log_density']:.2f}" in results and f"p = {r['unseen_p_value']:.3f}" in results
        assert "**Prediction set**: {" + ", ".join(r["prediction_set"]) + "} at 90%" in results
    assert a_t["headers"] == ["image", *[f"t={t}" for t in raw[0]["timesteps"]]]
    assert [row[1:] for row in a_t["data"]] == [[round(a, 4) for a in r["explanation"]["a_t"]] for r in raw]
    assert [row[1] for row in gated["data"]] == [f["dim"] for r in raw for f in r["explanation"]["top_gated_features"]]
    # the winning prototype's nearest training images, from the exported gallery
    from safetensors.numpy import load_file

    g = load_file(str(att / "gallery.safetensors"))
    classes = json.loads((att / "attributor.json").read_text())["classes"]
    wins = [r["explanation"]["winning_prototype"] for r in raw]
    assert len(gallery) == sum(int(g["count"][classes.index(p["generator"]), p["index"]]) for p in wins)
    first = wins[0]
    assert (
        gallery[0]["caption"]
        == f"first.png: {first['generator']} prototype #{first['index']}, nearest training image 1"
    )
    shown = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))  # lossless: PNG, never webp
    assert np.array_equal(shown, g["thumbnails"][classes.index(first["generator"]), first["index"], 0])


def test_bad_uploads_show_a_message_and_the_server_keeps_serving(exported, served):
    _, att, images = exported
    client = _client(served.url)
    for name, words in (
        ("notes.png", "not an image Pillow can read"),
        ("bomb.png", "decompression bomb guard"),
        ("empty.png", "empty file (0 bytes)"),
    ):
        status, results, a_t, gated, gallery, raw = _predict(client, images / name)
        assert status.startswith("**No image could be attributed**") and f"{name}: {words}" in status, status
        assert "Traceback" not in status and raw is None and not results and not gallery
        assert served.alive()
    status, *_, raw = _predict(client, images / "notes.png", images / "first.png", images / "empty.png")
    assert status.startswith("Attributed 1 of 3 images") and "notes.png: not an image" in status
    assert "empty.png: empty file" in status and [r["image"] for r in raw] == ["first.png"]
    assert raw == _attribute_json(att, images, "first.png")  # the others do not change its numbers
    Image.new("L", (9000, 9000)).save(images / "huge.png")  # 81 megapixels in a small file: 1.25 GB decoded
    status, *_, raw = _predict(client, images / "huge.png")
    assert "huge.png: 9000 x 9000 = 81.0 megapixels, more than this page decodes (16.8 megapixels" in status, status
    with urllib.request.urlopen(served.url + "config", timeout=30) as r:
        assert "images up to 16.8 megapixels" in r.read().decode()  # the page says so
    # a request crafted past the client, naming a file nobody uploaded: gradio refuses it
    crafted = {"data": [[{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]]}
    call = urllib.request.Request(
        served.url + "gradio_api/call/attribute", json.dumps(crafted).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(call, timeout=60) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{served.url}gradio_api/call/attribute/{event}", timeout=120) as r:
        assert r.read().decode().startswith("event: error")
    assert served.alive()
    err = served.err.read_text()
    assert "Traceback" not in err and "/etc/hostname" not in err, err
    assert "app: refused a request for a file that was not uploaded to this page; nothing was read" in err
    # one line per request in the server's log, counts only (upload names come from anyone)
    assert re.search(r"app: request \d+: 0 of 1 images attributed in \d+\.\d s", err)
    assert re.search(r"app: request \d+: 1 of 3 images attributed in \d+\.\d s", err)
    assert "notes.png" not in err


def test_app_says_what_it_serves_and_where(exported, served):
    _, att, _ = exported
    out, err = served.out.read_text(), served.err.read_text()
    for line in (
        "app: loading gradio",
        f"app: reading attributor {att}",
        "app: checking the VAE",
        "app: building the page",
        f"app: starting the web server on 127.0.0.1:{served.port}",
    ):
        assert line in err, line
    record = json.loads((att / "attributor.json").read_text())
    assert (
        f"app: serving attributor {att} (result {record['result'][:12]}, 3 generators: closed00, closed01, "
        f"closed02) with VAE {record['encoder']['vae_source']} at http://127.0.0.1:{served.port}/"
    ) in out
    with socket.socket() as s:  # loopback only by default
        s.settimeout(2)
        addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        other = next((a for a in addresses if not a.startswith("127.")), None)
        if other:
            assert s.connect_ex((other, served.port)) != 0


def test_export_prints_progress_and_a_summary(exported, tmp_path):
    root, _, _ = exported
    dest = tmp_path / "att"
    r = cli(root, "export", str(dest), *SETS)
    assert r.exit_code == 0, r.output
    result = json.loads((dest / "attributor.json").read_text())["result"]
    for line in (
        "export default: reading the result and its closed training embeddings",
        f"export default: checking result {result[:12]} against its lock",
        "export default: the prototype gallery (the training images each prototype wins, from closed)",
    ):
        assert line in r.stderr, line
    files = sorted(p.name for p in dest.iterdir())
    size = sum((dest / f).stat().st_size for f in files) / 1e6
    (summary,) = r.stdout.splitlines()  # one line
    assert summary.startswith(
        f"export default: result {result[:12]} -> {dest}, {len(files)} files ({', '.join(files)}), {size:.1f} MB in "
    )
    assert f"`leakpipe app --model {dest}`" in summary


def test_exported_app_py_runs_as_a_space(exported, tmp_path):
    """The folder's app.py, unchanged, as a Space runs it: `python app.py` with GRADIO_SERVER_NAME and
    GRADIO_SERVER_PORT set, from another folder. Started with SIGINT ignored (a script's background
    job), it stops cleanly on SIGTERM, as a Space's restart or `docker stop` sends."""
    pytest.importorskip("gradio", reason="the web app needs the app extra: pip install 'leakpipe[app]'")
    _, att, images = exported
    space = Server(
        lambda port: [str(att / "app.py")],
        tmp_path,
        tmp_path,
        env=lambda port: {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)},
        sigint=signal.SIG_IGN,
    )
    try:
        status, *_, raw = _predict(_client(space.url), images / "first.png")
    finally:
        space.stop(signal.SIGTERM)
    assert space.proc.returncode == 0, space.err.read_text()[-2000:]
    expect = _attribute_json(att, images, "first.png")
    assert status.startswith("Attributed 1 of 1 images")
    for key in expect[0]:  # the folder is named by app.py's own path
        if key not in ("attributor", "run"):
            assert raw[0][key] == expect[0][key], key
    assert raw[0]["attributor"] == f"attributor {att.resolve()}" and raw[0]["run"] == str(att.resolve())


def _chromium() -> str | None:
    for c in (
        os.environ.get("LEAKPIPE_CHROMIUM"),
        "/usr/lib/chromium/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if c and Path(c).is_file():
            return c
    return None


def test_page_in_headless_chromium(exported, served, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    _, att, images = exported
    expect = _attribute_json(att, images, "first.png")[0]
    shot = tmp_path / "page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.goto(served.url, timeout=120_000)
            page.locator("#images input[type=file]").set_input_files(str(images / "first.png"))
            page.wait_for_function(
                "() => (document.querySelector('#status') || {}).innerText?.includes('Attributed')", timeout=120_000
            )
            results = page.locator("#results").inner_text()
            page.screenshot(path=str(shot), full_page=True)
            # a bad upload in the page: a message there, no traceback
            page.goto(served.url, timeout=120_000)
            page.locator("#images input[type=file]").set_input_files(str(images / "notes.png"))
            page.wait_for_function(
                "() => (document.querySelector('#status') || {}).innerText?.includes('No image')", timeout=120_000
            )
            bad = page.locator("#status").inner_text()
        finally:
            browser.close()
    assert "first.png" in results and expect["top"][0]["generator"] in results
    assert f"{expect['top'][0]['probability']:.3f}" in results
    assert "notes.png: not an image Pillow can read" in bad and "Traceback" not in bad
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.shape[1] == 1200
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and img.std() > 10  # drawn: text, tables and the gallery, not one colour
    assert served.alive()


def test_without_gradio_only_the_app_fails(exported, tmp_path, monkeypatch):
    root, att, images = exported
    real = builtins.__import__

    def no_gradio(name, *a, **k):
        if name.split(".")[0] in ("gradio", "gradio_client"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    r = CliRunner().invoke(main, ["app", "--model", str(att)])
    assert r.exit_code != 0 and "pip install 'leakpipe[app]'" in r.output and "Traceback" not in r.output
    r = cli(root, "export", str(tmp_path / "again"), *SETS)  # export (with its app.py) needs no gradio
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "app.py").is_file()
    r = CliRunner().invoke(main, ["attribute", "--model", str(tmp_path / "again"), str(images / "first.png")])
    assert r.exit_code == 0, r.output
    started = subprocess.run(
        [sys.executable, "-c", "import sys, leakpipe.pipeline.cli; print('gradio' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.stdout.strip() == "False"  # the command line never imports it before `app`


def test_app_stops_on_ctrl_c_with_a_summary(exported, served):
    """Last in this file: it stops the module's server. Ctrl+C ends `leakpipe app` with one line that
    adds up the requests its log reported."""
    served.stop()
    assert served.proc.returncode == 0
    requests = [
        tuple(map(int, m)) for m in re.findall(r"app: request \d+: (\d+) of (\d+) images", served.err.read_text())
    ]
    done, images = sum(a for a, _ in requests), sum(n for _, n in requests)
    n = len(requests)
    assert (
        f"app: stopped after {n} request{'' if n == 1 else 's'}: {done} of {images} image"
        f"{'' if images == 1 else 's'} attributed, {images - done} not"
    ) in served.out.read_text()
