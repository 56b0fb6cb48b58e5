"""Stage one: encode a manifest's images into the latent store, only rows not yet valid.

Declared inputs: the `vae.*` and `preprocess.*` settings, the stored dtype and chunking, the manifest's
rows with their files' hashes, and the VAE's files; its code is the preprocessing and the VAE call
(never the store writer, so a new writer never re-encodes anyone's cache). Output: the store
`cache/latents/<split>/<fp12>.zarr` (or under store.url), named by the encoder fingerprint.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from leakpipe.pipeline.config import Config, canonical_hash
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.engine.autoencoders import family_code, load_encoder
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger.graph import Graph, Latents, recorded_damage, section_keys, values
from leakpipe.pipeline.ledger.locks import (
    VAE_FILES,
    Inputs,
    Rows,
    Verdict,
    outputs_root,
    read_lock,
    read_rows,
    rewrite_rows,
    same_inputs,
)
from leakpipe.pipeline.ledger.stage import Done, Plan, Stage, run as run_stage
from leakpipe.pipeline.manifest import Deferred, Manifest, read_manifest, root_of
from leakpipe.pipeline.store import storage
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.store.hashing import RACY_NS, HashCache, hash_bytes
from leakpipe.pipeline.store.stats import stat_stamps
from leakpipe.pipeline.progress import progress

KEYS = (*section_keys("vae", "preprocess"), "store.dtype", "store.chunk_rows")
# its code: what makes a row's latents, and everything that reaches (ledger/code.py); the rest of this
# module picks rows, resumes and reports, so a change to it never re-encodes anyone's cache
CODE = (
    "leakpipe.pipeline.engine.images:read_image",
    "leakpipe.pipeline.engine.encoding:encode_batch",
    "leakpipe.pipeline.engine.vae:load_vae",
)


class EncodeFailures(UserError):
    pass


@dataclass
class EncodeResult:
    split: str
    store: str  # local path or URL
    vae: str
    rows: int
    encoded: int = 0
    copied: int = 0
    reused: int = 0
    damaged: int = 0
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    waited: dict = field(default_factory=dict)  # seconds the VAE's device waited: {"decode": .., "write": ..}
    up_to_date: bool = False
    failures_csv: Path | None = None
    failure_text: str = ""  # the first failures, inline, and where the CSV is (failure_lines)

    def summary(self) -> str:
        if self.rows == 0:
            return (
                f"encode {self.split}: the split is empty (its manifest lists no images), so there is nothing to "
                f"encode; fill it with `leakpipe manifest build ROOT --split {self.split}`"
            )
        if self.up_to_date:
            return f"encode {self.split}: up to date ({self.rows} rows), nothing to do; VAE {self.vae} -> {self.store}"
        rate = self.encoded / self.seconds if self.seconds else 0.0
        text = (
            f"encode {self.split}: {self.rows} rows: {self.encoded} encoded ({rate:.1f} img/s), "
            f"{self.reused} already valid, {self.copied} reused by copy, "
            + (f"{self.damaged} rows damaged and re-encoded, " if self.damaged else "")
            + f"{len(self.failures)} failed; VAE {self.vae} -> {self.store}"
        )
        if self.encoded and self.seconds and self.waited:
            text += "\n  " + waiting_line(self.waited, self.seconds)
        if self.failures:
            text += self.failure_text
        return text


def waiting_line(waited: dict, seconds: float) -> str:
    """How long the VAE's device stood idle, and what to change when that is more than a tenth of the run."""
    decode, write = waited.get("decode", 0.0), waited.get("write", 0.0)
    text = (
        f"the VAE waited {decode:.1f} s for decoded images and {write:.1f} s for writes "
        f"({100 * (decode + write) / seconds:.0f}% of {seconds:.1f} s)"
    )
    if decode > 0.1 * seconds:
        text += "; raise encode.num_workers (image decoding is the bottleneck)"
    if write > 0.1 * seconds:
        text += "; the store is the bottleneck (a faster disk, or a larger store.chunk_rows)"
    return text


def _latent_shape(source: vae_lib.VaeSource, size: int) -> tuple[int, int, int]:
    cfg = vae_lib.model_config(source)
    factor = 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return cfg.get("latent_channels", 4), size // factor, size // factor


SHOWN_FAILURES = 5  # failures printed inline (line, path, reason); the CSV lists every one


def failure_lines(failures: list, manifest: Manifest, csv_path: Path | None, shown: int = SHOWN_FAILURES) -> str:
    """The first `shown` failures as indented 'line N: PATH: REASON' lines, then where the rest are."""
    rows = sorted(failures)
    text = "".join(f"\n  line {manifest.line(row)}: {manifest.abspath(row)}: {reason}" for row, reason in rows[:shown])
    more = f"all {len(rows)}" if len(rows) > shown else "each"
    return text + (f"\n  {more} with line, path and reason in {csv_path}" if csv_path else "")


