"""The metric registry: every number the report states, defined once.

A Metric names its key (in metrics.json), its label (in tables), its weighted function (math/metrics.py:
the point estimate is the function with unit weights, the bootstrap the same function on resampled
weights), its chance level, its direction and its interval. metrics.json, the report's tables and the
`compare` and `sweep` columns are generated from CLOSED and OPEN: adding a metric is adding it here
(and a test of its function).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from leakpipe.pipeline.math import bootstrap, metrics


@dataclass
class Closed:
    """One scorer's class scores (n, C) on labelled rows; `probabilities`: the scores are a posterior."""

    scores: np.ndarray
    labels: np.ndarray
    n_classes: int
    probabilities: bool = False

    @cached_property
    def correct(self) -> np.ndarray:
        return self.scores.argmax(1) == self.labels

    @cached_property
    def calibration_terms(self) -> np.ndarray:
        """metrics.calibration_terms of these rows: built once, not for every block of resamples (1 M rows:
        a 360 MB matrix)."""
        return metrics.calibration_terms(self.scores, self.labels)

    def per_class_auc(self, w: np.ndarray) -> np.ndarray:
        """metrics.per_class_auc on these resamples, computed once for both metrics that read it."""
        if getattr(self, "_auc_of", None) is not w:
            self._auc_of, self._auc = w, metrics.per_class_auc(self.scores, self.labels, w)
        return self._auc

    def forget(self) -> None:
        """Drops what was computed once for a block of resamples (its metrics are done)."""
        self._auc_of = self._auc = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Open:
    """KDE log-densities of closed (known, positive) and open (unseen) rows; weights cover closed first."""

    closed: np.ndarray
    opened: np.ndarray

    @cached_property
    def scores(self) -> np.ndarray:
        return np.r_[self.closed, self.opened]

    @cached_property
    def positive(self) -> np.ndarray:
        return np.r_[np.ones(len(self.closed), bool), np.zeros(len(self.opened), bool)]

    def roc_counts(self, w: np.ndarray):
        """metrics.roc_counts on these resamples, computed once for the metrics that read the ROC."""
        if getattr(self, "_roc_of", None) is not w:
            self._roc_of, self._roc = w, metrics.roc_counts(self.scores, self.positive, w)
        return self._roc

    def forget(self) -> None:
        """Drops the ROC of a block of resamples (its metrics are done): two (rows, block) arrays."""
        self._roc_of = self._roc = None

    @cached_property
    def ovl_kernels(self):
        """OVL's kernels and grid, made once for the estimate and every block of resamples."""
        return metrics.ovl_kernels(self.closed, self.opened)

    def __len__(self) -> int:
        return len(self.closed) + len(self.opened)


@dataclass
class Sets:
    """Conformal prediction sets (n, C boolean) of labelled rows."""

    sets: np.ndarray
    labels: np.ndarray
    n_classes: int

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Flags:
    """The unseen-generator flag (p-value <= alpha) on closed (known) and open (unseen) rows; weights
    cover closed first."""

    closed: np.ndarray
    opened: np.ndarray

    def __len__(self) -> int:
        return len(self.closed) + len(self.opened)


@dataclass(frozen=True)
class Metric:
    key: str  # its name in metrics.json
    label: str  # its name in tables
    fn: Callable  # (sample, w (B, n)) -> (B,) values, or (B, C) for a per-class metric
    chance: Callable[[int], float | None] = lambda n_classes: None  # what guessing scores
    higher_is_better: bool = True
    interval: str = "percentile"  # or "basic": reflected around the estimate (biased estimators: OVL)
    applies: Callable[[object], bool] = lambda sample: True  # top-5 needs > 5 classes, ECE a posterior
    compare: bool = False  # a column of `leakpipe compare` and the sweep table
    table: bool = True  # a column of the report's main table (per-class metrics have their own)
    per_class: bool = False


CLOSED: tuple[Metric, ...] = (
    Metric("top1", "top-1", lambda s, w: metrics.top1(s.correct, w), lambda c: 1 / c, compare=True),
    Metric(
        "top5",
        "top-5",
        lambda s, w: metrics.top_k(s.scores, s.labels, 5, w),
        lambda c: 5 / c,
        applies=lambda s: s.n_classes > 5,
    ),
    Metric(
        "balanced_accuracy",
        "balanced accuracy",
        lambda s, w: metrics.balanced_accuracy(s.scores.argmax(1), s.labels, s.n_classes, w),
        lambda c: 1 / c,
    ),
    Metric(
        "macro_auc", "macro AUC", lambda s, w: metrics.macro_auc(s.scores, s.labels, w), lambda c: 0.5, compare=True
    ),
    Metric(
        "ece",
        "ECE",
        lambda s, w: metrics.ece_of(s.calibration_terms, w),
        higher_is_better=False,
        applies=lambda s: s.probabilities,
    ),
    Metric(
        "per_class_auc",
        "one-vs-rest AUC",
        lambda s, w: s.per_class_auc(w),
        lambda c: 0.5,
        table=False,
        per_class=True,
    ),
)

