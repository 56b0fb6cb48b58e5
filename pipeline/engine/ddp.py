"""Multi-process training under `torchrun` (DistributedDataParallel); a no-op in a plain process.

Every rank reads the same shuffled global batches and trains on its contiguous shard of each; the
loss is scaled so that DDP's gradient average equals the gradient of the global batch's mean loss.
On CUDA, BatchNorm becomes SyncBatchNorm so a step matches the single-process step; on CPU (gloo)
SyncBatchNorm does not exist, so each rank normalises with its shard's statistics (the one
documented difference from a single process). Rank 0 writes checkpoints, the model and embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def launched_rank() -> int:
    """This process's rank under torchrun (0 otherwise); cheap, no torch import."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Ddp:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of n."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum over ranks (float64), for epoch statistics."""
        if not self.active:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def setup(device_name: str):
    """(Ddp, device): join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    import torch
    import torch.distributed as dist

    from leakpipe.pipeline.engine.vae import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Ddp(), device
    ctx = Ddp(launched_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def wrap(model, ctx: Ddp, device):
    """DistributedDataParallel around `model` (SyncBatchNorm on CUDA); the model itself otherwise."""
    import torch

    if not ctx.active:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(model):
    import torch

    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
