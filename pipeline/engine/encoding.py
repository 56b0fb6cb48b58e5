"""The batched encode engine: decode in worker processes, VAE on the device, writes in a thread.

Batches never straddle a chunk, and each chunk is written once all its pending rows are done, so
the batches of a chunk are the same whether a run is fresh or resumed after a crash (bitwise
identical results on CPU) and a chunk has exactly one writer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.config import PreprocessConfig
from leakpipe.pipeline.engine.images import BadImage, read_image, to_model_range


class ImageRows(torch.utils.data.Dataset):
    """Row index -> (row, uint8 HWC image or None, error message or None)."""

    def __init__(self, paths: list[Path] | list[str], cfg: PreprocessConfig):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            return row, read_image(self.paths[row], self.cfg), None
        except BadImage as exc:
            return row, None, str(exc)


def collate(items):
    ok = [(r, img) for r, img, err in items if err is None]
    failed = [(r, err) for r, _, err in items if err is not None]
    rows = torch.tensor([r for r, _ in ok], dtype=torch.long)
    images = torch.from_numpy(np.stack([img for _, img in ok])) if ok else None
    return rows, images, failed


def plan_batches(pending: np.ndarray, chunk_rows: int, batch_size: int) -> list[list[int]]:
    """Pending rows grouped by chunk, each chunk cut into batches of at most `batch_size`."""
    batches = []
    chunks = pending // chunk_rows
    order = np.argsort(chunks, kind="stable")  # by chunk, rows in their given order within it
    cuts = np.flatnonzero(np.diff(chunks[order])) + 1  # one split, not a scan of every row per chunk
    for part in np.split(pending[order], cuts) if len(pending) else []:
        rows = part.tolist()
        batches += [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    return batches


@dataclass
class ChunkWriter:
    """Collects encoded rows per chunk; a background thread writes each chunk once it is complete."""

    group: object
    chunk_rows: int
    n_rows: int
    row_hashes: np.ndarray
    pending: np.ndarray
    failures: list = field(default_factory=list)
    blocked: float = 0.0  # seconds add() waited for the disk (the queue of finished chunks was full)

    def __post_init__(self):
        chunks = self.pending // self.chunk_rows
        self._left = {int(c): int(n) for c, n in zip(*np.unique(chunks, return_counts=True))}
        self._parts: dict[int, list] = {c: [] for c in self._left}
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounds memory; blocks compute if disk lags
        self._error: BaseException | None = None
        self._arrays = latent_store.row_arrays(self.group)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def add(self, rows: np.ndarray, mean: np.ndarray, logvar: np.ndarray, failed) -> None:
        self.failures += failed
        for r, _ in failed:
            self._done(int(r) // self.chunk_rows, None, 1)
        chunks = rows // self.chunk_rows
        for c in np.unique(chunks).tolist():  # one chunk per batch (plan_batches), so mostly one part
            sel = chunks == c
            self._done(c, (rows[sel], mean[sel], logvar[sel]), int(sel.sum()))
        if self._error:
            raise self._error

    def _done(self, chunk: int, part, n: int) -> None:
        if part is not None:
            self._parts[chunk].append(part)
        self._left[chunk] -= n
        if self._left[chunk] == 0:
            start = time.perf_counter()
            self._queue.put((chunk, self._parts.pop(chunk)))
            self.blocked += time.perf_counter() - start

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            chunk, parts = job
            if parts and self._error is None:
                try:
                    self._write(chunk, parts)
                except BaseException as exc:  # re-raised in the main thread by add()/close()
                    self._error = exc

    def _write(self, chunk: int, parts: list) -> None:
        start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows)
        rows = np.concatenate([p[0] for p in parts])
        latents = {"mean": np.concatenate([p[1] for p in parts]), "logvar": np.concatenate([p[2] for p in parts])}
        latent_store.write_chunk(self._arrays, start, stop, rows, latents, self.row_hashes[rows])

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error:
            raise self._error


def encode_batch(vae, device, images, store_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) uint8 images (numpy or torch) -> (mean, logvar) of the posterior as stored."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    with torch.inference_mode():
        x = to_model_range(images.to(device, non_blocking=True)).to(vae.dtype)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        return (
            post.mean.float().cpu().numpy().astype(store_dtype),
            post.logvar.float().cpu().numpy().astype(store_dtype),
        )


def decode_workers(requested: int, device) -> int:
    """encode.num_workers, or with -1 (auto) every core but the driver's, at most 16 for a GPU and 2
    on a CPU, whose cores the VAE itself needs. A GPU needs many: decoding a 512-px PNG to 256 px took
    19-26 ms on one core here, while 271 GFLOP per image at an H100's dense bf16 peak is 0.27 ms."""
    if requested >= 0:
        return requested
    spare = max((os.cpu_count() or 1) - 1, 0)
    return min(spare, 16 if device.type == "cuda" else 2)


def encode_pending(
    vae,
    device,
    paths: list[Path] | list[str],
    pending: np.ndarray,
    writer: ChunkWriter,
    cfg: PreprocessConfig,
    batch_size: int,
    num_workers: int,
    store_dtype: str,
    progress=None,
) -> dict[str, float]:
    """Encode every pending row into the writer's store; bad files go to writer.failures. Returns the
    seconds the VAE's device stood idle waiting for decoded images ("decode") and for the disk ("write")."""
    batches = plan_batches(pending, writer.chunk_rows, batch_size)
    loader = torch.utils.data.DataLoader(
        ImageRows(paths, cfg),
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    decode, clock = 0.0, time.perf_counter()
    try:
        for rows, images, failed in loader:
            decode += time.perf_counter() - clock
            mean = logvar = np.zeros((0,))
            if images is not None:
                mean, logvar = encode_batch(vae, device, images, store_dtype)
            writer.add(rows.numpy(), mean, logvar, failed)
            if progress is not None:
                progress.update(len(rows) + len(failed))
            clock = time.perf_counter()
    finally:
        writer.close()
    return {"decode": decode, "write": writer.blocked}
