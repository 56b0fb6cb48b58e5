"""`leakpipe compare`: one row per scored run, with 95% intervals in every cell, and each run against
the first on the same test images (paired bootstrap differences)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from leakpipe.pipeline.config import TRAIN_SECTIONS, Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.graph import label_rows, run_config
from leakpipe.pipeline.ledger.locks import read_lock
from leakpipe.pipeline.ledger.results import load_checked_scores, trained_bytes
from leakpipe.pipeline.report.scored import load_metrics, load_split
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.math import bootstrap, metrics
from leakpipe.pipeline.report import registry
from leakpipe.pipeline.report.render import fmt as _f, with_ci
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.workspace import Workspace


def _differences(cfgs: dict[str, dict]) -> dict[str, str]:
    """Per run, the training settings in which it differs from the first run (the baseline)."""
    base = next(iter(cfgs.values()))
    keys = sorted({f"{s}.{k}" for c in cfgs.values() for s in TRAIN_SECTIONS for k in c.get(s, {})})
    return {
        run: ", ".join(f"{k}={json.dumps(_get(c, k))}" for k in keys if _get(c, k) != _get(base, k))
        for run, c in cfgs.items()
    }


def _get(cfg: dict, key: str):
    section, name = key.split(".", 1)
    return cfg.get(section, {}).get(name)


CLOSED_COLUMNS = registry.headline(registry.CLOSED)
OPEN_COLUMNS = registry.headline(registry.OPEN)
SET_COLUMNS = registry.headline(registry.CONFORMAL)
UNSEEN_COLUMNS = registry.headline(registry.UNSEEN)
ECE = next(m for m in registry.CLOSED if m.key == "ece")


DECISION_HEADERS = (
    [f"{ECE.label} before / after calibration"]
    + [f"{x.label} (1 - alpha)" for x in SET_COLUMNS]
    + [f"worst post-proc. {SET_COLUMNS[0].label}"]
    + [f"{x.label} (p <= alpha)" for x in UNSEEN_COLUMNS]
)


def decision_cells(m: dict) -> list[str]:
    """A scored run's cells under DECISION_HEADERS: ECE before / after calibration, the prediction
    sets' headline metrics on the closed test and the worst post-processed coverage, the unseen flag's;
    "n/a" for a run scored before them."""
    c, s, u = m.get("calibration", {}), m.get("conformal", {}), m.get("unseen_threshold", {})
    raw = s.get("variants", {}).get("raw", {})
    pp = [v[SET_COLUMNS[0].key] for k, v in s.get("variants", {}).items() if k != "raw"]
    after = c.get("variants", {}).get("raw")
    return (
        [f"{with_ci(m['closed']['raw']['head'], ECE.key)} / {with_ci(after, ECE.key) if after else 'n/a'}"]
        + [with_ci(raw, x.key) if x.key in raw else "n/a" for x in SET_COLUMNS]
        + [_f(min(pp)) if pp else "n/a"]
        + [with_ci(u, x.key) if x.key in u else "n/a" for x in UNSEEN_COLUMNS]
    )


def _scored(ws: Workspace, names: list[str]) -> dict[str, Path]:
    """{run: its scored result}, or one error naming what is wrong with each run that is not."""
    results, problems = {}, []
    for r in names:
        try:
            results[r] = runs.scored_result(ws, r)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("cannot compare:\n  " + "\n  ".join(problems))
    return results


def _contents(manifest, paths: list[str], hashes: HashCache) -> dict[str, str]:
    """{path: content hash} of manifest-relative paths (files that cannot be read are left out)."""
    found = hashes.hash_many([f"{manifest.root}/{p}" for p in paths])
    return {p: h for p, h in zip(paths, found) if h}


def _rows(lock_path: Path, prefix: str = "labels and partitions of ") -> tuple[str, list]:
    """(split, [[path, "label|partition|variant"], ...]) a lock records of the split it read."""
    lock = read_lock(lock_path)
    key = next((k for k in (lock or {}).get("inputs", {}).get("files", {}) if k.startswith(prefix)), None)
    if key is None:
        raise UserError(
            f"{lock_path} records no manifest rows (damaged, or from an older leakpipe); run the "
            "stage again (`leakpipe train` or `leakpipe score` for that run)"
        )
    return key[len(prefix) :], lock["inputs"]["files"][key]


def audit_test_images(ws: Workspace, results: dict[str, Path]) -> str:
    """The closed split every run was scored on, after checking that the runs can be compared on it:
    each was scored on that split as the manifest is now, on the same test images, and none was trained
    on a test image that the split's own train and val partitions do not hold (which every run's scoring
    already leaves out). Otherwise an error says which runs, what differs and how many rows."""
    hashes = HashCache(ws.hash_cache)
    split_of, tests = _scored_splits(ws, results)
    first = next(iter(results))
    manifests = {s: read_manifest(ws.manifest(s), check_files=False) for s in set(split_of.values())}
    base = _same_test_images(results, split_of, tests, manifests, hashes)
    split = split_of[first]
    m = manifests[split]
    fitted = [p for p, part in zip(m.column("path"), m.column("partition")) if part in ("train", "val")]
    already = set(_contents(m, fitted, hashes).values())  # every run's own scoring leaves these out
    leaks = []
    for r, out in results.items():
        trained_on, rows = _rows(out / "train.lock.json")
        exclude = set(run_config(out).train.exclude)
        seen = [p for p, lpv in rows if lpv.split("|")[1] in ("train", "val") and lpv.split("|")[0] not in exclude]
        tm = manifests.get(trained_on) or (
            read_manifest(ws.manifest(trained_on), check_files=False) if ws.manifest(trained_on).exists() else None
        )
        if tm is None:
            leaks.append(f"{r}: cannot tell which images it was trained on (no {ws.manifest(trained_on)})")
            continue
        saw = (set(_contents(tm, seen, hashes).values()) - already) & base
        if saw:
            leaks.append(
                f"{r} was trained on {len(saw)} of the {len(base)} test images of {split} (train.split "
                f"{trained_on} has them in its train or val partition)"
            )
    hashes.close()
    if leaks:
        raise UserError(
            "the runs cannot be compared on the test images of "
            + split
            + ": "
            + "; ".join(leaks)
            + ". A run's numbers on images it was trained on are no test; compare runs whose training "
            "partitions keep these test images out"
        )
    return split


def _scored_splits(ws: Workspace, results: dict[str, Path]) -> tuple[dict, dict]:
    """({run: the split it was scored on}, {run: its test paths}), each run checked to have been scored on
    its split's manifest as it is now."""
    problems, tests, split_of = [], {}, {}
    for r, out in results.items():
        split, rows = _rows(out / "score.lock.json")
        path = ws.manifest(split)
        now = label_rows(read_manifest(path, check_files=False)) if path.exists() else None
        if now != rows:
            change = locks.files_changed(rows, now) if now is not None else "the manifest is gone"
            problems.append(
                f"{r} was scored on another version of {path.name} ({change} since); run `leakpipe score --run {r}`"
            )
            continue
        split_of[r] = split
        tests[r] = [p for p, lpv in rows if lpv.split("|")[1] == "test"]
    if problems:
        raise UserError("cannot compare on the same test images:\n  " + "\n  ".join(problems))
    return split_of, tests