OPEN: tuple[Metric, ...] = (
    Metric("auroc", "AUROC", lambda s, w: metrics.auroc(s.scores, s.positive, w), lambda c: 0.5, compare=True),
    Metric(
        "eer",
        "EER",
        lambda s, w: metrics.eer(s.scores, s.positive, w, s.roc_counts(w)),
        lambda c: 0.5,
        higher_is_better=False,
    ),
    Metric(
        "ovl",
        "OVL",
        lambda s, w: metrics.ovl(s.closed, s.opened, w, s.ovl_kernels),
        higher_is_better=False,
        interval="basic",
    ),
    Metric(
        "fpr_at_95tpr",
        "FPR@95%TPR",
        lambda s, w: metrics.fpr_at_tpr(s.scores, s.positive, w, counts=s.roc_counts(w)),
        lambda c: 0.95,
        higher_is_better=False,
    ),
)


# split-conformal prediction sets at level 1 - score.alpha (report/decisions.py)
CONFORMAL: tuple[Metric, ...] = (
    Metric("coverage", "set coverage", lambda s, w: metrics.coverage(s.sets, s.labels, w), compare=True),
    Metric("set_size", "mean set size", lambda s, w: metrics.set_size(s.sets, w), higher_is_better=False, compare=True),
    Metric(
        "per_class_coverage",
        "coverage per class",
        lambda s, w: metrics.per_class_coverage(s.sets, s.labels, s.n_classes, w),
        table=False,
        per_class=True,
    ),
)

# the unseen-generator flag at conformal p <= score.alpha: its error rate on known generators, its power
UNSEEN: tuple[Metric, ...] = (
    Metric(
        "false_alarm_rate",
        "unseen flag: false alarms",
        lambda s, w: metrics.fraction(s.closed, w[:, : len(s.closed)]),
        higher_is_better=False,
        compare=True,
    ),
    Metric(
        "detection_rate",
        "unseen flag: detected",
        lambda s, w: metrics.fraction(s.opened, w[:, len(s.closed) :]),
        applies=lambda s: len(s.opened) > 0,
        compare=True,
    ),
)


def _listed(x):
    return np.asarray(x).tolist() if np.ndim(x) else float(x)


def evaluate(
    registry: tuple[Metric, ...],
    sample,
    n_classes: int = 2,
    n_boot: int = 0,
    seed: int = 0,
    groups: np.ndarray | None = None,
    only: tuple[str, ...] | None = None,
) -> dict:
    """{key: value, "ci": {key: [low, high]}, "chance": {key: c}} of every metric of `registry` that
    applies to `sample` (or of `only` these keys), with 95% bootstrap intervals over `n_boot`
    resamples of its rows (whole groups when `groups`), drawn in blocks of bounded memory."""
    return evaluate_all(registry, [sample], n_classes, n_boot, seed, groups, only)[0]


def evaluate_all(
    registry: tuple[Metric, ...],
    samples: list,
    n_classes: int = 2,
    n_boot: int = 0,
    seed: int = 0,
    groups: np.ndarray | None = None,
    only: tuple[str, ...] | None = None,
) -> list[dict]:
    """`evaluate` of each of `samples`, which have as many rows (one scorer's or setting's scores of the
    same rows, in the same order): they share the same resamples, and each block of them is drawn once
    for all (at a million rows, drawing the resamples costs more than most metrics)."""
    if len({len(s) for s in samples}) > 1:
        raise ValueError(f"samples of {sorted({len(s) for s in samples})} rows cannot share resamples")
    chosen = [[m for m in registry if m.applies(s) and (only is None or m.key in only)] for s in samples]
    outs = []
    for sample, ms in zip(samples, chosen):
        unit = metrics.unit(len(sample))
        out: dict = {m.key: _listed(m.fn(sample, unit)[0]) for m in ms}
        out["chance"] = {m.key: m.chance(n_classes) for m in ms if m.chance(n_classes) is not None}
        outs.append(out)
    if n_boot and samples and len(samples[0]):
        values = [{m.key: [] for m in ms} for ms in chosen]
        for w in bootstrap.blocks(len(samples[0]), n_boot, seed, groups):
            for sample, ms, v in zip(samples, chosen, values):
                for m in ms:
                    v[m.key].append(m.fn(sample, w))
                getattr(sample, "forget", lambda: None)()
        for out, ms, v in zip(outs, chosen, values):
            out["ci"] = {m.key: _interval(m, out[m.key], np.concatenate(v[m.key])) for m in ms}
    return outs


def _interval(m: Metric, estimate, values: np.ndarray):
    if m.per_class:
        return [bootstrap.interval(col) for col in values.T]
    return bootstrap.basic_interval(estimate, values) if m.interval == "basic" else bootstrap.interval(values)


def headline(registry: tuple[Metric, ...]) -> list[Metric]:
    """The metrics `compare` and the sweep show, in order."""
    return [m for m in registry if m.compare]


def tabled(registry: tuple[Metric, ...]) -> list[Metric]:
    """The metrics of the report's main table for this registry, in order."""
    return [m for m in registry if m.table]
