"""Writing one scoring's outputs: the figures, metrics.json, report.md, the open-set scores that
`compare` pairs runs on and the validation scores that `attribute`'s p-values rank against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine.attributor import CALIBRATION
from leakpipe.pipeline.math import metrics
from leakpipe.pipeline.report import explain_figures as xf, figures, render
from leakpipe.pipeline.report.evaluate import label_index
from leakpipe.pipeline.store.atomic import atomic_path, atomic_write_json


def write_outputs(run_dir: Path, m: dict, figs: dict, cfg: Config, prototypes: np.ndarray | None) -> list[Path]:
    """The figures, metrics.json, report.md and the open-set scores of one scoring; returns the files."""
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    m["figures"] = _write_figures(fig_dir, m, figs, cfg)
    if cfg.log.tensorboard:
        _write_tensorboard(run_dir, figs, prototypes)
    atomic_write_json(run_dir / "metrics.json", m)
    render.write_report(run_dir / "report.md", m)
    files = [run_dir / "metrics.json", run_dir / "report.md", *(fig_dir / n for n in m["figures"])]
    return files + _write_scores(run_dir, figs)


def _write_figures(fig_dir: Path, m: dict, figs: dict, cfg: Config) -> list[str]:
    """Every figure that applies into `fig_dir` (an older one that no longer applies removed); their names."""
    test, classes = figs["test"], figs["classes"]
    y = label_index(test, classes)
    figures.confusion_figure(
        m["closed"]["raw"]["head"]["confusion"],
        classes,
        f"confusion, closed test (raw), {m['head']} head",
        fig_dir / "confusion.png",
    )
    figures.roc_figure(
        metrics.softmax(test.arrays["logits"].astype(np.float64)),
        y,
        classes,
        "one-vs-rest ROC, closed test (raw)",
        fig_dir / "roc.png",
    )
    opened = (
        figs["open"].embedding("h_bar") if figs["open"] is not None else np.zeros((0, test.arrays["h_bar"].shape[1]))
    )
    figures.embedding_figure(
        test.embedding("h_bar"),
        y,
        classes,
        opened,
        cfg.score.embedding_map,
        cfg.score.seed,
        fig_dir / "embedding_map.png",
    )
    figures.postprocessing_figure(m["closed"], len(classes), fig_dir / "postprocessing.png")
    figures.attention_figure(m["attention"], classes, m["timesteps"], fig_dir / "attention.png")
    figures.reliability_figure(m["calibration"], fig_dir / "reliability.png")
    xf.stage_maps_figure(figs["stages"], figs["stage_labels"], classes, fig_dir / "stage_maps.png")
    xf.class_step_figure(m["closed"], classes, fig_dir / "class_by_step.png")
    names = [f for f in figures.FIGURES if f not in ("kde_scores.png", "prototype_gallery.png")]
    if "gallery" in figs:
        xf.gallery_figure(figs["gallery"], classes, fig_dir / "prototype_gallery.png")
        names.append("prototype_gallery.png")
    if "kde_scores" in figs:
        figures.kde_figure(figs["kde_scores"], m["open"], m["unseen_threshold"], fig_dir / "kde_scores.png")
        names.append("kde_scores.png")
    for stale in set(p.name for p in fig_dir.glob("*.png")) - set(names):
        (fig_dir / stale).unlink()
    return sorted(names)


def _write_tensorboard(run_dir: Path, figs: dict, prototypes: np.ndarray | None) -> None:
    """The scoring's TensorBoard events (log.tensorboard): ROC, embeddings and prototypes."""
    from leakpipe.pipeline.engine import tboard  # optional: needs leakpipe[tensorboard]

    test, classes = figs["test"], figs["classes"]
    y = label_index(test, classes)
    fig_dir = run_dir / "figures"
    board = tboard.writer(run_dir / "tensorboard" / "score", fresh=True)
    opened = figs["open"]
    tboard.score(
        board,
        metrics.softmax(test.arrays["logits"].astype(np.float64)),
        y,
        classes,
        test.arrays["h_bar"],
        opened.arrays["h_bar"] if opened is not None else np.zeros((0, 1)),
        opened.labels if opened is not None else [],
        prototypes,
        fig_dir / "roc.png",
    )
    board.close()


def _write_scores(run_dir: Path, figs: dict) -> list[Path]:
    """The validation scores `attribute` ranks against, and the open-set scores `compare` pairs."""
    test, files = figs["test"], []
    with atomic_path(run_dir / CALIBRATION) as tmp:  # what `attribute` ranks an image's KDE log-density among
        save_file({"unseen_val_scores": np.ascontiguousarray(figs["unseen_val_scores"], dtype=np.float64)}, str(tmp))
    files.append(run_dir / CALIBRATION)
    if "kde_scores" in figs:  # for paired open-set comparisons between runs (`leakpipe compare`)
        rows = {"closed_rows": test.ids["row"], "open_rows": figs["open"].ids["row"]}
        scores = {f"{k}.{side}": v[side] for k, v in figs["kde_scores"].items() for side in ("closed", "open")}
        with atomic_path(run_dir / "open_scores.safetensors") as tmp:
            save_file(
                {
                    k: np.ascontiguousarray(v, dtype=np.float64 if "." in k else np.int64)
                    for k, v in {**rows, **scores}.items()
                },
                str(tmp),
            )
        files.append(run_dir / "open_scores.safetensors")
    else:
        (run_dir / "open_scores.safetensors").unlink(missing_ok=True)
    return files
