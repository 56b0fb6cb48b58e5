"""Stage one: encode a manifest's images into the latent store, only rows not yet valid."""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.engine import vae as vae_lib
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import graph, locks
from leakpipe.pipeline.manifest import Manifest
from leakpipe.pipeline.store.atomic import atomic_write_text
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.store.locking import exclusive
from leakpipe.pipeline.workspace import Workspace


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

    def summary(self) -> str:
        if self.up_to_date:
            return (f"encode {self.split}: up to date ({self.rows} rows), nothing to do; VAE {self.vae} "
                    f"-> {self.store}")
        rate = self.encoded / self.seconds if self.seconds else 0.0
        text = (f"encode {self.split}: {self.rows} rows: {self.encoded} encoded ({rate:.1f} img/s), "
                f"{self.reused} already valid, {self.copied} reused by copy, "
                + (f"{self.damaged} rows damaged and re-encoded, " if self.damaged else "") +
                f"{len(self.failures)} failed; VAE {self.vae} -> {self.store}")
        if self.encoded and self.seconds and self.waited:
            text += "\n  " + waiting_line(self.waited, self.seconds)
        if self.failures:
            text += f"\n  failures listed in {self.failures_csv}"
        return text


def waiting_line(waited: dict, seconds: float) -> str:
    """How long the VAE's device stood idle, and what to change when that is more than a tenth of the run."""
    decode, write = waited.get("decode", 0.0), waited.get("write", 0.0)
    text = (f"the VAE waited {decode:.1f} s for decoded images and {write:.1f} s for writes "
            f"({100 * (decode + write) / seconds:.0f}% of {seconds:.1f} s)")
    if decode > 0.1 * seconds:
        text += "; raise encode.num_workers (image decoding is the bottleneck)"
    if write > 0.1 * seconds:
        text += "; the store is the bottleneck (a faster disk, or a larger store.chunk_rows)"
    return text


def _latent_shape(source: vae_lib.VaeSource, size: int) -> tuple[int, int, int]:
    cfg = vae_lib.model_config(source)
    factor = 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return cfg.get("latent_channels", 4), size // factor, size // factor


def _write_failures(path: Path, failures: list, manifest: Manifest) -> None:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["line", "path", "reason"])
    for row, reason in sorted(failures):
        out.writerow([manifest.line(row), str(manifest.abspath(row)), reason])
    atomic_write_text(path, buf.getvalue())


def _trusted_chunks(p: graph.Latents, group, lock: dict | None, hashes: HashCache):
    """Chunks whose files are byte for byte what the store's last lock recorded (None: check every
    chunk). Not after a reader reported damage: that damage may sit in a file whose stat is intact."""
    from leakpipe.pipeline.store import chunk_checks, storage

    if lock is None or p.damage_report.exists() or \
            locks.outputs_root(p.lock, lock) != storage.normalize(p.store) or \
            lock["inputs"]["config"].get("store.chunk_rows") != group["mean"].chunks[0]:
        return None
    return chunk_checks.unchanged_chunks(p.store, group, lock["outputs"], hashes)


