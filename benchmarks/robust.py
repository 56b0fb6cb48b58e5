"""Robust attribution, measured (issue 35): post-processed variants in training and in calibration, side
by side on recipe.py's data sets, each arm x seed trained and scored through the stages.

    python benchmarks/robust.py [--sets demo,synth-b,synth-c] [--seeds 0,1,2] [--k 2] [--epochs N]
                                [--arms a,b,c,levels,held-out,cal,cal-levels] [--root build/robust]

Each data set is recipe.py's, written with post-processed test copies (steps 1-3, closed-pp), test copies
of one operation family alone (blur, closed-blur), K variants of every train and val image from all eight
families (closed-var) and K from the seven others (closed-var7, blur held out), all encoded once; the
seconds and MiB of writing and encoding each are printed first. `--arms ""` stops there (the cost of K:
a K other than the workspace's needs its own --root).

Arms: a = today's default (raw training, raw calibration); b = variants in training; c = variants in
training and in calibration (pooled); levels = c with one threshold per level (score.levels); held-out =
c on closed-var7, so blur is never seen in training nor calibration; cal and cal-levels = arm a's training
calibrated as c and levels are. Per arm and test set (raw, step1-3, step1-blur), over the seeds: top-1,
macro AUC, ECE of the applied posterior, coverage of the 90% sets, their mean size and the share of empty
sets (mean +- sd); and the seed-averaged top-1 of each arm minus arm a's, paired on the same test images
(95% bootstrap interval, p).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import SETS, arguments, fmt_diff, paired  # noqa: E402

from leakpipe.pipeline import manifest as mf  # noqa: E402
from leakpipe.pipeline.bench import postprocess  # noqa: E402
from leakpipe.pipeline.bench.datasets import (  # noqa: E402
    PP_COLUMNS,
    VARIANT_PARTITIONS,
    postprocess_rows,
    variant_rows,
    write_benchmark,
)
from leakpipe.pipeline.engine.vae import save_random_vae  # noqa: E402
from leakpipe.pipeline.ledger import runs  # noqa: E402
from leakpipe.pipeline.report.scored import load_split  # noqa: E402
from leakpipe.pipeline.report.evaluate import label_index  # noqa: E402
from leakpipe.pipeline.workspace import Workspace  # noqa: E402
from leakpipe.stages import encode, graph, score, train  # noqa: E402
from leakpipe.workflows.demo import rendering_autoencoder  # noqa: E402

HELD_OUT = "blur"
ARMS = {
    "a": ("train.variants=", "score.variants="),
    "b": ("train.variants=closed-var", "score.variants="),
    "c": ("train.variants=closed-var", "score.variants=closed-var"),
    "levels": ("train.variants=closed-var", "score.variants=closed-var", "score.levels=true"),
    "held-out": ("train.variants=closed-var7", "score.variants=closed-var7"),
    # arm a's training (raw images only) calibrated on the variants: raw top-1 is arm a's by construction
    "cal": ("train.variants=", "score.variants=closed-var"),
    "cal-levels": ("train.variants=", "score.variants=closed-var", "score.levels=true"),
}
ABOUT = {
    "a": "today's default: raw training, raw calibration",
    "b": "variants in training",
    "c": "variants in training and calibration (pooled)",
    "levels": "variants in training and calibration (one threshold per level)",
    "held-out": f"variants without {HELD_OUT} in training and calibration",
    "cal": "raw training, variants in calibration (pooled)",
    "cal-levels": "raw training, variants in calibration (one threshold per level)",
}
TESTS = ("raw", "step1", "step2", "step3", f"step1-{HELD_OUT}")
SPLITS = ("closed", "closed-pp", f"closed-{HELD_OUT}", "closed-var", "closed-var7", "open")


def workspace(root: Path, name: str, k: int, log, held_out: bool = True) -> tuple[Workspace, dict]:
    """The data set's workspace with its test copies and variants, written and encoded once (a workspace
    of recipe.py's under the same root gains the missing ones, so its trained runs serve arm a); the
    seconds and bytes of encoding each split (closed-var7 only for the held-out arm)."""
    ds = SETS[name]
    ws_root = root / name
    data, manifests = ws_root / "data", ws_root / "manifests"
    spec = dataclasses.replace(ds.spec, steps=(1, 2, 3), variants=k)
    if not (manifests / "closed.csv").exists():
        ae = rendering_autoencoder(spec, "builtin:taef2", ws_root)  # None for the pixel family
        write_benchmark(data, manifests, spec, autoencoder=ae)
        if not ds.vae:
            save_random_vae(ws_root / "vae", ds.vae_blocks, seed=ds.vae_seed)
        (ws_root / "leakpipe.toml").write_text(
            f'[vae]\nsource = "{ds.vae or "./vae"}"\n[preprocess]\nsize = {ds.spec.size}\n[encode]\nnum_workers = 1\n'
            + ds.toml
        )
    closed = mf.read_manifest(manifests / "closed.csv")
    wanted = {
        "closed-var": lambda: variant_rows(closed, data / "closed-var", k, spec.steps, spec.seed, 2),
        f"closed-{HELD_OUT}": lambda: postprocess_rows(
            closed, data / f"closed-{HELD_OUT}", (1,), spec.seed, "test", 2, (HELD_OUT,)
        ),
        "closed-var7": lambda: variant_rows(
            closed,
            data / "closed-var7",
            k,
            spec.steps,
            spec.seed,
            2,
            tuple(o for o in postprocess.OPS if o != HELD_OUT),
        ),
    }
    splits = [s for s in SPLITS if held_out or s != "closed-var7"]
    written = {}  # seconds of writing the post-processed images of a split (postprocess), where written now
    for split, rows in wanted.items():
        if split in splits and not (manifests / f"{split}.csv").exists():
            start = time.perf_counter()
            mf.write_manifest(manifests / f"{split}.csv", data / split, rows(), PP_COLUMNS)
            written[split] = time.perf_counter() - start
    _check_k(manifests, closed, k, [s for s in splits if s.startswith("closed-var")])
    ws, cost = Workspace(ws_root), {}
    for split in splits:
        start, cpu = time.perf_counter(), _cpu_seconds()
        res = encode.run(graph(ws, ws.config()), split, log=log)
        rows = len(mf.read_manifest(ws.manifest(split)))
        secs = (time.perf_counter() - start, _cpu_seconds() - cpu)
        cost[split] = (secs, _bytes(Path(res.store)), rows, written.get(split))
    return ws, cost


def _cpu_seconds() -> float:
    """User + system seconds of this process and its finished children (decode workers): unlike wall time,
    not stretched by other sessions' load nor by a SIGSTOP while the process waits."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _check_k(manifests: Path, closed: mf.Manifest, k: int, splits: list[str]) -> None:
    """Refuse a workspace whose variants were written with another K (the manifests are written once)."""
    images = sum(r["partition"] in VARIANT_PARTITIONS for r in closed.rows)
    for split in splits:
        rows = len(mf.read_manifest(manifests / f"{split}.csv").rows)
        if rows != k * images:
            raise SystemExit(
                f"{manifests / split}.csv holds {rows} variants of {images} train and val images, not --k {k} "
                f"x {images}: it was written with another K; pass that K, or another --root for this one"
            )


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_arm(ws: Workspace, name: str, arm: str, seed: int, log, more=()) -> dict:
    """Train (or restore) and score one arm at one seed (`more`: settings of every arm): its metrics per
    test set, and per test set the correctness of each test image (for the paired differences)."""
    sets = [
        f"latent.scale={SETS[name].latent_scale}",
        *more,
        *ARMS[arm],
        f"train.seed={seed}",
        "score.baselines=false",
        "score.bootstrap=200",
        f"score.postprocessed=closed-pp,closed-{HELD_OUT}",
    ]
    cfg = ws.config(None, sets)
    run = f"{arm}-seed{seed}"
    train.run(graph(ws, cfg), run, log=log)
    m = score.run(graph(ws, cfg), run, log=log).metrics
    result = runs.pointed(ws, run)
    out = {"m": m, "right": {}, "groups": {}}
    for split in ("closed", "closed-pp", f"closed-{HELD_OUT}"):
        s, attrs = load_split(ws, result, split)
        s = s.select(s.partition == "test") if split == "closed" else s
        for v in sorted(set(s.variant)) if split != "closed" else ["raw"]:
            t = s if split == "closed" else s.select(s.variant == v)
            out["right"][v] = t.arrays["logits"].argmax(1) == label_index(t, attrs["classes"])
            out["groups"][v] = t.groups
    return out