def _same_test_images(results: dict, split_of: dict, tests: dict, manifests: dict, hashes) -> set:
    """The contents of the first run's test images, checked to be every run's."""
    first = next(iter(results))
    content = {r: set(_contents(manifests[split_of[r]], tests[r], hashes).values()) for r in results}
    base = content[first]
    differ = [r for r in results if content[r] != base]
    if differ:
        raise UserError(
            "the runs were not scored on the same test images: "
            + "; ".join(
                f"{r} on {split_of[r]} ({len(content[r])} test images, {len(content[r] & base)} of them among "
                f"{first}'s {len(base)})"
                for r in differ
            )
            + f". Score them on one split (`leakpipe score --run RUN "
            f"--set score.closed={split_of[first]}`) and compare again"
        )
    return base


def compare(ws: Workspace, names: list[str], cfg: Config | None = None) -> str:
    """A markdown table, one row per run, of the registry's headline metrics (closed set: the head with
    its 95% intervals, and Mahalanobis; the worst post-processing step; the open set with gating off and
    on; the decisions: ECE before / after calibration, prediction sets, the unseen flag), with its
    settings that differ from the first run's and the result it points at; then each run against the
    first on the same test images (paired bootstrap). Every file read is checked against its lock;
    raises naming every run that is not scored, and runs that differ in their test images or that were
    trained on another's (see audit_test_images)."""
    groups = {n: runs.seed_group(ws, n) for n in names}
    names = [m for n in names for m in (groups[n] or [n])]  # a seed group is compared through its members
    results = _scored(ws, names)
    scored = {r: load_metrics(out, r) for r, out in results.items()}
    diffs = _differences({r: json.loads(trained_bytes(out, "config.json")) for r, out in results.items()})
    split = audit_test_images(ws, results)
    if cfg is not None:
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, closed=split))
    first = CLOSED_COLUMNS[0]
    head = (
        [m.label for m in CLOSED_COLUMNS]
        + [f"Mahalanobis {first.label}", f"worst post-proc. {first.label}"]
        + [f"open {m.label} (gating off / on)" for m in OPEN_COLUMNS]
        + DECISION_HEADERS
    )
    lines = ["| run | result | differs in | " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(head)]
    for r in names:
        raw, o = scored[r]["closed"]["raw"], scored[r].get("open", {})
        pp = [v["head"][first.key] for k, v in scored[r]["closed"].items() if k != "raw"]
        cells = (
            [with_ci(raw["head"], m.key) for m in CLOSED_COLUMNS]
            + [_f(raw["mahalanobis"][first.key]), _f(min(pp)) if pp else "n/a"]
            + [
                f"{with_ci(o.get('gating_off', {}), m.key)} / {with_ci(o.get('gating_on', {}), m.key)}"
                for m in OPEN_COLUMNS
            ]
            + decision_cells(scored[r])
        )
        lines.append(f"| {r} | {results[r].name} | {diffs[r] or '-'} | " + " | ".join(cells) + " |")
    if len(names) > 1 and cfg is not None and cfg.score.bootstrap:
        lines += paired_lines(ws, names, results, cfg)
    for group, members in groups.items():
        if members and cfg is not None:
            lines += ["", seeds_table(ws, group, members, cfg).rstrip()]
    return "\n".join(lines) + "\n"


