"""The stage graph: the stages' declarations by name, and what several of them read.

encode (latents of a split) -> train (a result in the run cache) -> embed (a split under a result)
-> score (a result's metrics). Each stage module declares a `Stage` (ledger/stage.py); a `Graph` plans
any instance of any of them by name, so a stage reaches its upstream through the graph and never
imports another stage. The stages call `check()` before they work and `leakpipe status` calls the
same `check()`, so the two always agree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from leakpipe.pipeline.config import ADDED_KEYS, Config, canonical_hash
from leakpipe.pipeline.config_files import from_dict
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks
from leakpipe.pipeline.ledger.locks import Upstream, Verdict
from leakpipe.pipeline.ledger.stage import Plan, Stage
from leakpipe.pipeline.manifest import Manifest
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.workspace import Workspace

if TYPE_CHECKING:  # a type only: the ledger sits below the engine that reads VAEs
    from leakpipe.pipeline.engine.vae import VaeSource


def section_keys(*sections: str) -> tuple[str, ...]:
    cfg = Config()
    return tuple(f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s)))


def values(cfg: Config, keys: tuple[str, ...]) -> dict:
    """The settings `keys` as fingerprinted: an added key at its backward-compatible default is left out."""
    out = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".", 1)[1]) for k in keys}
    return {k: v for k, v in out.items() if not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def label_rows(manifest: Manifest, extra: tuple[str, ...] = ()) -> list[list[str]]:
    """[[path, "label|partition|variant"], ...]: what training and scoring read besides the latents
    (`extra`: more columns, "" where the manifest has none, e.g. the source of a variant)."""
    cols = [manifest.column(c) for c in ("label", "partition", "variant")]
    cols += [manifest.column(c) if manifest.has_column(c) else [""] * len(manifest) for c in extra]
    return [[p, "|".join(values)] for p, *values in zip(manifest.column("path"), *cols)]


def score_splits(cfg: Config, ws: Workspace) -> list[tuple[str, str]]:
    """(role, split) of every split that score reads: closed, post-processed, open and the variants
    its decisions are calibrated on (score.variants)."""
    roles = [
        ("closed", cfg.score.closed),
        *(("postprocessed", s) for s in cfg.score.postprocessed),
        ("open", cfg.score.open),
        ("variants", variants_of(ws, cfg.score.variants, cfg.score.closed)),
    ]
    return [(role, split) for role, split in roles if split]  # an empty name: no such split


VARIANTS_SUFFIX = "-var"  # `leakpipe postprocess --variants K --split SPLIT` writes manifests/SPLIT-var.csv


def variants_of(ws: Workspace, setting: str, split: str) -> str:
    """The manifest of post-processed variants that train.variants or score.variants names for `split`:
    auto is SPLIT-var when that manifest exists, else none ("")."""
    if setting != "auto":
        return setting
    name = split + VARIANTS_SUFFIX
    return name if ws.manifest(name).exists() else ""


def resolved(cfg: Config, ws: Workspace) -> Config:
    """`cfg` with train.variants and score.variants resolved (variants_of), and the keys they make inert
    at their defaults (train.variant_p, score.levels without variants): what a fingerprint records, so
    a setting that changes nothing changes no result."""
    tv = variants_of(ws, cfg.train.variants, cfg.train.split)
    sv = variants_of(ws, cfg.score.variants, cfg.score.closed)
    p = cfg.train.variant_p if tv else cast(float, ADDED_KEYS["train.variant_p"])
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, variants=tv, variant_p=p),
        score=dataclasses.replace(cfg.score, variants=sv, levels=cfg.score.levels and bool(sv)),
    )


def run_config(result: Path, ws_cfg: Config | None = None) -> Config:
    """The config a result was trained with, read through the validated loader; where it is kept
    (store.url, chunk_rows) and how it runs (encode, compute, log) come from the workspace config."""
    path, lock = result / "config.json", locks.read_lock(result / "train.lock.json")
    try:
        if lock is not None and "config.json" in lock["outputs"]:  # checked as read: a hand edit is refused
            data = locks.checked_bytes(
                path,
                result / "train.lock.json",
                "Put back the config it was trained "
                "with, or train the run again (`leakpipe train --run NAME` with its config)",
            )
        else:  # a result of leakpipe 0.1 (no lock of this version)
            data = path.read_bytes()
        stored = json.loads(data)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable ({exc}); train the result again") from None
    cfg = from_dict(stored, str(path))
    if ws_cfg is None:
        return cfg
    store = dataclasses.replace(cfg.store, url=ws_cfg.store.url, chunk_rows=ws_cfg.store.chunk_rows)
    return dataclasses.replace(cfg, store=store, encode=ws_cfg.encode, compute=ws_cfg.compute, log=ws_cfg.log)


def trained_lock(result: Path, deep: bool = False) -> dict:
    """The result's train lock; `deep` also hashes its model, config and history, so a damaged
    model is refused before anything is computed from it."""
    lock = locks.read_lock(result / "train.lock.json")
    if lock is None:
        raise UserError(f"{result} holds no finished training (no valid train.lock.json); run `leakpipe train` for it")
    problems = locks.verify(result / "train.lock.json", lock, deep) if deep else []
    if problems:
        raise UserError(
            f"the trained result {result} is damaged ({'; '.join(problems)}); nothing was "
            "computed from it. Run `leakpipe train --run NAME` with its config to train it again."
        )
    return lock


def init_file(ws: Workspace, cfg: Config) -> Path:
    """model.init as a path (relative paths are relative to the workspace); an error if it is missing."""
    path = Path(cfg.model.init).expanduser()
    path = path if path.is_absolute() else ws.root / path
    if not path.is_file():
        raise UserError(
            f"model.init = {cfg.model.init}: no such file ({path}); give a .safetensors state "
            "dict with torchvision's parameter names, or set model.init to empty"
        )
    return path


@dataclass
class Graph:
    """Plans stage instances by name for one workspace and config. Plans are remembered by their
    arguments and config, so `status` reads each manifest once however many runs read it."""

    ws: Workspace
    cfg: Config
    stages: dict[str, Stage]
    hashes: HashCache | None = None
    memo: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hashes = self.hashes or HashCache(self.ws.hash_cache)

    def plan(self, stage: str, *args, cfg: Config | None = None) -> Plan:
        """The Plan of `stage` for `args` (a split, a run name, a result and split), under `cfg`
        (default: the graph's; embed and score plan under a result's own config)."""
        cfg = cfg or self.cfg
        # what the stage reads of the config (and where its stores are): equal plans are shared
        key = (stage, args, canonical_hash(values(cfg, self.stages[stage].config)), cfg.store.url)
        if key not in self.memo:
            self.memo[key] = self.stages[stage].plan(self, cfg, *args)
            self.memo[key].replan = lambda: self.fresh(stage, *args, cfg=cfg)
        return self.memo[key]

    def fresh(self, stage: str, *args, cfg: Config | None = None) -> Plan:
        """The plan again, after upstream work: nothing remembered of this workspace is reused."""
        self.memo.clear()
        return self.plan(stage, *args, cfg=cfg)


@dataclass
class Latents:
    """What an encode plan carries (`Plan.data`), for the stages that read the split's latents."""

    split: str
    manifest: Manifest
    source: VaeSource
    encoder_fp: str
    file_hashes: list[str]
    store: str  # local path or URL (store.url)
    lock: Path  # always local
    writer_lock: Path

    @property
    def damage_report(self) -> Path:
        """Written by a reader (train, embed) or `verify` that found rows whose bytes fail their checksum."""
        return damage_register(self.lock)

    def report_damage(self, rows: list[int], reader: str) -> UserError:
        """Record damaged rows for `status` and `encode`, and return the error for the reader to raise."""
        record_damage(self.lock, rows, reader)
        lines = ", ".join(str(self.manifest.line(r)) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
        return UserError(
            f"latents of {self.split} are damaged: {len(rows)} row(s) of {self.store} do not "
            f"match their checksums (manifest lines {lines}); nothing was trained on them. "
            f"Run `leakpipe encode --split {self.split}`, which re-encodes them."
        )

    def identity(self) -> Upstream:
        """The latents as an upstream input: the encode lock's fingerprint, with readable facts."""
        lock = locks.read_lock(self.lock)
        return Upstream(
            lock["fingerprint"],
            "re-encoded",
            {"vae": lock.get("vae"), "rows": len(self.manifest) - len(lock.get("skipped_bad", []))},
        )

    @property
    def described(self) -> str:
        return f"latents of {self.split} (VAE {self.source.label}, store {self.store})"


def damage_register(lock: Path) -> Path:
    """`<split>/<fp12>.damaged.json` beside a store's encode lock: the rows a reader or `verify` found
    damaged, which `status` shows and the next `encode` reads back in full and re-encodes."""
    return lock.with_name(lock.name.replace(".lock.json", ".damaged.json"))


def recorded_damage(lock: Path) -> dict | None:
    """The register's {"rows": [...], "found_by": "train, verify"}, or None (no damage recorded); a
    register that cannot be read still says that damage was found, rows unknown."""
    path = damage_register(lock)
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
        return {"rows": [int(r) for r in found["rows"]], "found_by": str(found["found_by"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"rows": [], "found_by": "a reader"}


def record_damage(lock: Path, rows: list[int], found_by: str) -> None:
    """Add `rows` to the store's damage register (what earlier readers found stays until encode repairs it)."""
    had = recorded_damage(lock) or {"rows": [], "found_by": ""}
    by = [b for b in had["found_by"].split(", ") if b]
    atomic_write_json(
        damage_register(lock),
        {"rows": sorted({*had["rows"], *map(int, rows)}), "found_by": ", ".join(dict.fromkeys([*by, found_by]))},
    )


def check_latents(lock_path: Path, lock: dict) -> tuple[list[str], list[int]]:
    """Hash every file of an encode lock's store against the lock (what `verify` does for every lock):
    the problems in words, and the rows of every chunk that fails, recorded in the damage register so
    that `status` says how many rows are damaged and `encode` re-encodes them (the files' stat is
    unchanged by bit rot, so nothing else would tell the next encode to read them)."""
    from leakpipe.pipeline.store.chunk_checks import rows_of

    bad: list[str] = []
    problems = locks.verify(lock_path, lock, deep=True, bad=bad)
    # the manifest's rows: every row (format 2), or their count and digest (format 3)
    listed = next((rows for name, rows in lock["inputs"]["files"].items() if name.startswith("manifest ")), [])
    n_rows = listed["rows"] if isinstance(listed, dict) else len(listed)
    rows = rows_of(bad, n_rows, int(lock["inputs"]["config"].get("store.chunk_rows", 1))) if bad else []
    if rows:
        record_damage(lock_path, rows, "verify")
    return problems, rows


def one_line(exc: Exception, most: int = 3) -> str:
    """An error's message on one line: its first line and the first `most` problems it lists."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    more = len(lines) - 1 - most
    return " ".join(lines[:1]) + " " + "; ".join(lines[1 : 1 + most]) + (f"; ... ({more} more)" if more > 0 else "")


def ready_latents(graph: Graph, split: str, cfg: Config | None = None) -> tuple[Plan | None, Verdict]:
    """(the encode plan of `split`, its verdict), where latents that cannot be planned (a manifest or a
    VAE missing, a store out of reach) or are stale are a blocked verdict naming `leakpipe encode`."""
    command = f"leakpipe encode --split {split}"
    path = graph.ws.manifest(split)
    if not path.exists():
        return None, Verdict(
            False,
            [f"there is no manifest {path} (manifests here: {', '.join(graph.ws.splits()) or 'none'})"],
            blocked=[f"leakpipe manifest build ROOT --split {split}"],
        )
    try:
        plan = graph.plan("encode", split, cfg=cfg)
        verdict = plan.check()
    except UserError as exc:
        return None, Verdict(False, [f"latents of {split}: {one_line(exc)}"], blocked=[command])
    if not verdict.up_to_date:
        return plan, Verdict(False, [f"latents of {split} are stale: " + "; ".join(verdict.reasons)], blocked=[command])
    return plan, verdict