def _encode(p: graph.Latents, cfg: Config, result: EncodeResult, log, lock: dict | None = None,
            hashes: HashCache | None = None) -> None:
    import numpy as np
    from leakpipe.pipeline.engine.encoding import decode_workers
    from leakpipe.pipeline.engine.precision import channels_last, compiled
    from leakpipe.pipeline.progress import progress

    from leakpipe.pipeline.store import latent_store
    from leakpipe.pipeline.engine.encoding import ChunkWriter, encode_pending

    want = latent_store.hash_rows(p.file_hashes)
    attrs = {"split": p.manifest.name, "encoder_fingerprint": p.encoder_fp, "vae": p.source.label,
             "vae_config": vae_lib.model_config(p.source), "preprocess": cfg.preprocess.__dict__,
             "compute_dtype": cfg.vae.dtype}
    group, result.copied = latent_store.prepare(
        p.store, want, _latent_shape(p.source, cfg.preprocess.size), cfg.store.chunk_rows,
        cfg.store.dtype, attrs)
    # every reused row is read and checked, except in chunks unchanged since the lock vouched for them
    trusted = _trusted_chunks(p, group, lock, hashes) if hashes is not None else None
    valid, damaged = latent_store.row_states(group, want, trusted)
    pending = np.nonzero(~valid)[0]
    result.reused = int(valid.sum()) - result.copied
    result.damaged = int(damaged.sum())
    if result.damaged:
        log(f"encode {p.manifest.name}: {result.damaged} rows damaged (their bytes do not match their "
            f"checksums, or their chunk is missing or undecodable); re-encoding them")
    if len(pending) == 0:
        return
    device = vae_lib.resolve_device(cfg.encode.device)
    log(f"encode {p.manifest.name}: {len(pending)} of {len(want)} rows to encode with "
        f"{p.source.label} on {device}")
    paths = p.manifest.abspaths()
    start = time.perf_counter()
    with progress(len(pending), f"encode {p.manifest.name}") as bar:
        if cfg.encode.workers or cfg.encode.scheduler:
            from leakpipe.pipeline.engine import distributed

            with distributed.connect(cfg.encode.workers, cfg.encode.scheduler) as client:
                log(f"encode {p.manifest.name}: on dask {client.scheduler.address}, "
                    f"{len(client.scheduler_info()['workers'])} workers")
                _, result.failures = distributed.encode_pending(client, p.source, cfg, p.store, paths,
                                                                pending, want, bar)
        else:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(cfg.encode.torch_threads or threads)
            try:
                model = vae_lib.load_vae(p.source, cfg.vae.dtype, device)
                if hasattr(model, "encoder"):  # AutoencoderKL; the pixels encoder has nothing to speed up
                    channels_last(model, device)
                    model.encode = compiled(model.encode, cfg.compute.compile, cfg.compute.compile_backend)
                writer = ChunkWriter(group, cfg.store.chunk_rows, len(want), want, pending)
                result.waited = encode_pending(model, device, paths, pending, writer, cfg.preprocess,
                                               cfg.encode.batch_size, decode_workers(cfg.encode.num_workers, device),
                                               cfg.store.dtype, progress=bar)
            finally:
                torch.set_num_threads(threads)
            result.failures = writer.failures
    result.seconds = time.perf_counter() - start
    result.encoded = len(pending) - len(result.failures)


def run(ws: Workspace, split: str, cfg: Config, skip_bad: bool = False, log=print) -> EncodeResult:
    """Bring `cache/latents/<split>/<fp12>.zarr` (or the store under store.url) up to date with
    `manifests/<split>.csv`."""
    p = graph.latents(ws, cfg, split)
    if cfg.encode.workers and p.store.startswith("memory://"):
        raise UserError(f"store.url {cfg.store.url!r} is a memory store, which only this process can "
                        "see; encode.workers starts worker processes. Use a folder or an object store URL.")
    result = EncodeResult(split, p.store, p.source.label, len(p.manifest))
    with exclusive(p.writer_lock, f"latent store {p.store}"):
        for orphan in p.lock.parent.glob(f".{p.lock.name}.*.tmp"):  # a lock write that was killed
            orphan.unlink(missing_ok=True)
        verdict = p.check()
        if verdict.up_to_date:
            result.up_to_date = True
            return result
        log(f"encode {split}: " + "; ".join(verdict.reasons))
        hashes = HashCache(ws.hash_cache)
        _encode(p, cfg, result, log, verdict.lock, hashes)
        failures_csv = ws.failures_csv(split)
        if result.failures:
            _write_failures(failures_csv, result.failures, p.manifest)
            result.failures_csv = failures_csv
            if not skip_bad:
                raise EncodeFailures(
                    f"{len(result.failures)} of {result.rows} images could not be read; every other "
                    f"row was encoded. See {failures_csv} (line, path, reason). Fix or remove those "
                    "rows and rerun, or pass --skip-bad to accept the split without them.")
        else:
            failures_csv.unlink(missing_ok=True)
        paths = p.manifest.column("path")
        bad = sorted(paths[r] for r, _ in result.failures)
        since = time.time_ns()
        lock = locks.write_lock(p.lock, "encode", p.inputs, p.store, split=split, skipped_bad=bad,
                                vae=p.source.label, encoder=p.encoder_fp)
        from leakpipe.pipeline.store import chunk_checks

        chunk_checks.remember(p.store, lock["outputs"], hashes, since)  # the next encode need not read them
        hashes.save()
        p.damage_report.unlink(missing_ok=True)
    return result