def paired_lines(ws: Workspace, names: list[str], results: dict, cfg: Config) -> list[str]:
    """Each run against the first on the test images both scored: every headline metric's difference."""
    cols = [
        *(f"{m.label} difference | p" for m in CLOSED_COLUMNS),
        *(f"open {m.label} difference | p" for m in OPEN_COLUMNS),
    ]
    lines = [
        "",
        f"Paired against `{names[0]}` on the same test images ({cfg.score.bootstrap} paired "
        "bootstrap resamples; p: two-sided; the open set with gating off, closed test vs open):",
        "",
        "| run | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * (2 * len(cols)),
    ]
    base, base_open = _predictions(ws, results[names[0]], cfg), _open_scores(results[names[0]])
    for r in names[1:]:
        d = {
            **paired(_predictions(ws, results[r], cfg), base, cfg),
            **paired_open(_open_scores(results[r]), base_open, cfg),
        }
        cells = [
            f"{_signed(d[m.key])} | {_f(d[m.key]['p'])}" if d.get(m.key) else "n/a | n/a"
            for m in (*CLOSED_COLUMNS, *OPEN_COLUMNS)
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(ws: Workspace, group: str, members: list[str], cfg: Config) -> str:
    """Mean +- sd across the seeds of a group (training variation) and the pooled 95% interval of the
    seed-averaged metric (the seeds' predictions on the same bootstrap resamples of the same test
    images: test-sampling variation), for the closed-set headline metrics."""
    preds = [_predictions(ws, runs.pointed(ws, r), cfg) for r in members]
    rows = sorted(set.intersection(*(set(p) for p in preds)))
    y = np.array([preds[0][r][0] for r in rows])
    samples = [registry.Closed(np.stack([p[r][1] for r in rows]), y, len(preds[0][rows[0]][1]), True) for p in preds]
    rs = bootstrap.Resamples(max(cfg.score.bootstrap, 1), cfg.score.seed)
    lines = [
        f"| {group}: {len(members)} seeds ({', '.join(members)}) | mean +- sd across seeds | pooled 95% interval |",
        "|---|---:|---:|",
    ]
    for m in CLOSED_COLUMNS:
        per_seed = [float(m.fn(s, metrics.unit(len(rows)))[0]) for s in samples]
        pooled = rs.of(lambda w: np.mean([m.fn(s, w) for s in samples], axis=0), len(rows))  # noqa: B023
        lo, hi = bootstrap.interval(pooled)
        lines.append(
            f"| {m.label} | {np.mean(per_seed):.3f} +- {np.std(per_seed, ddof=1):.3f} | [{lo:.3f}, {hi:.3f}] |"
        )
    return "\n".join(lines) + "\n"


def _open_scores(result: Path, setting: str = "gating_off") -> dict | None:
    """{("closed" | "open", manifest row): KDE log-density} a scored result saved, or None."""
    t = load_checked_scores(result)
    if t is None:
        return None
    return {
        **{("closed", int(r)): float(s) for r, s in zip(t["closed_rows"], t[f"{setting}.closed"])},
        **{("open", int(r)): float(s) for r, s in zip(t["open_rows"], t[f"{setting}.open"])},
    }


def _difference(fn, a, b, n: int, cfg: Config) -> dict:
    """fn(a) - fn(b), a metric of two samples of the same rows, with its paired bootstrap interval and p."""
    one = metrics.unit(n)
    rs = bootstrap.Resamples(cfg.score.bootstrap, cfg.score.seed)
    return bootstrap.paired(float((fn(a, one) - fn(b, one))[0]), rs.of(lambda w: fn(a, w) - fn(b, w), n))


def paired_open(a: dict | None, b: dict | None, cfg: Config) -> dict:
    """The open-set headline metrics of run a minus run b on the closed and open rows both scored, on
    the same bootstrap resamples ({} if either has no open scores)."""
    if not a or not b:
        return {}
    keys = sorted(a.keys() & b.keys())
    closed = [k for k in keys if k[0] == "closed"]
    opened = [k for k in keys if k[0] == "open"]
    sa, sb = (registry.Open(np.array([x[k] for k in closed]), np.array([x[k] for k in opened])) for x in (a, b))
    return {m.key: _difference(m.fn, sa, sb, len(sa), cfg) for m in OPEN_COLUMNS}


def _signed(d: dict) -> str:
    return f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def _predictions(ws: Workspace, result: Path, cfg: Config) -> dict:
    """{manifest row: (label index, posterior)} of a result's closed test rows."""
    split, attrs = load_split(ws, result, cfg.score.closed)
    test = split.select(split.partition == "test")
    probs = metrics.softmax(test.arrays["logits"].astype(np.float64))
    return {
        int(r): (attrs["classes"].index(lab), probs[k]) for k, (r, lab) in enumerate(zip(test.ids["row"], test.labels))
    }


def paired(a: dict, b: dict, cfg: Config) -> dict:
    """Run a minus run b on the test rows both scored: each closed-set headline metric's difference with
    its paired-bootstrap interval and two-sided p-value (the same resamples for both runs)."""
    rows = sorted(a.keys() & b.keys())
    y = np.array([a[r][0] for r in rows])
    sa, sb = (registry.Closed(np.stack([p[r][1] for r in rows]), y, len(a[rows[0]][1]), True) for p in (a, b))
    return {m.key: _difference(m.fn, sa, sb, len(rows), cfg) for m in CLOSED_COLUMNS}


def write_compare(path: Path, table: str) -> None:
    """Write the table unless the file already holds it (a rerun that changes nothing touches nothing)."""
    path = Path(path)
    if not (path.exists() and path.read_text() == table):
        atomic_write_text(path, table)
