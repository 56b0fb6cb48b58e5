"""Stage three's numbers: the closed set per variant, the open set, the calibrated posterior, the
prediction sets and the unseen-generator p-values (report/decisions.py), the baselines, the leakage
audit, the prototypes and the data of the explanation figures, from the embeddings of a trained result.
What it reads comes through a Reader, which the score stage gives it (checked against the locks), so
everything here is computation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from leakpipe.pipeline.config import Config, VaeConfig
from leakpipe.pipeline.engine.images import BadImage, header_size, load_image
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.manifest import Manifest
from leakpipe.pipeline.math import bootstrap
from leakpipe.pipeline.math.prototypes import usage as prototype_usage
from leakpipe.pipeline.report import baselines as bl, decisions, evaluate as ev, failures
from leakpipe.pipeline.report.explain_figures import nearest_to_prototypes, prototype_thumbnails
from leakpipe.pipeline.store import latent_store

RANDOM_VAE_NOTE = (
    "This run's VAE has seeded random weights (the demo's or a test's), not a pretrained "
    "encoder: the numbers show the pipeline working, not Proto-LeakNet's accuracy."
)


class Reader(Protocol):
    """What scoring reads of one trained result and its workspace."""

    name: str  # the result's name (its fingerprint prefix)
    run_cfg: Config  # the config it was trained with
    random_vae: bool
    prototypes: np.ndarray | None  # (C, M, D), None for the linear head

    def split(self, name: str) -> tuple[ev.Split, dict]: ...  # embeddings with manifest columns and file hashes
    def manifest(self, name: str) -> Manifest: ...
    def manifest_path(self, name: str) -> Path: ...
    def store(self, name: str) -> str: ...  # the latent store of a split
    def contents(self, name: str) -> list[str]: ...  # the file hashes of a split's manifest rows
    def stage_features(self, rows: np.ndarray) -> dict: ...  # the backbone's features (Fig. 3)
    def autoencoder(self, source: str): ...  # a vae.source's encoder and decoder (the reconstruction baseline)


def evaluate(r: Reader, cfg: Config, have: list[str], notes: list[str]) -> tuple[dict, dict]:
    """(metrics, figure data) of the result `r` reads, under the `score` settings of `cfg`."""
    run_cfg = r.run_cfg
    if r.random_vae:
        notes = [RANDOM_VAE_NOTE, *notes]
    sets, attrs = _read_closed(r, cfg)
    notes = [*notes, *_seen_variants(r, run_cfg.train.variants, sets.held_out, sets.seen)]
    sets.tests = _test_sets(r, cfg, have, sets)
    m = _closed_metrics(r, cfg, sets, attrs, notes)
    figs = {"test": sets.tests["raw"], "classes": sets.classes, "open": None}
    kde = _open_set(r, cfg, have, sets, m, figs, notes)
    _decisions(r, cfg, have, sets, m, figs, kde)
    if cfg.score.baselines:
        m["baselines"] = _baselines(r, cfg, sets.by_part["train"], sets.tests["raw"], sets.classes)
        m["notes"] = [*m["notes"], *bl.notes(m["baselines"])]
    m["leakage"] = sets.leakage
    m["notes"] = [*m["notes"], *_leakage_notes(sets.leakage)]
    m["notes"] = [*m["notes"], *ev.chance_notes(m)]
    m["warnings"] = failures.warnings(m)
    prototypes = r.prototypes
    if prototypes is not None and len(sets.by_part["train"]):
        tr = sets.by_part["train"]
        m["prototypes"] = {
            **prototype_usage(tr.arrays["h_bar"], tr.arrays["w"], ev.label_index(tr, sets.classes), prototypes),
            "init": run_cfg.model.prototype_init,  # what the report's words on collapsed prototypes name
            "std": run_cfg.model.prototype_std,
        }
    figs.update(_explanation_data(r, cfg, sets.by_part["train"], sets.tests["raw"], sets.classes, prototypes))
    return m, figs


@dataclass
class _Sets:
    """The closed split's rows as the phases of `evaluate` read them: by partition (held-out generators
    left out), the tests by variant, and what the leakage audit left out of each set."""

    closed: Any
    classes: list[str]
    held_out: list[str]
    trained_on: np.ndarray
    by_part: dict
    seen: dict
    leakage: dict = field(default_factory=dict)
    tests: dict = field(default_factory=dict)

    def clean(self, s, name):
        """The rows the model never saw in any form; the others are counted and left out."""
        mask, self.leakage[name] = ev.leaked(s, self.seen)
        return s.select(~mask) if mask.any() else s  # no copy of a million clean rows


def _read_closed(r: Reader, cfg: Config) -> tuple[_Sets, dict]:
    """The closed split by partition, and what the model saw in training (the audit's reference)."""
    closed, attrs = r.split(cfg.score.closed)
    held_out = r.run_cfg.train.exclude
    trained_on = ~np.isin(closed.labels, held_out)  # a held-out generator's rows are never trained on
    by_part = {p: closed.select((closed.partition == p) & trained_on) for p in ("train", "val", "test")}
    seen = ev.seen_in_training(by_part["train"], by_part["val"])
    return _Sets(closed, attrs["classes"], held_out, trained_on, by_part, seen), attrs


def _test_sets(r: Reader, cfg: Config, have: list[str], sets: _Sets) -> dict:
    """The test sets by variant (raw, then each post-processed manifest's), each cleaned by the audit."""
    tests = {"raw": sets.clean(sets.by_part["test"], "raw")}
    for name in (s for s in cfg.score.postprocessed if s in have):
        pp, _ = r.split(name)
        clash = sorted(set(pp.variant) & tests.keys())
        if clash:
            raise UserError(
                f"{r.manifest_path(name)}: variant(s) {', '.join(clash)} also come from another "
                "scored manifest; give each post-processing step its own variant name"
            )
        pp = pp.select(~np.isin(pp.labels, sets.held_out))
        tests.update({v: sets.clean(pp.select(pp.variant == v), v) for v in sorted(set(pp.variant))})
    tests = {v: s for v, s in tests.items() if v == "raw" or len(s)}  # a set the audit emptied: counted, not scored
    if len(tests["raw"]) == 0:
        left = sets.leakage["raw"]["rows"]
        raise UserError(
            f"{r.manifest_path(cfg.score.closed)} has no valid test rows to score"
            + (f" ({left} test rows were seen in training and left out)" if left else "")
        )
    return tests


def _closed_metrics(r: Reader, cfg: Config, sets: _Sets, attrs: dict, notes: list[str]) -> dict:
    """The closed-set part of metrics.json: attribution with its comparator, the attention by class."""
    closed, classes, tests = sets.closed, sets.classes, sets.tests
    fit = np.isin(closed.partition, ev.MAHA_PARTS[cfg.score.maha_rows]) & sets.trained_on
    fit_rows = closed.select(fit, ("h_bar",))  # the comparator reads h_bar alone
    try:
        return {
            "result": r.name,
            "classes": classes,
            "timesteps": attrs["timesteps"],
            "notes": notes,
            "head": "prototypes" if r.run_cfg.model.prototypes else "linear",
            "closed": ev.closed_set(
                ev.comparator(fit_rows, classes, cfg.score), tests, classes, cfg.score.bootstrap, cfg.score.seed
            ),
            "mahalanobis": {
                "shared": cfg.score.maha_shared,
                "rows": cfg.score.maha_rows,
                "n": int(len(fit_rows)),
            },
            "attention": ev.attention_by_class(tests["raw"], classes),
            "invalid_rows": {cfg.score.closed: closed.n_invalid},
        }
    except ValueError as exc:
        raise UserError(f"run {r.name}: {exc}") from None


def _open_set(r: Reader, cfg: Config, have: list[str], sets: _Sets, m: dict, figs: dict, notes: list[str]):
    """The held-out generators and the open set (Eq. 16-17) into `m` and `figs`; returns the KDE of
    score.kde_embedding, fitted on the training rows."""
    closed, tests, train = sets.closed, sets.tests, sets.by_part["train"]
    kind = cfg.score.kde_embedding
    if sets.held_out:
        left_out = sets.clean(closed.select((closed.partition == "test") & ~sets.trained_on), "held_out")
        m["held_out"] = ev.held_out(train, tests["raw"], left_out, cfg.score)
    if cfg.score.open not in have:
        m["open_missing"] = next((n for n in notes if n.startswith("open")), "no open split")
        return ev.kde_for(train, kind, cfg.score)
    opened = sets.clean(r.split(cfg.score.open)[0], cfg.score.open)
    correct = tests["raw"].arrays["logits"].argmax(1) == ev.label_index(tests["raw"], sets.classes)
    res = ev.open_set(train, tests["raw"], opened, cfg.score, correct, sets.classes)
    m["open"] = res.metrics
    figs.update(open=opened, kde_scores=res.scores)
    return res.kdes[ev.SETTING_OF[kind]]


def _decisions(r: Reader, cfg: Config, have: list[str], sets: _Sets, m: dict, figs: dict, kde) -> None:
    """The decisions into `m`: the unseen-generator threshold, the calibration and the prediction sets."""
    kind, tests = cfg.score.kde_embedding, sets.tests
    try:
        unseen, figs["unseen_val_scores"] = ev.calibrate_unseen(kde, sets.by_part["val"], kind)
    except ValueError as exc:
        raise UserError(f"{r.manifest_path(cfg.score.closed)}: {exc}") from None
    s = (
        figs["kde_scores"][ev.SETTING_OF[kind]]
        if "kde_scores" in figs
        else {"closed": kde.score_samples(tests["raw"].embedding_rows(kind)), "open": None}
    )
    m["unseen_threshold"] = {**unseen, **decisions.unseen(figs["unseen_val_scores"], s["closed"], s["open"], cfg.score)}
    cal, pop = _calibration_rows(r, cfg, have, sets.by_part["val"], sets.held_out)
    m["calibration"] = decisions.calibration(cal, tests, sets.classes, cfg.score)
    m["conformal"] = decisions.prediction_sets(cal, tests, figs["open"], sets.classes, cfg.score, pop)
    m["notes"] = [*m["notes"], *decisions.notes(m)]


def _leakage_notes(leakage: dict) -> list[str]:
    """A note naming the rows the leakage audit left out, per set, when it left out any."""
    leaks = {k: v["rows"] for k, v in leakage.items() if v["rows"]}
    if not leaks:
        return []
    return [
        "Leakage audit: rows the model saw in training in some form (the same file, "
        "group or source image) were left out of every metric: "
        + ", ".join(f"{k}: {n}" for k, n in leaks.items())
        + "."
    ]


def _seen_variants(r: Reader, name: str, held_out: list[str], seen: dict[str, set]) -> list[str]:
    """The variants the model trained on (train.variants, as its config.json records it) are their images:
    their files, groups and names join what the audit counts as seen. A note when they cannot be read."""
    if name in ("", "auto"):  # "auto" in a stored config: trained before variants existed, on raw images
        return []
    try:
        m, content = r.manifest(name), r.contents(name)
    except UserError as exc:
        return [
            f"Leakage audit: the variants this result trained on ({name}) cannot be read ({exc}); test rows "
            "that copy them are not checked."
        ]
    groups = m.column("group") if m.has_column("group") else [""] * len(m)
    for part, label, path, file, group in zip(
        m.column("partition"), m.column("label"), m.column("path"), content, groups
    ):
        if part in ("train", "val") and label not in held_out:
            seen["content"].add(file)
            seen["source"].add(f"{name}:{path}")
            seen["group"] |= {group} - {""}
    return []


def _calibration_rows(r: Reader, cfg: Config, have: list[str], val, held_out: list[str]):
    """(the calibration images, their population): the val rows and, with score.variants (resolved), the
    val rows of the variants, each checked to copy a val row of the closed split (engine/variants.sources)."""
    name = cfg.score.variants
    if name not in have:
        cal = decisions.pooled(val, None)
        return cal, decisions.population(cal, "", False)
    from leakpipe.pipeline.engine.variants import sources  # torch: only when variants calibrate

    manifest = r.manifest(name)
    sources(r.manifest(cfg.score.closed), manifest)  # a variant keeps its image's partition
    variants, _ = r.split(name)
    cal = decisions.pooled(val, variants.select((variants.partition == "val") & ~np.isin(variants.labels, held_out)))
    drawn = manifest.column("ops") if manifest.has_column("ops") else []  # every variant: the families drawn from
    return cal, decisions.population(cal, name, cfg.score.levels, drawn)


FIG3_ROWS = 2000  # closed test rows drawn in the per-stage maps (evenly spaced), enough for a 2-D map
GALLERY_K = 3  # training images shown per prototype


def _explanation_data(r: Reader, cfg: Config, train, test, classes: list[str], prototypes: np.ndarray | None) -> dict:
    """Data of the explanation figures: per-stage features of the closed test rows (Fig. 3) and, with
    prototypes, the training images each one wins, nearest first (gallery)."""
    label_index = ev.label_index
    pick = np.unique(np.linspace(0, len(test) - 1, min(len(test), FIG3_ROWS)).astype(int))
    out = {"stages": r.stage_features(test.ids["row"][pick]), "stage_labels": label_index(test, classes)[pick]}
    if prototypes is not None and len(train):
        near = nearest_to_prototypes(
            train.arrays["h_bar"], train.arrays["w"], label_index(train, classes), prototypes, GALLERY_K
        )
        manifest = r.manifest(cfg.score.closed)
        out["gallery"] = prototype_thumbnails(
            near, lambda i: manifest.abspath(int(train.ids["row"][i])), cfg.preprocess
        )
    return out


def _baselines(r: Reader, cfg: Config, train, test, classes: list[str]) -> dict:
    """Chance, the forensic pixel baseline and a linear probe on z0, fitted on the closed training rows and
    scored, paired with the model, on the same (leakage-audited) test rows."""
    ytr, yte = ev.label_index(train, classes), ev.label_index(test, classes)
    m = r.manifest(cfg.score.closed)
    store = latent_store.open_store(r.store(cfg.score.closed))
    try:
        pixels = [
            bl.forensic_matrix(
                [m.abspath(int(i)) for i in s.ids["row"]], cfg.score.baseline_max_side, cfg.preprocess.max_pixels
            )
            for s in (train, test)
        ]
        means = [latent_store.read_rows(store, s.ids["row"])["mean"] for s in (train, test)]
    except (OSError, BadImage, latent_store.DamagedRows) as exc:
        return {"chance": 1 / len(classes), "skipped": f"baselines left out: {exc}"}
    w = bootstrap.Resamples(cfg.score.bootstrap, cfg.score.seed, test.groups) if cfg.score.bootstrap else None
    right = {
        "head": test.arrays["logits"].argmax(1) == yte,
        "forensic": bl.probe(pixels[0], ytr, pixels[1]) == yte,
        "z0_probe": bl.probe(means[0].reshape(len(train), -1), ytr, means[1].reshape(len(test), -1)) == yte,
    }
    out: dict[str, Any] = {
        "chance": 1 / len(classes),
        "forensic_max_side": cfg.score.baseline_max_side,
        "z0_is_pixels": r.run_cfg.vae.source == "pixels",
    }
    recon = _reconstruction(r, cfg, [[m.abspath(int(i)) for i in s.ids["row"]] for s in (train, test)], means)
    if isinstance(recon, str):
        out["reconstruction_skipped"] = recon
    elif recon is not None:
        right["reconstruction"] = bl.probe(recon[0], ytr, recon[1]) == yte
        out["reconstruction_of"] = {"autoencoders": list(cfg.score.reconstruction), **bl.RECONSTRUCTION_ABOUT}
        out["reconstruction_max_side"] = cfg.score.reconstruction_max_side
    out.update({k: bl.scored(v, w) for k, v in right.items()})
    if w is not None:
        for a, b in bl.PAIRS:
            if a in right and b in right:
                out[f"{a}_minus_{b}"] = bl.paired_difference(right[a], right[b], w)
    return out


def _reconstruction(r: Reader, cfg: Config, paths: list[list], means: list) -> list[np.ndarray] | str | None:
    """The reconstruction baseline's features of the train and test files (`means`: their z0 as stage one
    cached it), a note saying why it was left out, or None where score.reconstruction lists no autoencoder."""
    if not cfg.score.reconstruction:
        return None
    try:
        autoencoders = [r.autoencoder(source) for source in cfg.score.reconstruction]
        return [
            bl.reconstruction_matrix(
                p,
                autoencoders,
                cfg.score.reconstruction_max_side,
                cfg.preprocess.max_pixels,
                [_cached_encoding(r.run_cfg, source, p, z0) for source in cfg.score.reconstruction],
            )
            for p, z0 in zip(paths, means)
        ]
    except (OSError, BadImage, UserError) as exc:
        return f"the reconstruction baseline is left out: {exc}"


def _cached_encoding(run_cfg: Config, source: str, paths: list, z0: np.ndarray):
    """baselines.round_trips' `cached` for the autoencoder `source`: file i's z0 where stage one's encoder
    is that autoencoder (the same settings, stored in float32) and read the very pixels the baseline reads
    (the same decoded image, neither resized nor cropped otherwise); None where the encoder is another. A
    reconstruction through the workspace's own encoder then runs two passes an image, not three (the demo:
    320 fewer encodes, 2-3 s of its minute). A store that stage one wrote on a GPU holds that device's
    arithmetic (TF32 convolutions, PyTorch's default there), as the model's own z0 does."""
    if run_cfg.vae != VaeConfig(source=source) or run_cfg.store.dtype != "float32":
        return None
    side = run_cfg.preprocess.size

    def cached(i: int, x: np.ndarray) -> np.ndarray | None:
        # stage one's image is side x side, all of it only where the file is (else resized or cropped
        # elsewhere): any other file is not decoded a second time
        if x.shape[:2] != (side, side) or header_size(paths[i]) != (side, side):
            return None
        try:
            same = np.array_equal(load_image(paths[i], run_cfg.preprocess), x)
        except BadImage:
            return None
        return z0[i] if same else None

    return cached
