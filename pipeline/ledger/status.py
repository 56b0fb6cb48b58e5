"""What `leakpipe status`, `runs` and `gc` report, from the stage graph's own `check()`."""
from __future__ import annotations

import json
from pathlib import Path

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import graph, locks, runs
from leakpipe.pipeline.ledger.locks import Inputs, Verdict
from leakpipe.pipeline.store import storage
from leakpipe.pipeline.workspace import Workspace


def _entry(stage: str, name: str, verdict: Verdict, **facts) -> dict:
    return {"stage": stage, "name": name, **verdict.to_dict(), **{k: v for k, v in facts.items() if v}}


def _latents_entry(ws: Workspace, cfg: Config, split: str, memo: dict) -> dict:
    try:
        lat = graph.latents(ws, cfg, split, memo=memo)
        return _entry("encode", split, lat.check(), vae=lat.source.label, store=lat.store)
    except UserError as exc:
        return _entry("encode", split, Verdict(False, [str(exc).splitlines()[0]]))


def _result_entries(ws: Workspace, cfg: Config, name: str, result: Path, memo: dict) -> list[dict]:
    out = []
    for split in ws.splits():
        if (result / "embeddings" / f"{split}.lock.json").exists():
            out.append(_entry("embed", f"{name}/{split}", graph.embedding(ws, result, split, cfg, memo).check()))
    if (result / "score.lock.json").exists():
        out.append(_entry("score", name, graph.scoring(ws, result, cfg).check(), result=result.name))
    return out


def entries(ws: Workspace, cfg: Config) -> list[dict]:
    """One entry per stage instance: encode per split, then train, embed and score per run name."""
    memo: dict = {}  # one declaration per split and encoder, however many runs read it
    out = [_latents_entry(ws, cfg, split, memo) for split in ws.splits()]
    for name in runs.names(ws):
        plan = graph.training(ws, cfg, name, memo)
        current = plan.current.name if plan.current else None
        out.append(_entry("train", name, plan.check(), result=current,
                          current_config_result=plan.result.name if plan.result else None))
        if plan.current is not None and locks.read_lock(plan.current / "train.lock.json") is not None:
            out += _result_entries(ws, cfg, name, plan.current, memo)
    return out


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
        facts = ", ".join(f"{label} {e[k]}" for k, label in (("vae", "VAE"), ("store", "store"), ("result", "result"))
                          if k in e)
        lines.append(f"{e['stage']:<6} {e['name']:<{width}}  {state}" + (f"  ({facts})" if facts else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- runs
def _headline(result: Path) -> dict:
    try:
        m = json.loads((result / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    raw = m.get("closed", {}).get("raw", {}).get("head", {})
    return {"top1": raw.get("top1"), "macro_auc": raw.get("macro_auc"),
            "open_auroc": m.get("open", {}).get("gating_off", {}).get("auroc")}


def differs(lock: dict, cfg: Config, latents: dict) -> list[str]:
    """How a trained result's training config, code and latents differ from the current ones, in
    words. `latents`: {upstream name: current fingerprint} of the caches that are up to date."""
    old = {"config": lock["inputs"]["config"], "code": lock["inputs"]["code"]}
    words = locks.explain(old, Inputs(graph.values(cfg, graph.TRAIN_KEYS), code=graph.TRAIN_CODE))
    for name, up in lock["inputs"]["upstream"].items():
        if name in latents and latents[name] != up["fingerprint"]:
            words.append(f"{name}: re-encoded since")
    return words


def _current_latents(ws: Workspace, cfg: Config) -> dict:
    lat, verdict = graph.ready_latents(ws, cfg, cfg.train.split)
    return {f"latents of {lat.split}": lat.identity().fingerprint} if verdict.up_to_date else {}


def run_rows(ws: Workspace, cfg: Config) -> list[dict]:
    """Every trained result: the names pointing at it, when it was made, how it differs from the
    current config, and its headline metrics. Results no name points at are listed too (gc frees them)."""
    named, current = runs.names_of(ws), _current_latents(ws, cfg)
    rows = []
    for result in runs.results(ws):
        lock = locks.read_lock(result / "train.lock.json")
        rows.append({"names": named.get(result, []), "result": result.name,
                     "made": lock.get("written") if lock else None,
                     "differs": differs(lock, cfg, current) if lock else ["unfinished or from an older leakpipe"],
                     **_headline(result)})
    return sorted(rows, key=lambda r: (not r["names"], r["names"], r["made"] or ""))


def format_runs(rows: list[dict]) -> str:
    def num(x):
        return "-" if x is None else f"{x:.3f}"

    table = [["run", "result", "made", "top-1", "macro AUC", "open AUROC", "differs from the current config"]]
    for r in rows:
        table.append([", ".join(r["names"]) or "(none: gc frees it)", r["result"], r["made"] or "-",
                      num(r.get("top1")), num(r.get("macro_auc")), num(r.get("open_auroc")),
                      "; ".join(r["differs"]) or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table)


# ---------------------------------------------------------------- gc
def _size(location: str) -> int:
    return sum(storage.files(location).values())


def garbage(ws: Workspace, cfg: Config) -> list[tuple[str, int]]:
    """(location, bytes) of every latent store and result that nothing refers to: a store is kept if
    the current config of a split or any kept result uses it; a result if a run name points at it."""
    named = set(runs.names_of(ws))
    keep_stores = set()
    for split in ws.splits():
        try:
            keep_stores.add(graph.latents(ws, cfg, split).store)
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