def _write_failures(path: Path, failures: list, manifest: Manifest) -> None:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["line", "path", "reason"])
    for row, reason in sorted(failures):
        out.writerow([manifest.line(row), str(manifest.abspath(row)), reason])
    atomic_write_text(path, buf.getvalue())


def _trusted_chunks(p: Latents, group, lock: dict | None, hashes: HashCache):
    """Chunks whose files are byte for byte what the store's last lock recorded (None: check every
    chunk). Not after a reader reported damage: that damage may sit in a file whose stat is intact."""
    from leakpipe.pipeline.store import chunk_checks

    if (
        lock is None
        or p.damage_report.exists()
        or outputs_root(p.lock, lock) != storage.normalize(p.store)
        or lock["inputs"]["config"].get("store.chunk_rows") != group["mean"].chunks[0]
    ):
        return None
    return chunk_checks.unchanged_chunks(p.store, group, lock["outputs"], hashes)


def _encode(
    p: Latents, cfg: Config, result: EncodeResult, log, lock: dict | None = None, hashes: HashCache | None = None
) -> None:
    """Encode the rows of `p` that are not valid in its store (missing, changed or damaged)."""
    group, want, pending = _pending_rows(p, cfg, result, log, lock, hashes)
    if len(pending) == 0:
        return
    device = vae_lib.resolve_device(cfg.encode.device)
    log(f"encode {p.manifest.name}: {len(pending)} of {len(want)} rows to encode with {p.source.label} on {device}")
    start = time.perf_counter()
    with progress(len(pending), f"encode {p.manifest.name}") as bar:
        if cfg.encode.workers or cfg.encode.scheduler:
            _encode_on_dask(p, cfg, result, log, want, pending, bar)
        else:
            _encode_here(p, cfg, result, device, group, want, pending, bar)
    result.seconds = time.perf_counter() - start
    result.encoded = len(pending) - len(result.failures)


def _pending_rows(p: Latents, cfg: Config, result: EncodeResult, log, lock: dict | None, hashes: HashCache | None):
    """(the store, prepared: its rows laid out as the manifest's, every row's content hash, the indices of
    the rows to encode); counts what was copied, reused and found damaged in `result`."""
    from leakpipe.pipeline.store import latent_store

    want = latent_store.hash_rows(p.file_hashes)
    attrs = {
        "split": p.manifest.name,
        "encoder_fingerprint": p.encoder_fp,
        "vae": p.source.label,
        "vae_config": vae_lib.model_config(p.source),
        "preprocess": cfg.preprocess.__dict__,
        "compute_dtype": cfg.vae.dtype,
    }
    group, result.copied = latent_store.prepare(
        p.store, want, _latent_shape(p.source, cfg.preprocess.size), cfg.store.chunk_rows, cfg.store.dtype, attrs
    )
    # every reused row is read and checked, except in chunks unchanged since the lock vouched for them
    trusted = _trusted_chunks(p, group, lock, hashes) if hashes is not None else None
    valid, damaged = latent_store.row_states(group, want, trusted)
    result.reused = int(valid.sum()) - result.copied
    result.damaged = int(damaged.sum())
    if result.damaged:
        log(
            f"encode {p.manifest.name}: {result.damaged} rows damaged (their bytes do not match their "
            f"checksums, or their chunk is missing or undecodable); re-encoding them"
        )
    return group, want, np.nonzero(~valid)[0]


def _encode_on_dask(p: Latents, cfg: Config, result: EncodeResult, log, want, pending, bar) -> None:
    """The pending rows on dask workers (encode.workers, encode.scheduler), a task per chunk."""
    from leakpipe.pipeline.engine import distributed

    with distributed.connect(cfg.encode.workers, cfg.encode.scheduler) as client:
        workers = len(client.scheduler_info()["workers"])
        log(f"encode {p.manifest.name}: on dask {client.scheduler.address}, {workers} workers")
        _, result.failures = distributed.encode_pending(
            client, p.source, cfg, p.store, p.manifest.abspaths(), pending, want, bar
        )


