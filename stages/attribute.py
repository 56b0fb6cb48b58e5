"""`leakpipe attribute IMAGE...`: one-off attribution with the three-level explanation (Eq. 14-15).

Uses a scored run: its VAE config encodes the images exactly as stage one would (same preprocessing,
same stored dtype), each image gets the seeded eval noise of its content hash, and what `score`
fitted on the validation partition is applied: the temperature (calibrated posterior), the conformal
thresholds (prediction set at level 1 - score.alpha) and the validation KDE scores (the unseen
p-value, flagged at p <= score.alpha), from the run's metrics.json and calibration.safetensors. Where
the run's figures or decisions fail (report/failures.py), every result says so in words.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from leakpipe.pipeline.engine import attributor as att_lib
from leakpipe.pipeline.engine.attributor import Attributor
from leakpipe.pipeline.engine.images import conversions
from leakpipe.pipeline.engine.vae import resolve_device
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import code as code_id, runs
from leakpipe.pipeline.ledger.graph import Graph
from leakpipe.pipeline.engine.trained import load_trained
from leakpipe.pipeline.ledger.results import load_checked_scores
from leakpipe.pipeline.report.scored import load_metrics, load_split
from leakpipe.pipeline.math import calibration as calib, conformal
from leakpipe.pipeline.math.kde import embedding
from leakpipe.pipeline.report import decisions
from leakpipe.pipeline.report.evaluate import label_index
from leakpipe.pipeline.store.hashing import hash_file
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.autoencoders import load_encoder
from leakpipe.pipeline.config_files import parse_override, with_overrides


def load_images(paths: list[Path], preprocess) -> np.ndarray:
    """All images as (N, H, W, 3) uint8, or one error naming every bad path."""
    from leakpipe.pipeline.engine.images import BadImage, read_image

    images, problems = [], []
    for p in paths:
        if Path(p).is_dir():
            problems.append(f"{p}: a folder, not an image file; give its images (e.g. {Path(p) / '*.png'})")
            continue
        if not Path(p).is_file():
            problems.append(f"{p}: no such file")
            continue
        try:
            images.append(read_image(p, preprocess))
        except BadImage as exc:
            problems.append(str(exc) if str(p) in str(exc) else f"{p}: {exc}")
    if problems:
        raise UserError(f"{len(problems)} of {len(paths)} inputs cannot be attributed:\n  " + "\n  ".join(problems))
    return np.stack(images)


def encode_images(images: np.ndarray, cfg, device, base: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """z0 moments (mean, logvar) exactly as stage one stores and stage two reads them."""
    from leakpipe.pipeline.engine.encoding import encode_batch

    vae = load_encoder(vae_lib.resolve(cfg.vae, base), cfg.vae.dtype, device)
    mean, logvar = encode_batch(vae, device, images, cfg.store.dtype)
    return mean.astype(np.float32), logvar.astype(np.float32)


EQUAL = 0.05  # a winning responsibility within this of 1/M: the class's prototypes share the image equally
ONE_OF_EQUALS = (
    "its class's prototypes are equally responsible for this image: they sit on one point, so the "
    "explanation is one prototype per class, not one of its modes"
)


def explain(out, classes: list[str], prototypes, tau, top: int) -> list[dict]:
    """Per image: a_t, the top gated features (by w), every prototype's responsibility pi_cm (Eq. 15),
    and the winning prototype with the features that contribute most to its distance (Eq. 14)."""
    from leakpipe.pipeline.nn.model import explanation

    pi_cm, r = explanation(out, prototypes, tau) if out.distances is not None else (None, None)
    rows = []
    for i in range(len(out.logits)):
        w, h = out.w[i], out.h_bar[i]
        e = {
            "a_t": out.a_t[i].tolist(),
            "top_gated_features": [
                {"dim": int(d), "w": float(w[d]), "h_bar": float(h[d])} for d in w.argsort(descending=True)[:top]
            ],
        }
        if pi_cm is not None:
            c = int(out.logits[i].argmax())
            m = int(pi_cm[i, c].argmax())
            p = prototypes[c, m]
            e["responsibilities"] = {g: pi_cm[i, k].tolist() for k, g in enumerate(classes)}
            e["winning_prototype"] = {
                "generator": classes[c],
                "index": m,
                "responsibility": float(pi_cm[i, c, m]),
                # the class's prototypes share the image about equally: they sit on one point, and the
                # explanation is one prototype per class (the report says so for the whole run)
                "one_of_equals": bool(pi_cm.shape[-1] > 1 and float(pi_cm[i, c, m]) < 1 / pi_cm.shape[-1] + EQUAL),
                "distance": float(out.distances[i, c, m]),
                "top_contributions": [
                    {
                        "dim": int(d),
                        "r": float(r[i, d]),
                        "w": float(w[d]),
                        "h_bar": float(h[d]),
                        "prototype": float(p[d]),
                    }
                    for d in r[i].argsort(descending=True)[:top]
                ],
            }
        rows.append(e)
    return rows


ATTRIBUTOR_CODE = ("encode", "embed")  # the stages whose code an attributor's numbers depend on


def code_identity(stages: dict) -> dict:
    """The code identity of the encode and embed stages of the stage registry `stages` (a graph's), which
    an exported attributor records and is checked against: a workflow never imports another stage."""
    return {name: stages[name].code_identity() for name in ATTRIBUTOR_CODE}


def stale_reasons(g: Graph, run: str) -> list[str]:
    """Why the scoring of run `run` is not up to date (the check `leakpipe status` makes, outputs hashed),
    its embeddings included: [] if its metrics, threshold and embeddings are those of today's inputs."""
    plan = g.plan("score", run)
    verdict = plan.check(deep=True)
    reasons = [] if verdict.up_to_date else list(verdict.reasons)
    for up in plan.upstream:  # an embedding that score would make again (or cannot make) first
        if up.inputs is None:
            if up.target not in plan.optional:
                reasons += [f"{up.title}: {r}" for r in up.blocked.reasons]
            continue
        v = up.check(deep=True)
        reasons += [] if v.up_to_date else [f"{up.title}: {r}" for r in v.reasons]
    return reasons


def from_result(g: Graph, run: str, device) -> Attributor:
    """The attributor of a scored run in the workspace, refused when its scoring is stale (its threshold
    and reference embeddings would come from two states of the workspace)."""
    ws, ws_cfg = g.ws, g.cfg
    out = runs.scored_result(ws, run)
    stale = stale_reasons(g, run)
    if stale:
        trained = g.plan("train", run).check()
        first = (
            ""
            if trained.up_to_date
            else (
                f" (its training is not that of today's inputs either: "
                f"{'; '.join(trained.reasons)}; `leakpipe train --run {run}` first "
                "if the training data changed)"
            )
        )
        raise UserError(
            f"run {run!r} is stale, so its threshold and reference embeddings would not belong together: "
            f"{'; '.join(stale)}. Run `leakpipe score --run {run}` first (with the same --set options)"
            f"{first}, or `leakpipe status` for the whole picture"
        )
    m = load_metrics(out, run)
    val = load_checked_scores(out, att_lib.CALIBRATION)
    if "conformal" not in m or val is None:
        raise UserError(
            f"run {run!r} was scored by an earlier leakpipe ({out / 'metrics.json'} has no prediction "
            f"sets or calibration); run `leakpipe score --run {run}` again"
        )
    model, build, classes, cfg = load_trained(out, device)
    closed, _ = load_split(ws, out, ws_cfg.score.closed)
    tr, va = (closed.select((closed.partition == p) & np.isin(closed.labels, classes)) for p in ("train", "val"))
    reference = {"h_bar": tr.arrays["h_bar"], "w": tr.arrays["w"], "labels": label_index(tr, classes)}
    reference.update(val_h_bar=va.arrays["h_bar"], val_labels=label_index(va, classes))
    return Attributor(
        model,
        build,
        classes,
        cfg,
        reference,
        m["unseen_threshold"],
        f"run {run} (result {out.name})",
        out.name,
        base=ws.root,
        rows=tr.ids["row"],
        decisions=decisions.applied(m),
        val_scores=val["unseen_val_scores"],
    )


def check_code(att: Attributor, current: dict, allow: bool) -> list[str]:
    """An exported attributor's code (its encode and embed stages) against this leakpipe's: refused
    when they differ, unless `allow`; then the differences are returned, to be stated with each result."""
    differ = [
        f"{stage}: {w}"
        for stage, now in current.items()
        for w in code_id.changed((att.code or {}).get(stage, "unrecorded"), now)
    ]
    if differ and not allow:
        raise UserError(
            f"{att.name} was exported by a leakpipe whose code differs from this one's "
            f"({'; '.join(differ)}); its threshold and metrics were measured with that code. Export it "
            "again with this version, or pass --allow-code-change to attribute with it anyway "
            "(each result then says so)"
        )
    return differ


def preprocess_for(att: Attributor, overrides=()):
    """The attributor's preprocessing with the `--set preprocess.*` overrides that may change: only
    preprocess.max_pixels (a guard); any other is the attributor's own (its encoder fingerprint holds it),
    so a different value is refused, naming the key and the attributor's value."""

    given = [o for o in overrides if parse_override(o)[0].startswith("preprocess.")]
    guard = [o for o in given if parse_override(o)[0] == "preprocess.max_pixels"]
    wanted = with_overrides(att.cfg, given).preprocess
    differ = [
        f"{k} = {getattr(att.cfg.preprocess, k)!r}"
        for k, v in vars(wanted).items()
        if k != "max_pixels" and v != getattr(att.cfg.preprocess, k)
    ]
    if differ:
        raise UserError(
            f"--set {', '.join(o for o in given if o not in guard)}: {att.name} was trained on images "
            f"preprocessed with preprocess.{', preprocess.'.join(differ)}, and attributing must "
            "preprocess as training did (its encoder fingerprint holds these settings). Leave them out; "
            "only preprocess.max_pixels, a size guard, may be set for attribute"
        )
    return dataclasses.replace(att.cfg.preprocess, max_pixels=wanted.max_pixels)


def run(
    g: Graph,
    paths: list[Path],
    run: str = "default",
    top: int = 3,
    model: str | None = None,
    vae: str | None = None,
    allow_code_change: bool = False,
    overrides=(),
) -> list[dict]:
    """Attribute `paths` with a scored run of the workspace, or with an exported attributor (`model`: a
    folder or Hub id). The workspace config gives the device and the score settings; the model, VAE
    and preprocessing come from the attributor's own config (`vae` overrides where its VAE is, and
    must have the same encoder fingerprint; `overrides`, the --set items, may raise preprocess.max_pixels)."""
    device = resolve_device(g.cfg.compute.device)
    if model:
        att, differ = load_exported(model, vae, device, g.stages, allow_code_change)
    else:
        att, differ = from_result(g, run, device), []
        att = att_lib.with_vae(att, vae) if vae else att
        att_lib.check_encoder(att, g.stages["encode"].code_identity)
    results = attribute(att, g.cfg, paths, top, run if not model else model, preprocess_for(att, overrides))
    for r in results:
        r["code_differs"] = differ
    return results


def load_exported(
    model: str, vae: str | None, device, stages: dict, allow_code_change: bool = False, log=lambda msg: None
) -> tuple[Attributor, list[str]]:
    """An exported attributor (folder or Hub id) with every file checked, its code compared with this
    leakpipe's (see check_code) and its VAE (`vae` overrides the recorded one) checked against the
    recorded encoder fingerprint: what `attribute --model` and `app` use. (attributor, code differences)."""
    log(f"reading attributor {model} (checksums of every file)")
    att = att_lib.from_folder(att_lib.locate(model), device)
    differ = check_code(att, code_identity(stages), allow_code_change)
    att = att_lib.with_vae(att, vae) if vae else att
    log(f"checking the VAE {att.cfg.vae.source} (encoder fingerprint)")
    att_lib.check_encoder(att, stages["encode"].code_identity)
    return att, differ


def attribute(att, ws_cfg, paths: list[Path], top: int, label: str, preprocess=None) -> list[dict]:
    """For each image of `paths`: its top generators, posterior, prediction set, Mahalanobis and KDE
    scores, unseen-generator flag and explanation, as `attribute --json` prints them."""
    cfg, model, classes = att.cfg, att.model, att.classes
    o = _forward(att, paths, preprocess or cfg.preprocess)
    s = _scores(att, ws_cfg, o)
    _check_finite(s["probs"], paths, att.name)
    protos = model.prototypes.detach().float().cpu() if model.prototypes is not None else None
    why = explain(o, classes, protos, float(model.tau.detach()), top)
    return [_result(att, s, i, p, why[i], top, label) for i, p in enumerate(paths)]


def _forward(att, paths: list[Path], preprocess):
    """The model's output (on the CPU, in float32) for the images: encoded, noised by their hashes' eps."""
    import torch

    from leakpipe.pipeline.engine.data import eval_noise
    from leakpipe.pipeline.store import latent_store

    cfg, build = att.cfg, att.build
    images = load_images(paths, preprocess)
    mean, logvar = encode_images(images, cfg, build.device, att.base)
    hashes = latent_store.hash_rows([hash_file(Path(p)) for p in paths])
    with torch.inference_mode():
        o = att.model(build(mean, logvar, eval_noise(hashes, cfg.train.eval_seed, build.noise_shape(mean.shape[1:]))))
        return type(o)(**{k: (v.float().cpu() if v is not None else None) for k, v in vars(o).items()})


def _scores(att, ws_cfg, o) -> dict:
    """The decisions on the images: posteriors (calibrated and not), prediction sets, Mahalanobis scores,
    KDE log-densities, unseen p-values and flags; an attributor exported before the decisions (format 1
    or 2) gives the posterior as trained and the old threshold."""
    maha, kde = att.comparators(ws_cfg.score)
    u, d = att.threshold, att.decisions
    emb, logits = o.h_bar.double().numpy(), o.logits.double().numpy()
    s = {"maha": maha.score(emb), "raw": calib.scaled_posterior(logits, 1.0)}
    s["log_density"] = kde.score_samples(embedding(emb, o.w.double().numpy(), u["embedding"]))
    if d is not None:  # the calibrated posterior, the prediction sets and the unseen p-values of `score`
        s["probs"] = calib.scaled_posterior(logits, d["calibration"]["temperature"])
        s["sets"] = decisions.predict_sets(logits, d["conformal"]["score"], d["conformal"]["thresholds"])
        s["p_value"] = conformal.p_values(att.val_scores, s["log_density"])
        s["unseen"] = s["p_value"] <= d["alpha"]
    else:
        s.update(probs=s["raw"], sets=None, p_value=None, unseen=s["log_density"] < u["log_density_threshold"])
    return s


def _result(att, s: dict, i: int, p: Path, why, top: int, label: str) -> dict:
    """Image `i`'s entry of `attribute`'s results."""
    cfg, classes, u, d = att.cfg, att.classes, att.threshold, att.decisions
    probs, raw, sets, p_value, maha_s = s["probs"], s["raw"], s["sets"], s["p_value"], s["maha"]
    order = np.argsort(-probs[i], kind="stable")[:top]
    return {
        "image": str(p),
        "converted": conversions(p),  # bits or frames preprocessing dropped, as encode drops them
        "top": [{"generator": classes[c], "probability": float(probs[i, c])} for c in order],
        "posterior": dict(zip(classes, probs[i].tolist())),
        "uncalibrated_posterior": dict(zip(classes, raw[i].tolist())),
        "calibration": d["calibration"] if d else {"method": "none", "temperature": 1.0},
        "prediction_set": [classes[c] for c in np.nonzero(sets[i])[0]] if sets is not None else None,
        "prediction_set_level": d["conformal"]["level"] if d else None,
        "mahalanobis": {"generator": classes[int(maha_s[i].argmax())], "score": float(maha_s[i].max())},
        "kde_log_density": float(s["log_density"][i]),  # the cut is -inf when no p-value can reach alpha: None
        "unseen_threshold": u["log_density_threshold"] if np.isfinite(u["log_density_threshold"]) else None,
        "unseen_p_value": float(p_value[i]) if p_value is not None else None,
        "unseen_alpha": d["alpha"] if d else None,
        "unseen_n_val": len(att.val_scores) if d else None,
        "unseen_generator": bool(s["unseen"][i]),
        "warnings": d.get("warnings", []) if d else [],  # where the run's figures and decisions fail
        "guarantee": d.get("population", "") if d else "",
        "explanation": why,
        "attributor": att.name,
        "run": label,
        "result": att.result,
        "vae": cfg.vae.source,
        "timesteps": cfg.diffusion.timesteps,
    }


def _check_finite(probs: np.ndarray, paths: list[Path], name: str) -> None:
    """A posterior that is not a probability (NaN, inf: an overflow) is never reported as one."""
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(bad):
        raise UserError(
            f"{name} gives no finite posterior for {', '.join(str(paths[i]) for i in bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''} (its logits or temperature overflow); nothing was reported. "
            "Export or score the run again; if it persists, the model itself diverged: train it again"
        )


def set_text(r: dict) -> str:
    """'{closed03, closed07} at 90%': an image's prediction set and its level (an empty set: no known
    generator is plausible at that level)."""
    return (
        "{"
        + ", ".join(r["prediction_set"])
        + "}"
        + f" at {r['prediction_set_level']:.0%}"
        + ("" if r["prediction_set"] else " (no known generator at this level)")
    )


def unseen_text(r: dict) -> str:
    """The unseen-generator verdict with its evidence: the p-value at level alpha, or (attributors
    exported before p-values) the log-density against the threshold."""
    if r.get("unseen_p_value") is None:
        return f"KDE log-density {r['kde_log_density']:.2f} vs threshold {r['unseen_threshold']:.2f}: " + (
            "UNSEEN GENERATOR (below threshold)" if r["unseen_generator"] else "known generator"
        )
    return (
        f"KDE log-density {r['kde_log_density']:.2f}, p = {r['unseen_p_value']:.3f} against {r['unseen_n_val']} "
        f"closed validation images: "
        + (
            f"UNSEEN GENERATOR (p <= {r['unseen_alpha']:g})"
            if r["unseen_generator"]
            else f"known generator (p > {r['unseen_alpha']:g})"
        )
    )


def format_text(results: list[dict]) -> str:
    lines = []
    for r in results[:1]:
        lines.append(f"{r['attributor']}, VAE {r['vae']}")
        lines += [f"WARNING: {w}" for w in r.get("warnings", [])]
    timesteps = results[0]["timesteps"] if results else []
    for r in results:
        lines += [
            r["image"],
            *([f"  converted as encode converts: {'; '.join(r['converted'])}"] if r.get("converted") else []),
            *([f"  prediction set: {set_text(r)}"] if r.get("prediction_set") is not None else []),
            f"  top ({r['calibration']['method'].replace('_', ' ')}): "
            + ", ".join(f"{t['generator']} {t['probability']:.3f}" for t in r["top"]),
            f"  Mahalanobis: {r['mahalanobis']['generator']} (score {r['mahalanobis']['score']:.2f})",
            f"  {unseen_text(r)}",
            "  a_t: " + ", ".join(f"t={t}: {a:.3f}" for t, a in zip(timesteps, r["explanation"]["a_t"])),
            "  top gated features: "
            + ", ".join(f"#{f['dim']} (w {f['w']:.2f})" for f in r["explanation"]["top_gated_features"]),
        ]
        p = r["explanation"].get("winning_prototype")
        if p:
            lines.append(
                f"  winning prototype: {p['generator']} #{p['index']} "
                f"(responsibility {p['responsibility']:.3f}, distance {p['distance']:.3f})"
                + (f"; {ONE_OF_EQUALS}" if p.get("one_of_equals") else "")
            )
            lines.append(
                f"  responsibilities of {p['generator']}'s prototypes: "
                + ", ".join(f"#{m} {v:.3f}" for m, v in enumerate(r["explanation"]["responsibilities"][p["generator"]]))
            )
            lines.append(
                "  features that set its distance (r = w (h_bar - p)^2): "
                + ", ".join(
                    f"#{f['dim']} r {f['r']:.3f} (w {f['w']:.2f}, h_bar {f['h_bar']:.2f}, p {f['prototype']:.2f})"
                    for f in p["top_contributions"]
                )
            )
    return "\n".join(lines)
