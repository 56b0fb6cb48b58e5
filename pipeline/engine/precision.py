"""Mixed precision and the GPU-only speed-ups, each with its CPU fallback.

`compute.precision`: fp32, or autocast to bf16/fp16 with fp32 master weights (the optimiser steps
fp32 parameters; fp16 adds a gradient scaler). It changes results, so it is in the training and
embedding fingerprints. `compute.compile` (torch.compile with `compute.compile_backend`) and
channels_last (CUDA only) are execution settings: they change speed, and at most the last bits of
a float.
"""

from __future__ import annotations

import contextlib

import torch

from leakpipe.pipeline.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class Compiled:
    """torch.compile(fn) (a module, or a bound method such as a VAE's encode) as a callable.
    Compilation happens at calls (the first, and again for a new input shape or mode), so that is
    where a failing backend is turned into an error that says what to change. The module itself stays
    the one to train, save and switch between modes."""

    def __init__(self, fn, backend: str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise UserError(
                f"compute.compile_backend = {backend!r} is not a torch.compile backend here; "
                f"choose one of: {', '.join(sorted(b for b in known if 'TESTING' not in b))}"
            )
        self.backend, self._fn = backend, torch.compile(fn, backend=backend)

    def __call__(self, *args, **kwargs):
        import torch._dynamo.exc

        try:
            return self._fn(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise UserError(
                f"compute.compile = true, but torch.compile ({self.backend}) failed here: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; set "
                "compute.compile = false, or another compute.compile_backend "
                "(inductor on a CPU needs a working C++ compiler)"
            ) from exc


def compiled(fn, enabled: bool, backend: str = "inductor"):
    """`fn` compiled with `backend` when enabled (a Compiled), else `fn` itself."""
    return Compiled(fn, backend) if enabled else fn


def channels_last(module, device: torch.device, precision: str = "fp32"):
    """The module (and, through the flag, the model's inputs) in channels_last layout where that was
    measured to help: on CUDA, whose tensor cores read NHWC, and on a CPU for bf16/fp16, where oneDNN
    has NHWC kernels only (a training step 7.7x faster in bf16 on a 2-core x86 CPU without AVX-512;
    fp32 0.443 vs 0.435 s, so the fp32 CPU path stays as it was)."""
    if device.type != "cuda" and precision == "fp32":
        return module
    module.channels_last_inputs = True
    return module.to(memory_format=torch.channels_last)


def cache_placement(need_bytes: int, device: torch.device, gpu_budget_bytes: float) -> str:
    """Where training holds its in-memory latents: "gpu" on CUDA when they fit `gpu_budget_bytes`
    (compute.gpu_cache_gb), else "pinned" host memory on CUDA, and plain "host" memory on a CPU."""
    if device.type != "cuda":
        return "host"
    return "gpu" if need_bytes <= gpu_budget_bytes else "pinned"


def check_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device} was asked for, but this torch ({torch.__version__}) has no usable CUDA; "
            "set compute.device / encode.device to auto or cpu, or install a CUDA build of torch"
        )
    return device