def _cell(values: list[float]) -> str:
    v = np.array(values, float)
    return f"{np.nanmean(v):.3f} +- {np.nanstd(v, ddof=1) if len(v) > 1 else 0:.3f}"


def _row(results: list[dict], test: str) -> dict:
    """The per-seed figures of one arm on one test set."""
    pick = lambda f: [f(r["m"]) for r in results]  # noqa: E731
    return {
        "top1": pick(lambda m: m["closed"][test]["head"]["top1"]),
        "macro_auc": pick(lambda m: m["closed"][test]["head"]["macro_auc"]),
        "ece": pick(lambda m: m["calibration"]["variants"][test]["ece"]),
        "coverage": pick(lambda m: m["conformal"]["variants"][test]["coverage"]),
        "set_size": pick(lambda m: m["conformal"]["variants"][test]["set_size"]),
        "empty": pick(lambda m: m["conformal"]["variants"][test]["empty"]),
        "covered": pick(lambda m: m["conformal"]["variants"][test].get("covered")),
    }


def table(name: str, arms: dict[str, list[dict]]) -> list[str]:
    ds = SETS[name]
    base = arms.get("a")
    lines = [
        f"### {name}: {ds.about}",
        "",
        f"Chance: top-1 {1 / ds.spec.n_closed:.3f}, macro AUC 0.500; the sets' level 0.90. Mean +- sd over "
        f"{len(next(iter(arms.values())))} seeds; top-1 minus arm a: seed-averaged, paired on the same test images.",
        "",
        "| arm | test | top-1 | - arm a (paired) | macro AUC | ECE | coverage | covered | set size | empty |",
        "|---|---|---:|---|---:|---:|---:|:---:|---:|---:|",
    ]
    for arm, results in arms.items():
        for test in TESTS:
            r = _row(results, test)
            diff = "-"
            if base is not None and arm != "a":
                heads, ref = [x["right"][test] for x in results], [x["right"][test] for x in base]
                diff = fmt_diff(paired(heads, ref, results[0]["groups"][test]))
            covered = "yes" if all(r["covered"]) else "no"
            lines.append(
                f"| {arm} | {test} | {_cell(r['top1'])} | {diff} | {_cell(r['macro_auc'])} | {_cell(r['ece'])} | "
                f"{_cell(r['coverage'])} | {covered} | {_cell(r['set_size'])} | {_cell(r['empty'])} |"
            )
    return lines


