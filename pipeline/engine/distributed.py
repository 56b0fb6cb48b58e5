"""Stage one on a dask.distributed cluster: one task per store chunk, the VAE loaded once per worker.

Each task owns whole chunks (two writers never share one), encodes its rows in the same batches as
the single-process engine (so the bytes are the same), writes straight into the store and returns
the row hashes it wrote. The driver holds the store's writer lock, checks the returned hashes and
writes the lock file. A task whose worker dies is rerun elsewhere by the scheduler: rewriting a
whole chunk is idempotent, and each chunk file is replaced atomically.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from distributed import WorkerPlugin, get_worker

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.engine.autoencoders import load_encoder

PLUGIN = "leakpipe-vae"


@dataclass
class VaePlugin(WorkerPlugin):
    """Loads the frozen VAE once per worker (on the worker's GPU if it has a GPU resource)."""

    source: object  # pipeline.vae.VaeSource
    dtype: str
    device: str  # auto | cpu | cuda | cuda:N
    threads: int = 0  # intra-op CPU threads; 0 keeps the worker's (dask sets 1)
    name = PLUGIN

    def setup(self, worker):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        device = self.device
        if device == "auto":
            gpus = torch.cuda.device_count()
            # local workers are named 0..N-1: spread them over the visible GPUs
            device = (
                f"cuda:{int(worker.name) % gpus}"
                if gpus and str(worker.name).isdigit()
                else ("cuda" if gpus else "cpu")
            )
        self.torch_device = torch.device(device)
        self.vae = load_encoder(self.source, self.dtype, self.torch_device)


def encode_chunk(
    store: str,
    start: int,
    stop: int,
    rows: list[int],
    paths: list[str],
    row_hashes: np.ndarray,
    preprocess,
    batch_size: int,
    store_dtype: str,
) -> dict:
    """Worker task: encode `rows` of the chunk [start, stop) and write the chunk. Returns the rows
    written with their hashes (hex) and the rows that failed with the reason."""
    from leakpipe.pipeline.engine import encoding
    from leakpipe.pipeline.store import latent_store
    from leakpipe.pipeline.engine.images import BadImage, read_image

    plugin = get_worker().plugins[PLUGIN]
    done, means, logvars, failed = [], [], [], []
    for k in range(0, len(rows), batch_size):  # the batches of encoding.plan_batches
        batch, images = [], []
        for r, p in zip(rows[k : k + batch_size], paths[k : k + batch_size]):
            try:
                images.append(read_image(p, preprocess))
                batch.append(r)
            except BadImage as exc:
                failed.append((r, str(exc)))
        if batch:
            m, lv = encoding.encode_batch(plugin.vae, plugin.torch_device, np.stack(images), store_dtype)
            done += batch
            means.append(m)
            logvars.append(lv)
    if done:
        arrays = latent_store.row_arrays(latent_store.open_store(store, "r+"))
        idx = np.array(done)
        latent_store.write_chunk(
            arrays,
            start,
            stop,
            idx,
            {"mean": np.concatenate(means), "logvar": np.concatenate(logvars)},
            row_hashes[idx - start],
        )
    return {"rows": done, "hashes": [row_hashes[r - start].tobytes().hex() for r in done], "failed": failed}


@contextmanager
def connect(workers: int, scheduler: str):
    """A client of an existing scheduler, or of a local cluster of `workers` processes (one thread
    each; with at least as many GPUs, one GPU resource each)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise UserError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
        with client:
            yield client
        return
    import torch

    resources = {"GPU": 1} if 0 < workers <= torch.cuda.device_count() else None
    environ = dict(os.environ)
    try:
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, resources=resources, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:  # LocalCluster leaves OMP_NUM_THREADS=1 (and more) in this process's environment,
        os.environ.clear()  # which every later subprocess would inherit
        os.environ.update(environ)


def gpu_workers(client) -> bool:
    return any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values())


def encode_pending(
    client, source, cfg, store: str, paths: list, pending: np.ndarray, want: np.ndarray, progress=None
) -> tuple[list[int], list]:
    """Submit one task per chunk with pending rows; returns (rows written, failures)."""
    from distributed import as_completed

    client.register_plugin(VaePlugin(source, cfg.vae.dtype, cfg.encode.device, cfg.encode.torch_threads), name=PLUGIN)
    chunk = cfg.store.chunk_rows
    resources = {"GPU": 1} if gpu_workers(client) else None
    futures = []
    for c in np.unique(pending // chunk):
        rows = pending[pending // chunk == c].tolist()
        start, stop = int(c) * chunk, min((int(c) + 1) * chunk, len(want))
        futures.append(
            client.submit(
                encode_chunk,
                str(store),
                start,
                stop,
                rows,
                [str(paths[r]) for r in rows],
                want[start:stop],
                cfg.preprocess,
                cfg.encode.batch_size,
                cfg.store.dtype,
                resources=resources,
                pure=False,
                key=f"leakpipe-encode-{c}-{want[start:stop].tobytes().hex()[:16]}",
            )
        )
    written, failed = [], []
    for fut in as_completed(futures):
        res = fut.result()
        for r, h in zip(res["rows"], res["hashes"]):
            if bytes.fromhex(h) != want[r].tobytes():
                raise RuntimeError(f"worker reported hash {h} for row {r}, expected {want[r].tobytes().hex()}")
        written += res["rows"]
        failed += [tuple(f) for f in res["failed"]]
        if progress is not None:
            progress.update(len(res["rows"]) + len(res["failed"]))
    return written, failed
