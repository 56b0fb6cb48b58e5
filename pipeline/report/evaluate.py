"""Stage three's evaluation on saved embeddings: closed set per variant, open set, calibration.

Everything here takes arrays and returns numbers (and the arrays the figures need); reading the
stores and writing the report happen in stages/score.py and pipeline/report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from leakpipe.pipeline.math import metrics
from leakpipe.pipeline.report import registry
from leakpipe.pipeline.math.kde import EmbeddingRows, GaussianKDE
from leakpipe.pipeline.math.mahalanobis import Mahalanobis

# the open-set settings and the embedding each one uses (Eq. 16-17 on h_bar, or on h_bar * w)
GATING = {"gating_off": "h_bar", "gating_on": "gated"}
SETTING_OF = {kind: setting for setting, kind in GATING.items()}

DUAL_WARNING = (
    "the 'dual' open-set setting scores closed samples with gated embeddings and open "
    "samples with ungated ones, so it uses each sample's ground-truth domain: it is not a "
    "detector and its numbers cannot be compared with a deployable method"
)


@dataclass
class Split:
    """The valid rows of one embedded split: arrays from the store plus manifest columns."""

    name: str
    arrays: dict  # h_bar, w, a_t, logits, pi, d_min: (n, ...)
    labels: np.ndarray  # str
    partition: np.ndarray
    variant: np.ndarray
    n_invalid: int = 0
    # per row: "path", "group", "source" (manifest columns, "" if absent) and "content" (file hash)
    ids: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: np.ndarray, arrays: tuple[str, ...] | None = None) -> "Split":
        """The rows of `mask`; with `arrays`, only those arrays (the others are not copied)."""
        return Split(
            self.name,
            {k: v[mask] for k, v in self.arrays.items() if arrays is None or k in arrays},
            self.labels[mask],
            self.partition[mask],
            self.variant[mask],
            0,
            {k: v[mask] for k, v in self.ids.items()},
        )

    @property
    def groups(self) -> np.ndarray | None:
        """The rows' groups when every row has one (bootstrap then resamples groups), else None."""
        g = self.ids.get("group")
        return g if g is not None and len(g) and all(g) else None

    def embedding(self, kind: str) -> np.ndarray:
        return self.embedding_rows(kind)[:]

    def embedding_rows(self, kind: str) -> EmbeddingRows:
        """`embedding(kind)` of the rows that what reads it (the KDE, the comparator's scores) asks for
        at a time: no float64 copy of every row."""
        return EmbeddingRows(self.arrays["h_bar"], self.arrays.get("w"), kind)


def label_index(split: Split, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(split.labels) - index.keys())
    if unknown:
        raise ValueError(f"{split.name}: labels not among the trained classes: {', '.join(unknown)}")
    return np.array([index[c] for c in split.labels], np.int64)


MAHA_PARTS = {"train": ("train",), "train_val": ("train", "val")}  # score.maha_rows: the partitions fitted on


def comparator(rows: Split, classes: list[str], cfg_score) -> Mahalanobis:
    """The Mahalanobis comparator of `score.maha_shared`, fitted on `rows` (those of score.maha_rows)."""
    maha = Mahalanobis(len(classes), cfg_score.maha_floor, cfg_score.maha_shared)
    return maha.fit(rows.embedding("h_bar"), label_index(rows, classes))


def closed_set(maha: Mahalanobis, tests: dict[str, Split], classes: list[str], n_boot: int = 0, seed: int = 0) -> dict:
    """Per variant: every closed-set metric of the registry for the model's head (scores: the posterior
    pi) and the fitted Mahalanobis comparator `maha` (scores: its s_c); with `n_boot`, 95% bootstrap
    intervals over the test images (`ci`), and the chance level of each number (`chance`); plus the row
    count and the confusion matrix."""
    out = {}
    for variant, s in tests.items():
        y = label_index(s, classes)
        out[variant] = {}
        for scorer, scores, posterior in (
            ("head", metrics.softmax(s.arrays["logits"].astype(np.float64)), True),
            ("mahalanobis", maha.score(s.embedding_rows("h_bar")), False),
        ):
            sample = registry.Closed(scores, y, len(classes), posterior)
            r = registry.evaluate(registry.CLOSED, sample, len(classes), n_boot, seed, s.groups) if len(y) else {}
            out[variant][scorer] = {
                "n": int(len(y)),
                **r,
                "confusion": metrics.confusion_matrix(scores.argmax(1), y, len(classes)).tolist(),
            }
    return out


