"""`leakpipe app`: a web page for an exported attributor (gradio, the `app` extra).

A person drops one or more images on the page and sees, per image, what `leakpipe attribute --json`
gives for it (the same function computes it: `stages.attribute.attribute`): the prediction set at its
level, the top generators with their calibrated probabilities, the unseen-generator verdict with its
p-value, a_t per timestep, the top gated features, and the winning prototype with the training
images it wins, nearest first (the report's gallery, stored in the folder by `leakpipe export`).

gradio is imported only when a page is built, so the rest of leakpipe starts fast and works without
it. `leakpipe export` writes `app.py` and `requirements.txt` (`space_files`) into the folder, so
that the folder runs as a Hugging Face Space unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.engine.vae import resolve_device
from leakpipe.pipeline.config_files import load_config
from leakpipe.stages import STAGES
from leakpipe.stages.attribute import ONE_OF_EQUALS

if TYPE_CHECKING:  # a type only: the attributor loads torch when a page starts
    from leakpipe.pipeline.config import Config
    from leakpipe.pipeline.engine.attributor import Attributor

INSTALL = "pip install 'leakpipe[app]'"
MAX_FILE_SIZE = "50mb"  # per upload; gradio refuses bigger files before they reach leakpipe
# decoded pixels per image the page accepts (4096 x 4096): a 50 MB file can hold a 9000 x 9000 image, whose
# decoding and resizing took the server to 1.25 GB; `leakpipe app --max-pixels`, LEAKPIPE_MAX_PIXELS in a Space
MAX_PIXELS = 4096 * 4096
DEFAULT_PORT = 7860

SPACE_APP = '''"""This folder's leakpipe attributor as a web page: a Hugging Face Space's entry point (written by
`leakpipe export`; `python app.py` runs it locally too, on http://127.0.0.1:7860).

The VAE: the one recorded in attributor.json (a Hub id, or a local path of the machine it was
exported on), a copy in ./vae beside this file, or the Space variable LEAKPIPE_VAE (a Hub id or a
path). It must have the recorded encoder fingerprint, or the page refuses to start.
"""
import os
from pathlib import Path

from leakpipe.workflows.app import build, launch

here = Path(__file__).resolve().parent
vae = os.environ.get("LEAKPIPE_VAE") or (str(here / "vae") if (here / "vae").is_dir() else None)
demo = build(str(here), vae=vae, max_pixels=int(os.environ.get("LEAKPIPE_MAX_PIXELS", "0")) or None)

if __name__ == "__main__":
    launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
'''


def space_files(requirement: str | None = None) -> dict[str, str]:
    """What `leakpipe export` adds so the folder is a Hugging Face Space: the entry point and its
    requirements (`requirement`, or this leakpipe version with the `app` extra from the package index).
    Both are checksummed with the folder, so a different requirement is given to export, not edited in."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pin = f"=={version('leakpipe')}"
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
        pin = ""
    return {
        "app.py": SPACE_APP,
        "requirements.txt": "# the Space installs leakpipe with its web-app extra; to install it from a git "
        "repository, export with\n# --requirement 'leakpipe[app] @ git+https://github.com/OWNER/leakpipe@COMMIT'\n"
        f"{requirement or 'leakpipe[app]' + pin}\n",
    }


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a forensic tool
    try:
        import gradio
    except ImportError:
        raise UserError(f"the web app needs gradio, which is not installed: {INSTALL}") from None
    _quiet_path_refusals()
    return gradio


class _Traceback:
    """gradio's `traceback` module as its queue and routes see it, but a request gradio refuses for the
    file it names (InvalidPathError: a crafted `{"path": "/etc/hostname"}`) is one line in the server's
    log, which never names a file (names come from anyone); every other traceback is printed as before."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def print_exc(self, *args, **kwargs):
        from gradio.exceptions import InvalidPathError

        if isinstance(sys.exc_info()[1], InvalidPathError):
            _stderr("app: refused a request for a file that was not uploaded to this page; nothing was read")
            return None
        return self._real.print_exc(*args, **kwargs)


def _quiet_path_refusals() -> None:
    import importlib

    for name in ("gradio.queueing", "gradio.routes", "gradio.route_utils"):
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "traceback", None), (_Traceback, type(None))):
            module.traceback = _Traceback(module.traceback)  # type: ignore[attr-defined]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Page:
    """What the page serves: a loaded attributor and the settings `attribute` takes, and a tally of
    what it has answered (for the server's log and the summary when it stops)."""

    att: Attributor
    ws_cfg: Config
    label: str  # the `run` field of the results: the --model argument, as `attribute --model` gives it
    top: int
    gallery: dict | None  # thumbnails (C, M, K, 64, 64, 3) and count (C, M), or None
    log: Callable[[str], None] = _stderr
    code_differs: list = field(default_factory=list)  # as `attribute --model` states with each result
    max_pixels: int = MAX_PIXELS  # decoded pixels per image, at most (the server's memory)
    tally: dict = field(default_factory=lambda: {"requests": 0, "images": 0, "attributed": 0})

    def answered(self, images: int, attributed: int, seconds: float) -> None:
        """One line per upload in the server's log: counts only, never a file name (they come from anyone)."""
        t = self.tally
        t["requests"] += 1
        t["images"] += images
        t["attributed"] += attributed
        self.log(f"app: request {t['requests']}: {attributed} of {images} images attributed in {seconds:.1f} s")

    def summary(self) -> str:
        t = self.tally
        return (
            f"app: stopped after {_plural(t['requests'], 'request')}: {t['attributed']} of "
            f"{_plural(t['images'], 'image')} attributed, {t['images'] - t['attributed']} not "
            "(unreadable, or an error the page showed)"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def load(
    model: str, vae: str | None = None, ws_cfg=None, top: int = 3, log=_stderr, max_pixels: int | None = None
) -> Page:
    """The attributor `model` (a folder written by `leakpipe export`, or a Hub id), every file checked,
    its VAE found and its encoder fingerprint compared, as `attribute --model` does."""
    from leakpipe.stages.attribute import load_exported

    ws_cfg = ws_cfg or load_config()
    device = resolve_device(ws_cfg.compute.device)
    att, differ = load_exported(model, vae, device, STAGES, log=lambda msg: log(f"app: {msg}"))
    return Page(att, ws_cfg, model, top, att.gallery, log, differ, max_pixels=max_pixels or MAX_PIXELS)


def _md(text) -> str:
    """Plain text inside Markdown (file and generator names may hold *, _, |, < ...)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in str(text))


def _result_markdown(r: dict) -> str:
    e = r["explanation"]
    if r.get("unseen_p_value") is None:  # an attributor exported before p-values
        verdict = (
            f"**UNSEEN GENERATOR**: KDE log-density {r['kde_log_density']:.2f} is below the threshold "
            f"{r['unseen_threshold']:.2f}"
            if r["unseen_generator"]
            else f"**known generator**: KDE log-density {r['kde_log_density']:.2f}, threshold {r['unseen_threshold']:.2f}"  # noqa: E501
        )
    else:
        verdict = (
            f"**{'UNSEEN GENERATOR' if r['unseen_generator'] else 'known generator'}**: p = "
            f"{r['unseen_p_value']:.3f} {'<=' if r['unseen_generator'] else '>'} {r['unseen_alpha']:g} (KDE "
            f"log-density {r['kde_log_density']:.2f} against {r['unseen_n_val']} closed validation images)"
        )
    method = r.get("calibration", {}).get("method", "none").replace("_", " ")
    lines = [f"### {_md(r['image'])}", ""]
    lines += [f"**Warning:** {_md(w)}\n" for w in r.get("warnings", [])]  # where the run's decisions fail
    if r.get("converted"):
        lines += [f"Converted as training images were: {_md('; '.join(r['converted']))}.", ""]
    if r.get("prediction_set") is not None:
        from leakpipe.stages.attribute import set_text

        lines += [
            f"**Prediction set**: {_md(set_text(r))} (it holds the true generator of "
            f"{r['prediction_set_level']:.0%} of known generators' images like the calibration images)",
            "",
        ]
    lines += [
        f"| generator | probability ({_md(method)}) |",
        "|---|---:|",
        *[f"| {_md(t['generator'])} | {t['probability']:.3f} |" for t in r["top"]],
        "",
    ]
    lines += [
        f"Unseen-generator verdict: {verdict}.",
        "",
        f"Mahalanobis: {_md(r['mahalanobis']['generator'])} (score {r['mahalanobis']['score']:.2f}).",
        "",
    ]
    p = e.get("winning_prototype")
    if p:
        lines += [
            f"Winning prototype: {_md(p['generator'])} \\#{p['index']} (responsibility "
            f"{p['responsibility']:.3f}, distance {p['distance']:.3f}); the features that set its distance: "
            + ", ".join(f"\\#{f['dim']} (r {f['r']:.3f})" for f in p["top_contributions"])
            + "."
            + (f" Note: {ONE_OF_EQUALS}." if p.get("one_of_equals") else ""),
            "",
        ]
    return "\n".join(lines)


def _decisions_markdown(att) -> str:
    """What the page decides for each image, and the level it is guaranteed at."""
    d = att.decisions
    if d is None:  # exported before the decisions
        return (
            f"An image whose KDE log-density falls below the calibrated threshold "
            f"({att.threshold['log_density_threshold']:.2f}) is flagged as made by an unseen generator."
        )
    return (
        f"Probabilities are calibrated ({_md(d['calibration']['method'].replace('_', ' '))}); each image gets a "
        f"prediction set at {d['conformal']['level']:.0%} and is flagged as made by an unseen generator when its "
        f"p-value is at most {d['alpha']:g}. Both guarantees hold for images like the validation images of the "
        "known generators, not for post-processed ones."
    )


def analyse(page: Page, files) -> tuple:
    """The page's answer to an upload: (status, results, a_t rows, gated-feature rows, gallery, JSON).
    Files that cannot be attributed are named in the status with the reason; the others are attributed."""
    paths = [str(f) for f in (files if isinstance(files, (list, tuple)) else [files] if files else [])]
    if not paths:
        return ("Drop one or more images above.", "", None, None, None, None)
    start = time.perf_counter()
    answer = _answer(page, paths)
    page.answered(len(paths), len(answer[-1] or []), time.perf_counter() - start)
    return answer


def _answer(page: Page, paths: list[str]) -> tuple:
    from leakpipe.pipeline.engine.images import BadImage, read_image
    from leakpipe.stages.attribute import attribute

    empty = ("", None, None, None, None)
    good, bad = [], []
    preprocess = _bounded(page)
    for p in paths:
        try:
            _within_page(p, page.max_pixels)
            read_image(p, preprocess)
            good.append(p)
        except (BadImage, OSError) as exc:
            bad.append(f"{Path(p).name}: {str(exc).replace(p, Path(p).name)}")
    problems = "\n".join(f"- {_md(b)}" for b in bad)
    if not good:
        return (f"**No image could be attributed** ({len(bad)} of {len(paths)} cannot be read):\n\n{problems}", *empty)
    try:
        results = attribute(page.att, page.ws_cfg, [Path(p) for p in good], page.top, page.label, preprocess)
    except UserError as exc:
        return (f"**Cannot attribute these images**: {_md(str(exc))}", *empty)
    except Exception as exc:  # the server keeps serving; the details go to its log, not the page
        traceback.print_exc()
        return (
            f"**Something went wrong on the server** ({_md(type(exc).__name__)}: {_md(exc)}); the page "
            "keeps working, and the server's log has the details.",
            *empty,
        )
    for r, p in zip(results, good):
        r["image"] = Path(p).name  # the upload's own name, not the server's temporary path
        r["code_differs"] = page.code_differs
    status = (
        f"Attributed {len(results)} of {len(paths)} images with {_md(page.att.name)}, "
        f"VAE {_md(page.att.cfg.vae.source)}."
    )
    if bad:
        status += f" Not attributed:\n\n{problems}"
    timesteps = results[0]["timesteps"]
    a_t = [[r["image"], *[round(a, 4) for a in r["explanation"]["a_t"]]] for r in results]
    gated = [
        [r["image"], f["dim"], round(f["w"], 4), round(f["h_bar"], 4)]
        for r in results
        for f in r["explanation"]["top_gated_features"]
    ]
    return (
        status,
        "\n\n".join(_result_markdown(r) for r in results),
        _table(["image", *[f"t={t}" for t in timesteps]], a_t),
        _table(["image", "feature", "w", "h_bar"], gated),
        _thumbnails(page, results),
        results,
    )


def _bounded(page: Page):
    """The attributor's preprocessing with its decompression-bomb guard lowered to the page's bound."""
    import dataclasses

    pre = page.att.cfg.preprocess
    return dataclasses.replace(pre, max_pixels=min(pre.max_pixels, page.max_pixels))


def _within_page(path: str, max_pixels: int) -> None:
    """Refuse, from its header, an image larger than the page decodes, saying how to raise the bound."""
    from leakpipe.pipeline.engine.images import BadImage, header_size

    w, h = header_size(path)
    if w * h > max_pixels:
        raise BadImage(
            f"{w} x {h} = {w * h / 1e6:.1f} megapixels, more than this page decodes ({max_pixels / 1e6:.1f} "
            "megapixels, a bound on the server's memory); attribute it with `leakpipe attribute`, or serve the "
            "page with a larger `leakpipe app --max-pixels` (LEAKPIPE_MAX_PIXELS in a Space)"
        )


def _table(headers: list[str], rows: list[list]) -> dict:
    return {"headers": headers, "data": rows}


def _thumbnails(page: Page, results: list[dict]) -> list:
    """(picture, caption) of the training images each result's winning prototype wins, nearest first."""
    if page.gallery is None:
        return []
    out = []
    for r in results:
        p = r["explanation"].get("winning_prototype")
        if not p:
            continue
        c, m = page.att.classes.index(p["generator"]), p["index"]
        for j in range(int(page.gallery["count"][c, m])):
            out.append(
                (
                    page.gallery["thumbnails"][c, m, j],
                    f"{r['image']}: {p['generator']} prototype #{m}, nearest training image {j + 1}",
                )
            )
    return out


def build(model_or_page, vae: str | None = None, ws_cfg=None, top: int = 3, log=_stderr, max_pixels=None):
    """The gradio Blocks of the page for an attributor (a folder, a Hub id, or a loaded `Page`)."""
    gr = _gradio()
    page = model_or_page if isinstance(model_or_page, Page) else load(model_or_page, vae, ws_cfg, top, log, max_pixels)
    att = page.att
    log("app: building the page")
    with gr.Blocks(title=f"leakpipe: {att.result[:12]}", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# Which generator made this image?\n\n{_md(att.name)}: {len(att.classes)} known generators "
            f"({_md(', '.join(att.classes))}); VAE {_md(att.cfg.vae.source)}. Images are encoded as in "
            f"training ({att.cfg.preprocess.size} px); images up to {_bounded(page).max_pixels / 1e6:.1f} "
            "megapixels. " + _decisions_markdown(att)
        )
        files = gr.File(file_count="multiple", type="filepath", label="Images (drop one or more)", elem_id="images")
        go = gr.Button("Attribute", variant="primary", elem_id="attribute")
        status = gr.Markdown(elem_id="status")
        results = gr.Markdown(elem_id="results")
        a_t = gr.Dataframe(label="a_t: temporal attention per timestep", elem_id="a_t", interactive=False)
        gated = gr.Dataframe(label="top gated features (largest w)", elem_id="gated", interactive=False)
        near = gr.Gallery(
            label="winning prototype: the training images it wins, nearest first",
            columns=6,
            format="png",
            height="auto",
            elem_id="gallery",
        )  # lossless: no webp artefacts
        raw = gr.JSON(label="all numbers (as `leakpipe attribute --json`)", elem_id="json")
        outputs = [status, results, a_t, gated, near, raw]
        go.click(lambda f: analyse(page, f), files, outputs, api_name="attribute")
        files.upload(lambda f: analyse(page, f), files, outputs, api_visibility="private")
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = DEFAULT_PORT, block: bool = True) -> str:
    """Serve `demo` on host:port (loopback unless told otherwise); returns the page's address. With
    `block`, serves until Ctrl+C."""
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            share=False,
            ssr_mode=False,
            max_file_size=MAX_FILE_SIZE,
            show_error=False,
        )
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port} ({exc}); choose another --port") from None
    if block:
        block_until_stopped(demo)
    return url


