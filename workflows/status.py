"""What `leakpipe status`, `runs` and `gc` report, from each stage's own plan and `check()`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.graph import Graph, one_line, ready_latents, values
from leakpipe.pipeline.ledger.locks import Inputs, Verdict
from leakpipe.pipeline.ledger.stage import Instance, Stage
from leakpipe.pipeline.store import storage


def _entry(stage: str, name: str, verdict: Verdict, **facts) -> dict:
    shown = ("vae", "store", "result", "current_config_result")
    return {"stage": stage, "name": name, **verdict.to_dict(), **{k: v for k, v in facts.items() if v and k in shown}}


def _instance_entry(g: Graph, stage: Stage, inst: Instance) -> dict:
    try:
        plan = g.plan(stage.name, *inst.args)
        verdict = plan.check(deep=inst.deep)
    except UserError as exc:  # what it holds cannot be read (a config edited by hand): said, not raised
        return _entry(stage.name, inst.name, Verdict(False, [*inst.problems, one_line(exc)]), **inst.facts)
    if inst.problems:
        verdict = dataclasses.replace(verdict, up_to_date=False, reasons=[*inst.problems, *verdict.reasons])
    return _entry(stage.name, inst.name, verdict, **{**plan.facts, **inst.facts})


def entries(g: Graph) -> list[dict]:
    """One entry per stage instance, each stage asked for its own (`Stage.instances`): encode per split,
    train per run name, embed and score per trained result."""
    return [_instance_entry(g, stage, inst) for stage in g.stages.values() for inst in stage.instances(g)]


def format_entries(items: list[dict]) -> str:
    width = max((len(e["name"]) for e in items), default=0)
    lines = []
    for e in items:
        if e["up_to_date"]:
            state = "up to date"
        elif e["blocked_by"]:
            state = f"STALE (run `{e['blocked_by'][0]}` first): " + "; ".join(e["reasons"])
        elif e["restores_stored_result"]:
            state = "STALE, restorable without recomputing: " + "; ".join(e["reasons"])
        else:
            state = "STALE: " + "; ".join(e["reasons"])
        facts = ", ".join(
            f"{label} {e[k]}" for k, label in (("vae", "VAE"), ("store", "store"), ("result", "result")) if k in e
        )
        lines.append(f"{e['stage']:<6} {e['name']:<{width}}  {state}" + (f"  ({facts})" if facts else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- runs
def _headline(result: Path) -> dict:
    """The headline metrics of a scored result, as its score lock vouches for them (else none)."""
    try:
        m = json.loads(locks.checked_bytes(result / "metrics.json", result / "score.lock.json", ""))
    except (UserError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    raw = m.get("closed", {}).get("raw", {}).get("head", {})
    return {
        "top1": raw.get("top1"),
        "macro_auc": raw.get("macro_auc"),
        "open_auroc": m.get("open", {}).get("gating_off", {}).get("auroc"),
    }


def differs(lock: dict, g: Graph, latents: dict) -> list[str]:
    """How a trained result's training config, code and latents differ from the current ones, in
    words. `latents`: {upstream name: current fingerprint} of the caches that are up to date."""
    train = g.stages["train"]
    old = {"config": lock["inputs"]["config"], "code": lock["inputs"]["code"]}
    words = locks.explain(old, Inputs(values(g.cfg, train.config), code=train.code_identity()))
    for name, up in lock["inputs"]["upstream"].items():
        if name in latents and latents[name] != up["fingerprint"]:
            words.append(f"{name}: re-encoded since")
    return words


def _current_latents(g: Graph) -> dict:
    lat, verdict = ready_latents(g, g.cfg.train.split)
    return {f"latents of {lat.data.split}": lat.data.identity().fingerprint} if verdict.up_to_date else {}


def run_rows(g: Graph) -> list[dict]:
    """Every trained result: the names pointing at it, when it was made, how it differs from the
    current config, and its headline metrics. Results no name points at are listed too (gc frees them)."""
    ws = g.ws
    named, current = runs.names_of(ws), _current_latents(g)
    rows = []
    for name in runs.names(ws):  # names that are no link to a result: listed with what is wrong
        bad, target = runs.problem(ws, name), runs.pointed(ws, name)
        if bad:
            lock = locks.read_lock(target / "train.lock.json")
            rows.append(
                {
                    "names": [name],
                    "result": runs.link(ws, name).name + "/ (a folder)" if lock else "(missing)",
                    "made": lock.get("written") if lock else None,
                    "differs": [bad, *(differs(lock, g, current) if lock else [])],
                    **_headline(target),
                }
            )
    stand_ins, resumes = runs.stand_ins(ws), resumed_result(g)
    for result in runs.results(ws):
        lock = locks.read_lock(result / "train.lock.json")
        copied = [
            f"(copied by cache/runs/{n}, kept)" for n, fp in stand_ins.items() if lock and lock["fingerprint"] == fp
        ]
        stopped = runs.interrupted(result)
        kept = stopped is not None and resumes in (result.name, None)
        rows.append(
            {
                "names": named.get(result, copied) or (["(interrupted, kept by gc)"] if kept else []),
                "result": result.name,
                "made": lock.get("written") if lock else None,
                "differs": differs(lock, g, current) if lock else [_unfinished(stopped, kept, g.cfg.train.epochs)],
                **_headline(result),
            }
        )
    return sorted(rows, key=lambda r: (not r["names"], r["names"], r["made"] or ""))


def resumed_result(g: Graph) -> str | None:
    """The name of the result folder that `leakpipe train` under the current config trains (and so
    resumes, if its training was interrupted); None when that cannot be told yet (its latents are not
    ready), and then every interrupted training is kept."""
    try:
        return g.plan("train", "default").facts.get("current_config_result")
    except UserError:
        return None


def kept_interrupted(g: Graph, drop: tuple[str, ...] = ()) -> list[str]:
    """The result folders gc keeps because the current config resumes their interrupted training."""
    resumes = resumed_result(g)
    return [
        r.name
        for r in runs.results(g.ws)
        if r.name not in drop and resumes in (r.name, None) and runs.interrupted(r) is not None
    ]


def _unfinished(stopped: dict | None, kept: bool, epochs: int) -> str:
    if stopped is None:
        return "unfinished or from an older leakpipe"
    after = f"after epoch {stopped['epoch']}" if stopped["epoch"] is not None else "(its checkpoint is damaged)"
    if not kept:
        return f"interrupted {after}, a training of another config (gc frees it)"
    of = f" of {epochs}" if stopped["epoch"] is not None else ""
    return f"interrupted {after}{of}, resumes on `leakpipe train` (gc keeps it)"


def format_runs(rows: list[dict]) -> str:
    def num(x):
        return "-" if x is None else f"{x:.3f}"

    table = [["run", "result", "made", "top-1", "macro AUC", "open AUROC", "differs from the current config"]]
    for r in rows:
        table.append(
            [
                ", ".join(r["names"]) or "(none: gc frees it)",
                r["result"],
                r["made"] or "-",
                num(r.get("top1")),
                num(r.get("macro_auc")),
                num(r.get("open_auroc")),
                "; ".join(r["differs"]) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table)


# ---------------------------------------------------------------- gc
def _size(location: str) -> int:
    return sum(storage.files(location).values())


def garbage(g: Graph, drop: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(location, bytes) of every latent store and result that nothing refers to: a store is kept if
    the current config of a split or any kept result uses it; a result if a run name points at it, or
    if it is an interrupted training that the current config resumes (unless `drop` names it)."""
    ws, cfg = g.ws, g.cfg
    named = set(runs.names_of(ws))
    kept = set(kept_interrupted(g, drop))
    named |= {r for r in runs.results(ws) if r.name in kept}
    stand_ins = set(runs.stand_ins(ws).values())  # a result a run folder copies stays (see runs.problem)
    named |= {
        r for r in runs.results(ws) if (locks.read_lock(r / "train.lock.json") or {}).get("fingerprint") in stand_ins
    }
    keep_stores = set()
    for split in ws.splits():
        try:
            keep_stores.add(g.plan("encode", split).data.store)
        except UserError:
            pass
    free = []
    for result in runs.results(ws):
        if result in named:
            lock = locks.read_lock(result / "train.lock.json") or {}
            keep_stores.update(storage.normalize(s) for s in lock.get("stores", []))
        else:
            free.append((str(result), _size(str(result))))
    roots = {ws.stores_root(), ws.stores_root(cfg.store.url)}
    stores = sorted({s for root in roots for s in storage.glob(root, "*/*.zarr")} - keep_stores)
    return [(s, _size(s)) for s in stores] + free