def open_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int) -> list[dict]:
    """Every open-set metric of the registry (closed test positive, open negative) with its interval,
    resampling closed and open images, of each (closed, open) pair of scores of the same rows (the same
    resamples, drawn once); OVL's interval is the basic one around the estimate (the percentile interval
    covered a known overlap only 65% of the time, the basic one 91%)."""
    samples = [registry.Open(closed, opened) for closed, opened in pairs]
    rs = registry.evaluate_all(registry.OPEN, samples, 2, n_boot, seed)
    return [{"n_closed": int(len(c)), "n_open": int(len(o)), **r} for (c, o), r in zip(pairs, rs)]


def per_generator(pairs: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, cfg) -> list[dict]:
    """Open-set AUROC of each unseen generator against the whole closed test set, with its interval, for
    each (closed, open) pair of scores of the same rows: one easy generator cannot hide a hard one in the
    pooled number."""
    outs: list[dict] = [{} for _ in pairs]
    for g in sorted(set(labels)):
        samples = [registry.Open(closed, opened[labels == g]) for closed, opened in pairs]
        rs = registry.evaluate_all(registry.OPEN, samples, 2, cfg.bootstrap, cfg.seed, only=("auroc",))
        for out, r in zip(outs, rs):
            out[str(g)] = {"n": int((labels == g).sum()), **{k: v for k, v in r.items() if k != "chance"}}
    return outs


HELD_OUT_NOTE = (
    "Leave-one-generator-out: each generator named here was left out of training (train.exclude) "
    "and its closed test images are scored as an unseen generator against the other generators' "
    "test images, by the same KDE as the open set. It measures open-set detection on generators "
    "of the same data set without using any sample's ground truth at scoring time: the honest "
    "replacement for the paper's 'dual' setting"
)


def held_out(train: Split, closed_test: Split, left_out: Split, cfg) -> dict:
    """Open-set AUROC (with its interval) of each held-out generator's test rows against the closed test
    rows of the generators trained on, per KDE setting (gating off and on)."""
    out: dict = {"note": HELD_OUT_NOTE}
    kdes = {name: kde_for(train, kind, cfg) for name, kind in GATING.items()}
    pairs = [
        (kde.score_samples(closed_test.embedding_rows(kind)), kde.score_samples(left_out.embedding_rows(kind)))
        for kde, kind in zip(kdes.values(), GATING.values())
    ]
    for (name, kde), r in zip(kdes.items(), per_generator(pairs, left_out.labels, cfg)):
        out[name] = r
        for v in r.values():
            v["bandwidth"], v["kde_reference"] = kde.bandwidth_, kde.reference
    return out


def seen_in_training(train: Split, val: Split) -> dict[str, set]:
    """What the model saw while it was fitted and selected: contents, groups and row ids."""
    seen = {"content": set(), "group": set(), "source": set()}
    for s in (train, val):
        seen["content"] |= set(s.ids.get("content", ()))
        seen["group"] |= {g for g in s.ids.get("group", ()) if g}
        seen["source"] |= {f"{s.name}:{p}" for p in s.ids.get("path", ())}
    return seen


def leaked(s: Split, seen: dict[str, set]) -> tuple[np.ndarray, dict]:
    """(mask of rows the model saw in training in some form, counts by how): the same file content,
    the same group (a prompt, a source photo), or a post-processed copy of a training image."""
    how = {
        "content": np.array([c in seen["content"] for c in s.ids.get("content", [""] * len(s))], bool),
        "group": np.array([bool(g) and g in seen["group"] for g in s.ids.get("group", [""] * len(s))], bool),
        "source": np.array([bool(x) and x in seen["source"] for x in s.ids.get("source", [""] * len(s))], bool),
    }
    mask = how["content"] | how["group"] | how["source"]
    return mask, {
        "rows": int(mask.sum()),
        **{k: int(v.sum()) for k, v in how.items()},
        "examples": [str(p) for p in s.ids.get("path", np.array([]))[mask][:3]],
    }