def _encode_here(p: Latents, cfg: Config, result: EncodeResult, device, group, want, pending, bar) -> None:
    """The pending rows in this process, batch by batch, with encode.torch_threads threads."""
    import torch

    from leakpipe.pipeline.engine.encoding import ChunkWriter, decode_workers, encode_pending
    from leakpipe.pipeline.engine.precision import channels_last, compiled

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.encode.torch_threads or threads)
    try:
        model = load_encoder(p.source, cfg.vae.dtype, device)
        if p.source.kind != vae_lib.PIXELS:  # the pixels encoder has nothing to speed up
            channels_last(model, device)
            model.encode = compiled(model.encode, cfg.compute.compile, cfg.compute.compile_backend)
        writer = ChunkWriter(group, cfg.store.chunk_rows, len(want), want, pending)
        result.waited = encode_pending(
            model,
            device,
            p.manifest.abspaths(),
            pending,
            writer,
            cfg.preprocess,
            cfg.encode.batch_size,
            decode_workers(cfg.encode.num_workers, device),
            cfg.store.dtype,
            progress=bar,
        )
    finally:
        torch.set_num_threads(threads)
    result.failures = writer.failures


UNREADABLE = "0" * 32  # stands for a file that cannot be read: never a valid row


def _previous(lock: Path) -> Path | None:
    """The split's most recent lock of another encoder, to explain a change of VAE against."""
    others = [p for p in lock.parent.glob("*.lock.json") if p != lock]
    return max(others, key=lambda p: p.stat().st_mtime_ns, default=None)


def _checks(lat: Latents):
    """What the lock alone cannot see: a store made before row checksums, and damage a reader found."""

    def check(verdict: Verdict) -> Verdict:
        if verdict.up_to_date and not storage.exists(storage.join(lat.store, "latent_hash", "zarr.json")):
            return Verdict(
                False,
                ["the store has no row checksums yet (made before they existed); encode adds them without encoding"],
                verdict.lock,
            )
        found = recorded_damage(lat.lock)
        if found is not None:
            n = len(found["rows"])
            what = f"{n} row{'' if n == 1 else 's'} damaged" if n else "rows damaged"
            why = f"{what} (their bytes failed their checksums when {found['found_by']} read them)"
            return Verdict(False, [why + "; encode re-encodes them"], verdict.lock)
        return verdict

    return check


def _rows(manifest: Manifest, hashes: HashCache) -> Rows:
    """The manifest's rows with their files' hashes, and the stat each file had when it was hashed."""
    found, stamps = hashes.hash_many(manifest.abspaths(), stamps=True)
    hashes.save()
    # an unreadable file (permissions, I/O error) is never a valid row: encode reports it, with its reason
    file_hashes = [h or UNREADABLE for h in found]
    return Rows(
        manifest.column("path"), file_hashes, stamps, [str(manifest.source), manifest.digest], str(manifest.root)
    )


def _unchanged(lock_path: Path, key: str, manifest_path: Path) -> Rows | None:
    """The rows the store's lock recorded for the manifest, when nothing they were made from can have
    changed: the manifest's bytes are those recorded, and every file's stat is the one it had when it was
    hashed (the hash cache's test, row by row, without parsing the manifest or looking anything up).
    None: plan from the manifest."""
    lock = read_lock(lock_path)
    meta = ((lock or {}).get("rows") or {}).get("lists", {}).get(key)
    if meta is None:
        return None
    try:
        data = manifest_path.read_bytes()
    except OSError:
        return None
    root = root_of(manifest_path, data)
    if meta["listing"] != [str(manifest_path), hash_bytes(data)] or root is None or str(root) != meta["root"]:
        return None
    rows = (read_rows(lock_path, lock) or {}).get(key)
    if rows is None or not rows.fresh(RACY_NS):
        return None
    now, seen = stat_stamps(rows.paths(f"{root}/"))
    return rows if seen.all() and np.array_equal(now, rows.stamps[:, :4]) else None


def _refresh(lock_path: Path, inputs: Inputs, key: str) -> None:
    """After a plan that had to read the manifest (the lock is of format 2, or its rows' stamps, listing
    or side file could not vouch for them) found the store up to date: the lock again, with the rows and
    stamps the plan found, so that the next plan can tell from the stats alone that nothing changed.
    Never a re-encode: the lock's fingerprint and outputs stay."""
    lock = read_lock(lock_path)
    if lock is not None and inputs.files[key].fresh(RACY_NS) and same_inputs(lock, inputs):
        rewrite_rows(lock_path, lock, inputs)


