"""TensorBoard event files (log.tensorboard = true): training curves, then the score's curves and
embedding projector, under each result's tensorboard/ folder. Optional: leakpipe[tensorboard]."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from leakpipe.pipeline.errors import UserError

INSTALL = "pip install 'leakpipe[tensorboard]' (or pip install tensorboard)"


def writer(folder: Path, purge_step: int | None = None, fresh: bool = False):
    """A SummaryWriter on `folder` (emptied first when `fresh`); a clear error without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            f"log.tensorboard = true needs TensorBoard, which is not installed: {INSTALL}; "
            "or set log.tensorboard = false"
        ) from None
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    return SummaryWriter(str(folder), purge_step=purge_step)


def epoch(w, step: int, fit: dict, val: dict, auc: float, lr: float, timesteps: list[int]) -> None:
    """One training epoch: loss, accuracy, validation macro AUC, learning rate, mean a_t per timestep
    and the distribution of the gates w, on the validation set."""
    w.add_scalar("train/loss", fit["loss"], step)
    w.add_scalar("train/accuracy", fit["acc"], step)
    w.add_scalar("val/macro_auc", auc, step)
    w.add_scalar("train/learning_rate", lr, step)
    for t, a in zip(timesteps, np.asarray(val["a_t"]).mean(0)):
        w.add_scalar(f"attention/a_t_mean_t{t}", float(a), step)
    w.add_histogram("gates/w", np.asarray(val["w"]), step)
    w.flush()


def score(
    w,
    probs: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    test_h: np.ndarray,
    open_h: np.ndarray,
    open_labels,
    prototypes: np.ndarray | None,
    roc_png: Path,
) -> None:
    """The score's one-vs-rest PR curves and ROC figure, and the projector: h_bar of the closed test and
    open rows with their labels, plus the prototypes."""
    import matplotlib.image

    for c, name in enumerate(classes):
        w.add_pr_curve(f"closed_test/pr/{name}", (y == c).astype(np.int64), probs[:, c], 0)
    w.add_image("closed_test/roc", matplotlib.image.imread(str(roc_png))[..., :3], 0, dataformats="HWC")
    mats, meta = [test_h], [[classes[k], "closed test"] for k in y]
    if len(open_h):
        mats.append(open_h)
        meta += [[str(g), "open"] for g in open_labels]
    if prototypes is not None:
        mats.append(prototypes.reshape(-1, prototypes.shape[-1]))
        meta += [[classes[c], f"prototype {m}"] for c in range(prototypes.shape[0]) for m in range(prototypes.shape[1])]
    w.add_embedding(
        np.concatenate(mats).astype(np.float32),
        metadata=meta,
        metadata_header=["generator", "set"],
        tag="h_bar",
        global_step=0,
    )
    w.flush()