def chance_notes(m: dict) -> list[str]:
    """Plain-words warnings for headline numbers whose 95% interval includes chance."""
    notes = []
    raw = m["closed"].get("raw", {}).get("head", {})
    for key, name in (("top1", "top-1"), ("macro_auc", "macro AUC")):
        lo, hi = raw.get("ci", {}).get(key, [np.nan, np.nan])
        chance = raw.get("chance", {}).get(key)
        if chance is not None and lo <= chance <= hi:
            notes.append(
                f"The 95% interval of the closed-set {name} ({lo:.3f} to {hi:.3f}) includes chance "
                f"({chance:.3f}): on this test set the model is not shown to attribute better than guessing."
            )
    for kind, r in m.get("open", {}).items():
        lo, hi = r.get("ci", {}).get("auroc", [np.nan, np.nan])
        if kind != "dual" and lo <= 0.5 <= hi:
            notes.append(
                f"The 95% interval of the open-set AUROC ({kind}: {lo:.3f} to {hi:.3f}) includes chance "
                "(0.5): unseen generators are not shown to be told apart from known ones."
            )
    return notes


@dataclass
class OpenSet:
    """KDE open-set analysis: per embedding kind, the fitted KDE and the log-densities."""

    kdes: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)  # kind -> {"closed": ..., "open": ...}
    metrics: dict = field(default_factory=dict)


def kde_for(train: Split, kind: str, cfg) -> GaussianKDE:
    kde = GaussianKDE(
        bandwidth=cfg.kde_bandwidth or None,
        grid_factors=tuple(cfg.kde_grid),
        folds=cfg.kde_folds,
        seed=cfg.seed,
        dtype=cfg.kde_dtype,
        max_reference=cfg.kde_max_reference,
    )
    return kde.fit(train.embedding_rows(kind))


def open_set(
    train: Split, closed_test: Split, opened: Split, cfg, correct: np.ndarray | None = None, classes=None
) -> OpenSet:
    """Eq. 16-17, 19-20: closed test (positive) vs open samples, gating off and on (and dual if asked);
    with `correct` (the head's attribution of each closed test row), the OSCR curve too; with `classes`,
    the open-set baselines beside them (OPEN_BASELINES)."""
    res = OpenSet()
    for name, kind in GATING.items():
        kde = kde_for(train, kind, cfg)
        res.kdes[name] = kde
        res.scores[name] = {
            "closed": kde.score_samples(closed_test.embedding_rows(kind)),
            "open": kde.score_samples(opened.embedding_rows(kind)),
        }
        res.metrics[name] = {"bandwidth": kde.bandwidth_, "kde_reference": kde.reference, "cv": kde.cv}
    if classes is not None:
        res.scores.update(open_baselines(train, closed_test, opened, classes))
    for name, scored in scored_open(res.scores, opened.labels, cfg, correct).items():
        res.metrics[name] = {**scored, **res.metrics.get(name, {})}
    if cfg.dual:
        closed, opened_ = dual_scores(closed_test.embedding("gated"), opened.embedding("h_bar"))
        res.metrics["dual"] = {
            **open_metrics([(closed, opened_)], 0, cfg.seed)[0],
            "warning": DUAL_WARNING,
            "as": "the authors' released open_set.py, mode 'dual'",
        }
    return res


