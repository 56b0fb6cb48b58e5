"""The stage graph: what each stage reads and writes, and whether it is up to date.

encode (latents of a split) -> train (a result in the run cache) -> embed (a split under a result)
-> score (a result's metrics). Each declaration names its inputs (config keys, upstream locks, files
with hashes, code version) and where its lock and outputs are. The stages call `check()` before they
work and `leakpipe status` calls the same `check()`, so the two always agree. A stage reads its
upstream's identity from the upstream's lock file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.config import ADDED_KEYS, TRAIN_SECTIONS, Config, canonical_hash, load_config
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import locks, runs
from leakpipe.pipeline.ledger.locks import Inputs, Upstream, Verdict
from leakpipe.pipeline.manifest import Manifest, read_manifest
from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.atomic import atomic_write_json
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.workspace import Workspace

# Code versions: bump one when the same inputs would give different bytes.
ENCODE_CODE = "encode-1"
TRAIN_CODE = "train-3"  # 2: early stopping on the macro AUC of pi, not of logits; 3: precise BN over
# class-mixed batches of every class
EMBED_CODE = "embed-2"  # 2: stores pi_cm (Eq. 15) and r (Eq. 14)
SCORE_CODE = "score-6"  # 3: OVL by adaptive KDE, intervals, baselines, leakage audit; 4: saves open_scores;
# 5: OVL interval, held-out generators, explanation figures; 6: forensic pixel baseline, prototype usage


def section_keys(*sections: str) -> tuple[str, ...]:
    cfg = Config()
    return tuple(f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s)))


# The config keys each stage depends on (its fingerprint names exactly these).
ENCODE_KEYS = (*section_keys("vae", "preprocess"), "store.dtype", "store.chunk_rows")
TRAIN_KEYS = (*section_keys(*TRAIN_SECTIONS), "compute.precision")
EMBED_KEYS = ("train.eval_seed", "compute.precision")  # besides the model, which carries the rest of its config
SCORE_KEYS = section_keys("score")


def label_rows(manifest: Manifest) -> list[list[str]]:
    """[[path, "label|partition|variant"], ...]: what training and scoring read besides the latents."""
    cols = (manifest.column(c) for c in ("path", "label", "partition", "variant"))
    return [[p, f"{label}|{part}|{variant}"] for p, label, part, variant in zip(*cols)]


def values(cfg: Config, keys: tuple[str, ...]) -> dict:
    """The settings `keys` as fingerprinted: an added key at its backward-compatible default is left out."""
    out = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".", 1)[1]) for k in keys}
    return {k: v for k, v in out.items() if not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def _stamp(lock: dict) -> str:
    return lock.get("written", "?")


# ---------------------------------------------------------------- stage one
@dataclass
class Latents:
    """Stage one for one split: manifest rows, encoder, store and lock."""

    split: str
    manifest: Manifest
    source: vae_lib.VaeSource
    encoder_fp: str
    file_hashes: list[str]
    store: str  # local path or URL (store.url)
    lock: Path  # always local
    writer_lock: Path
    inputs: Inputs

    def previous(self) -> Path | None:
        """The split's most recent lock of another encoder, to explain a change of VAE against."""
        others = [p for p in self.lock.parent.glob("*.lock.json") if p != self.lock]
        return max(others, key=lambda p: p.stat().st_mtime_ns, default=None)

    @property
    def damage_report(self) -> Path:
        """Written by a reader (train, embed) that found rows whose bytes fail their checksum."""
        return self.lock.with_name(self.lock.name.replace(".lock.json", ".damaged.json"))

    def report_damage(self, rows: list[int], reader: str) -> UserError:
        """Record damaged rows for `status` and `encode`, and return the error for the reader to raise."""
        atomic_write_json(self.damage_report, {"rows": rows, "found_by": reader})
        lines = ", ".join(str(self.manifest.line(r)) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
        return UserError(f"latents of {self.split} are damaged: {len(rows)} row(s) of {self.store} do not "
                         f"match their checksums (manifest lines {lines}); nothing was trained on them. "
                         f"Run `leakpipe encode --split {self.split}`, which re-encodes them.")

    def check(self) -> Verdict:
        storage.probe(self.store)  # an unreachable URL store is a UserError, before any work
        verdict = locks.check(self.lock, self.inputs, self.store, self.previous())
        if verdict.up_to_date and not storage.exists(storage.join(self.store, "latent_hash", "zarr.json")):
            return Verdict(False, ["the store has no row checksums yet (made before they existed); "
                                   "encode adds them without encoding"], verdict.lock)
        if self.damage_report.exists():
            try:
                found = json.loads(self.damage_report.read_text())
                what = f"{len(found['rows'])} row(s) failed their checksums when {found['found_by']} read them"
            except (ValueError, KeyError, TypeError):
                what = "a reader found rows that failed their checksums"
            return Verdict(False, [f"damaged: {what}"], verdict.lock)
        return verdict

    def identity(self) -> Upstream:
        lock = locks.read_lock(self.lock)
        return Upstream(lock["fingerprint"], "re-encoded",
                        {"vae": lock.get("vae"), "rows": len(self.manifest) - len(lock.get("skipped_bad", []))})


UNREADABLE = "0" * 32  # stands for a file that cannot be read: never a valid row


def latents(ws: Workspace, cfg: Config, split: str, hashes: HashCache | None = None,
            memo: dict | None = None) -> Latents:
    """Stage one's declaration for `split`. `memo` (a dict kept by the caller) reuses declarations
    made with the same encoder settings, so `status` reads each manifest once however many runs."""
    key = (split, canonical_hash(values(cfg, ENCODE_KEYS)), cfg.store.url)
    if memo is not None and key in memo:
        return memo[key]
    manifest = read_manifest(ws.manifest(split))
    hashes = hashes or HashCache(ws.hash_cache)
    source = vae_lib.resolve(cfg.vae, ws.root)
    encoder_fp = vae_lib.encoder_fingerprint(cfg, source, hashes, ENCODE_CODE)
    # an unreadable file (permissions, I/O error) is never a valid row: encode reports it, with its reason
    file_hashes = [h or UNREADABLE for h in hashes.hash_many(manifest.abspaths())]
    hashes.save()
    vae_files = [[w.name, hashes.hash(w)] for w in source.weights] + \
        [["config.json", canonical_hash(vae_lib.model_config(source))]]
    inputs = Inputs(values(cfg, ENCODE_KEYS), {},
                    {f"manifest {split}": [[p, h] for p, h in zip(manifest.column("path"), file_hashes)],
                     "vae files": vae_files}, ENCODE_CODE)
    lat = Latents(split, manifest, source, encoder_fp, file_hashes, ws.latent_store(split, encoder_fp, cfg.store.url),
                  ws.store_lock(split, encoder_fp), ws.store_lock(split, encoder_fp, "writer.lock"), inputs)
    if memo is not None:
        memo[key] = lat
    return lat


def ready_latents(ws: Workspace, cfg: Config, split: str, memo: dict | None = None) -> tuple[Latents | None, Verdict]:
    """(latents, their verdict), where a stale or unreadable cache is a blocked verdict."""
    try:
        lat = latents(ws, cfg, split, memo=memo)
        v = lat.check()
    except UserError as exc:
        return None, Verdict(False, [f"latents of {split}: {str(exc).splitlines()[0]}"],
                             blocked=[f"leakpipe encode --split {split}"])
    if not v.up_to_date:
        return lat, Verdict(False, [f"latents of {split} are stale: " + "; ".join(v.reasons)],
                            blocked=[f"leakpipe encode --split {split}"])
    return lat, v


# ---------------------------------------------------------------- stage two
def run_config(result: Path, ws_cfg: Config | None = None) -> Config:
    """The config a result was trained with; where it is kept (store.url, chunk_rows) and how it
    runs (encode, compute) come from the workspace config `ws_cfg`."""
    cfg = load_config()
    for section, vals in json.loads((result / "config.json").read_text()).items():
        for key, value in vals.items():
            setattr(getattr(cfg, section), key, value)
    if ws_cfg is not None:
        cfg.store.url, cfg.store.chunk_rows = ws_cfg.store.url, ws_cfg.store.chunk_rows
        cfg.encode, cfg.compute = ws_cfg.encode, ws_cfg.compute
    return cfg


@dataclass
class Training:
    """Stage two for one run name: the result the current config trains, and the one the name has."""

    run: str
    latents: Latents | None
    upstream_verdict: Verdict
    inputs: Inputs | None
    result: Path | None  # cache/results/<fp12> for the current config
    current: Path | None  # where the run name points now

    @property
    def lock(self) -> Path:
        return self.result / "train.lock.json"

    def check(self, deep: bool = False) -> Verdict:
        if self.inputs is None:
            return self.upstream_verdict
        had = self.current / "train.lock.json" if self.current and self.current != self.result else None
        stored = locks.check(self.lock, self.inputs, previous=had, deep=deep)
        if stored.up_to_date and self.current == self.result:
            return stored
        if stored.up_to_date:  # trained before under this config: restored, not retrained
            old = locks.read_lock(had) if had else None
            why = locks.explain(old["inputs"], self.inputs) if old else [f"run {self.run!r} is new"]
            return Verdict(False, why + [f"a result trained with this config is stored "
                                         f"(cache/results/{self.result.name}, {_stamp(stored.lock)}); "
                                         "train restores it without training"], stored.lock, restore=True)
        ckpt = self.result / "checkpoint" / "checkpoint.safetensors"
        if ckpt.exists():
            stored.reasons.append(f"an interrupted training of this config resumes from {ckpt.parent}")
        return stored


def init_file(ws: Workspace, cfg: Config) -> Path:
    """model.init as a path (relative paths are relative to the workspace); an error if it is missing."""
    path = Path(cfg.model.init).expanduser()
    path = path if path.is_absolute() else ws.root / path
    if not path.is_file():
        raise UserError(f"model.init = {cfg.model.init}: no such file ({path}); give a .safetensors state "
                        "dict with torchvision's parameter names, or set model.init to empty")
    return path


def training(ws: Workspace, cfg: Config, run: str, memo: dict | None = None) -> Training:
    current = runs.pointed(ws, run)
    lat, v = ready_latents(ws, cfg, cfg.train.split, memo)
    if not v.up_to_date:
        return Training(run, lat, v, None, None, current)
    files = {f"labels and partitions of {lat.split}": label_rows(lat.manifest)}
    if cfg.model.init:  # the starting weights are an input: a changed file retrains
        from leakpipe.pipeline.store.hashing import hash_file

        files[f"model.init {cfg.model.init}"] = hash_file(init_file(ws, cfg))
    inputs = Inputs(values(cfg, TRAIN_KEYS), {f"latents of {cfg.train.split}": lat.identity()}, files, TRAIN_CODE)
    return Training(run, lat, v, inputs, runs.result_dir(ws, inputs.fingerprint()), current)


# ---------------------------------------------------------------- embeddings and score
@dataclass
class Embedding:
    """The embeddings of one split under one trained result."""

    split: str
    result: Path
    latents: Latents | None
    upstream_verdict: Verdict
    inputs: Inputs | None

    @property
    def path(self) -> Path:
        return self.result / "embeddings" / f"{self.split}.zarr"

    @property
    def lock(self) -> Path:
        return self.result / "embeddings" / f"{self.split}.lock.json"

    def check(self, deep: bool = False) -> Verdict:
        return self.upstream_verdict if self.inputs is None else locks.check(self.lock, self.inputs, deep=deep)


def trained_lock(result: Path, deep: bool = False) -> dict:
    """The result's train lock; `deep` also hashes its model, config and history, so a damaged
    model is refused before anything is computed from it."""
    lock = locks.read_lock(result / "train.lock.json")
    if lock is None:
        raise UserError(f"{result} holds no finished training (no valid train.lock.json); "
                        "run `leakpipe train` for it")
    problems = locks.verify(result / "train.lock.json", lock, deep) if deep else []
    if problems:
        raise UserError(f"the trained result {result} is damaged ({'; '.join(problems)}); nothing was "
                        "computed from it. Run `leakpipe train --run NAME` with its config to train it again.")
    return lock


def embedding(ws: Workspace, result: Path, split: str, ws_cfg: Config, memo: dict | None = None) -> Embedding:
    cfg = run_config(result, ws_cfg)
    lat, v = ready_latents(ws, cfg, split, memo)
    if not v.up_to_date:
        return Embedding(split, result, lat, v, None)
    train_lock = trained_lock(result)
    model = Upstream(train_lock["outputs"]["model.safetensors"]["blake2b"], "retrained",
                     {"trained": _stamp(train_lock)})
    inputs = Inputs(values(cfg, EMBED_KEYS), {"model": model, f"latents of {split}": lat.identity()}, {}, EMBED_CODE)
    return Embedding(split, result, lat, v, inputs)


def score_splits(cfg: Config) -> list[tuple[str, str]]:
    """(role, split) of every split that score reads."""
    roles = [("closed", cfg.score.closed), *(("postprocessed", s) for s in cfg.score.postprocessed),
             ("open", cfg.score.open)]
    return [(role, split) for role, split in roles if split]  # an empty name: no such split


@dataclass
class Scoring:
    result: Path
    inputs: Inputs

    @property
    def lock(self) -> Path:
        return self.result / "score.lock.json"

    def check(self, deep: bool = False) -> Verdict:
        return locks.check(self.lock, self.inputs, deep=deep)


def scoring(ws: Workspace, result: Path, cfg: Config) -> Scoring:
    """Score reads the embeddings (with locks) of the closed, post-processed and open splits, and
    their manifests' labels, partitions and variants."""
    ups, files = {}, {}
    for _, split in score_splits(cfg):
        lock = locks.read_lock(result / "embeddings" / f"{split}.lock.json")
        if lock is not None:
            model = lock["inputs"]["upstream"]["model"]["about"]
            ups[f"embeddings of {split}"] = Upstream(lock["fingerprint"], "recomputed",
                                                     {"model trained": model.get("trained")})
            files[f"labels and partitions of {split}"] = label_rows(read_manifest(ws.manifest(split), check_files=False))
    return Scoring(result, Inputs(values(cfg, SCORE_KEYS), ups, files, SCORE_CODE))