def plan(graph: Graph, cfg: Config, split: str) -> Plan:
    """Stage one's plan for `split`: the manifest rows with their files' hashes, the encoder, the store."""
    ws, hashes = graph.ws, graph.hashes
    source = vae_lib.resolve(cfg.vae, ws.root)
    encoder_fp = vae_lib.encoder_fingerprint(cfg, source, hashes, STAGE.code_identity(source))
    lock, key = ws.store_lock(split, encoder_fp), f"manifest {split}"
    rows = _unchanged(lock, key, ws.manifest(split))
    if rows is None:
        manifest = read_manifest(ws.manifest(split))
        rows, planned = _rows(manifest, hashes), True
    else:
        # a Deferred reads as the Manifest it loads on first use (a no-op never uses it)
        manifest, planned = cast(Manifest, Deferred(ws.manifest(split), len(rows.names))), False
    vae_files = [[w.name, hashes.hash(w)] for w in source.weights] + [
        ["config.json", canonical_hash(vae_lib.model_config(source))]
    ]
    inputs = Inputs(values(cfg, KEYS), {}, {key: rows, VAE_FILES: vae_files}, STAGE.code_identity(source))
    lat = Latents(
        split,
        manifest,
        source,
        encoder_fp,
        cast(list[str], rows.values),  # a side file's Column reads as the list it holds, decoded when first used
        ws.latent_store(split, encoder_fp, cfg.store.url),
        lock,
        ws.store_lock(split, encoder_fp, "writer.lock"),
    )
    storage.probe(lat.store)  # an unreachable URL store is a UserError, before any work
    facts = {"vae": source.label, "store": lat.store, "failures_csv": ws.failures_csv(split), "hashes": hashes}

    def sweep():  # a lock write that was killed
        for orphan in lock.parent.glob(f".{lock.name}.*.tmp"):
            orphan.unlink(missing_ok=True)

    return Plan(
        STAGE,
        split,
        inputs,
        lock,
        lat.writer_lock,
        sweep,
        outputs_at=lat.store,
        previous=_previous(lock),
        command=f"leakpipe encode --split {split}",
        extra_checks=[_checks(lat)],
        finish=(lambda: None if facts.get("locked") else _refresh(lock, inputs, key)) if planned else None,
        data=lat,
        facts=facts,
    )


def work(plan: Plan, cfg: Config, log, verdict: Verdict) -> Done:
    """Encode the rows that are not valid; a file that cannot be read fails its row (and the stage,
    unless `skip_bad`), every other row is still encoded."""
    lat: Latents = plan.data
    if cfg.encode.workers and lat.store.startswith("memory://"):
        raise UserError(
            f"store.url {cfg.store.url!r} is a memory store, which only this process can "
            "see; encode.workers starts worker processes. Use a folder or an object store URL."
        )
    result = EncodeResult(lat.split, lat.store, lat.source.label, len(lat.manifest))
    log(f"encode {lat.split}: " + "; ".join(verdict.reasons))
    _encode(lat, cfg, result, log, verdict.lock, plan.facts["hashes"])
    failures_csv = plan.facts["failures_csv"]
    if result.failures:
        _write_failures(failures_csv, result.failures, lat.manifest)
        result.failures_csv = failures_csv
        result.failure_text = failure_lines(result.failures, lat.manifest, failures_csv)
        if not cfg.encode.skip_bad:
            raise EncodeFailures(
                f"{len(result.failures)} of {result.rows} images could not be read; every other row was "
                f"encoded:{result.failure_text}\nFix or remove those rows and rerun, or pass --skip-bad to "
                "accept the split without them."
            )
    else:
        failures_csv.unlink(missing_ok=True)
    lat.damage_report.unlink(missing_ok=True)
    paths = lat.manifest.column("path")
    bad = sorted(paths[r] for r, _ in result.failures)
    since = time.time_ns()

    def locked(lock: dict) -> None:  # the next encode need not read back the chunks this lock vouches for
        from leakpipe.pipeline.store import chunk_checks

        chunk_checks.remember(lat.store, lock["outputs"], plan.facts["hashes"], since)
        plan.facts["hashes"].save()
        plan.facts["locked"] = True  # the lock holds this plan's rows: nothing to refresh

    return Done(
        lat.store,
        {"split": lat.split, "skipped_bad": bad, "vae": lat.source.label, "encoder": lat.encoder_fp},
        result,
        locked,
    )


# a VAE family's own code (autoencoders.FAMILY_CODE; none for SD's AutoencoderKL) is part of its stores' identity
STAGE = Stage("encode", KEYS, CODE, plan, work, deep=False, extra_code=family_code)


def run(graph: Graph, split: str, log=print) -> EncodeResult:
    """Bring `cache/latents/<split>/<fp12>.zarr` (or the store under store.url) up to date with
    `manifests/<split>.csv`."""
    p = graph.plan("encode", split)
    done = run_stage(p, graph.cfg, log)
    return done.result or EncodeResult(split, p.data.store, p.data.source.label, len(p.data.manifest), up_to_date=True)