def scored_open(scores: dict, labels: np.ndarray, cfg, correct) -> dict:
    """{name: every open-set metric of one score (higher: known), per unseen generator too, and its OSCR
    curve when `correct` is given} for each of `scores` ({name: {"closed": ..., "open": ...}}, the same
    rows scored each way: they share their resamples)."""
    pairs = [(s["closed"], s["open"]) for s in scores.values()]
    out = {}
    for name, o, g, (closed, opened) in zip(
        scores, open_metrics(pairs, cfg.bootstrap, cfg.seed), per_generator(pairs, labels, cfg), pairs
    ):
        out[name] = {**o, "per_generator": g}
        if correct is not None:
            fpr, ccr, area = metrics.oscr(closed, correct, opened)
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 101)).astype(int))
            out[name]["oscr"] = {"area": area, "fpr": fpr[keep].tolist(), "ccr": ccr[keep].tolist()}
    return out


# open-set scores beside the KDE, on the same rows: what a forensic examiner would try first. On TAEF2
# latents the KDE sits at or below chance while both of these are far above it (benchmarks/RESULTS.md,
# "Why the open set fails on TAEF2 latents"); they are reported, the flag still reads the KDE
OPEN_BASELINES = {
    "mahalanobis": "minus the Mahalanobis distance of h_bar to the nearest class mean, one Ledoit-Wolf covariance "
    "shared by the classes, fitted on the training rows (Lee et al., NeurIPS 2018)",
    "max_softmax": "the head's largest class posterior (Hendrycks and Gimpel, ICLR 2017)",
}


def open_baselines(train: Split, closed_test: Split, opened: Split, classes: list[str]) -> dict:
    """{name: {"closed": scores, "open": scores}} of OPEN_BASELINES (higher: known)."""
    maha = Mahalanobis(len(classes), shared=1.0).fit(train.embedding("h_bar"), label_index(train, classes))
    out = {"mahalanobis": {}, "max_softmax": {}}
    for side, s in (("closed", closed_test), ("open", opened)):
        out["mahalanobis"][side] = maha.score(s.embedding_rows("h_bar")).max(1)
        out["max_softmax"][side] = metrics.softmax(s.arrays["logits"].astype(np.float64)).max(1)
    return out


AUTHORS_BANDWIDTHS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)  # open_set.py --bw-grid default


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def dual_scores(closed_gated: np.ndarray, open_plain: np.ndarray, folds: int = 5, seed: int = 42):
    """The authors' "dual" open set, as their released open_set.py computes it: closed samples embedded
    with gating (h_bar * w), open samples without (h_bar); the KDE reference is the closed set being
    scored itself, its bandwidth the best 5-fold held-out likelihood over AUTHORS_BANDWIDTHS, the
    closed scores out-of-fold and the open scores from a KDE on every closed sample. Returns
    (closed log-densities, open log-densities)."""
    parts = _folds(len(closed_gated), folds, seed)

    def held_out(bw: float) -> np.ndarray:
        out = np.empty(len(closed_gated))
        for test in parts:
            train = np.setdiff1d(np.arange(len(closed_gated)), test)
            out[test] = GaussianKDE(bandwidth=bw).fit(closed_gated[train]).score_samples(closed_gated[test])
        return out

    bw = max(AUTHORS_BANDWIDTHS, key=lambda b: held_out(b).mean())
    return held_out(bw), GaussianKDE(bandwidth=bw).fit(closed_gated).score_samples(open_plain)


def calibrate_unseen(kde: GaussianKDE, val: Split, kind: str) -> tuple[dict, np.ndarray]:
    """(the unseen KDE's record, the closed validation images' log-densities): an image's conformal
    p-value is its log-density's rank among them (report/decisions.unseen)."""
    scores = kde.score_samples(val.embedding_rows(kind))
    if len(scores) == 0:
        raise ValueError("no validation embeddings to calibrate the unseen-generator flag on")
    return {
        "embedding": kind,
        "bandwidth": kde.bandwidth_,
        "kde_reference": kde.reference,
        "n_val": int(len(scores)),
    }, np.sort(scores)


def attention_by_class(s: Split, classes: list[str]) -> list[list[float]]:
    """Mean temporal attention a_t (Eq. 6-7) per class (rows) and timestep (columns)."""
    y = label_index(s, classes)
    return [s.arrays["a_t"][y == c].mean(0).tolist() if (y == c).any() else [] for c in range(len(classes))]