def block_until_stopped(demo) -> None:
    """Serve until Ctrl+C or SIGTERM (what `docker stop`, systemd and a Space's restart send): both take
    gradio's KeyboardInterrupt path, which closes the web server; then close the queue, its worker
    pool and the page's heartbeats too: a thread of theirs left running kept the process from exiting
    after a browser had used the page (tests/test_app.py, Ctrl+C). A process started with SIGINT
    ignored (a background job of a script, as Unix has it) still stops on SIGTERM."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only the main thread sets handlers
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        demo.block_thread()
    finally:
        if main:  # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    demo.close(verbose=False)


def serve(
    model: str,
    vae: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    ws_cfg=None,
    top: int = 3,
    log=_stderr,
    echo=print,
    block: bool = True,
    max_pixels: int | None = None,
):
    """`leakpipe app`: load, build, serve, and say in one line what is served where. Returns the Blocks
    (close it with .close()) and the address."""
    log("app: loading gradio")
    _gradio()  # before the attributor: without the extra, say so at once
    page = load(model, vae, ws_cfg, top, log, max_pixels)
    demo = build(page, log=log)
    log(f"app: starting the web server on {host}:{port}")
    url = launch(demo, host, port, block=False)
    att = page.att
    echo(
        f"app: serving {att.name} (result {att.result[:12]}, {len(att.classes)} generators: "
        f"{', '.join(att.classes)}) with VAE {att.cfg.vae.source} at {url}"
        + (" (Ctrl+C or SIGTERM stops)" if block else "")
    )
    if block:
        block_until_stopped(demo)
        echo(page.summary())
    return demo, url