def main():
    args, log = arguments(
        __doc__,
        "build/robust",
        k=(2, "variants of each train and val image"),
        arms=("a,b,c,levels,held-out", "comma-separated arms"),
        epochs=(0, "train.epochs of every arm (0: the set's own)"),
    )
    more = [f"train.epochs={args.epochs}"] if args.epochs else []
    out = []
    for name in args.sets.split(","):
        ws, cost = workspace(Path(args.root).resolve(), name, args.k, log, "held-out" in args.arms.split(","))
        for split, ((secs, cpu), size, rows, wrote) in cost.items():
            made = f"; images written in {wrote:.0f} s" if wrote is not None else ""
            print(
                f"{name} encode {split}: {rows} rows, {secs:.0f} s ({cpu:.0f} CPU s), {size / 2**20:.1f} MiB{made}",
                flush=True,
            )
        arms = {}
        for arm in [a for a in args.arms.split(",") if a]:  # --arms "": write and encode only (item 5's cost)
            arms[arm] = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                arms[arm].append(run_arm(ws, name, arm, seed, log, more))
                m = arms[arm][-1]["m"]
                print(
                    f"{name} {arm} seed {seed}: top-1 "
                    + ", ".join(f"{t} {m['closed'][t]['head']['top1']:.3f}" for t in TESTS)
                    + "; coverage "
                    + ", ".join(f"{t} {m['conformal']['variants'][t]['coverage']:.3f}" for t in TESTS)
                    + f"; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        if arms:
            out += table(name, arms) + [""]
            print("\n".join(table(name, arms)), flush=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
