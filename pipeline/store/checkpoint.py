"""Model files and training checkpoints: safetensors for tensors, JSON for the rest. Never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from leakpipe.pipeline.store.atomic import atomic_path


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> tuple[bytes, memoryview]:
    """A safetensors file's bytes as (length and header, tensor data), the same for the same tensors and
    metadata: safetensors writes its `__metadata__` in hash-map order (it differs from one call to the
    next), so the header is written again with the metadata keys (and their JSON values' keys) sorted;
    the tensors are untouched, and not copied again (a checkpoint is four times the model)."""
    from safetensors.torch import save

    data = save(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        metadata={k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()},
    )
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text, memoryview(data)[8 + n :]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors write; `metadata` values are JSON-encoded into the header (deterministic bytes)."""
    head, body = safetensors_parts(tensors, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(body)


def read_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with its JSON values decoded) of a safetensors file's bytes."""
    from safetensors.torch import load

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    return load(data), {k: json.loads(v) for k, v in header.items()}


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return read_safetensors(Path(path).read_bytes())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {
        f"optim.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
        for i, st in sd["state"].items()
        for k, v in st.items()
    }
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


CHECKPOINT = "checkpoint.safetensors"


class DamagedCheckpoint(Exception):
    pass


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b-128 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy of it
    return h.hexdigest()


def save_checkpoint(
    folder: Path,
    model,
    opt,
    best: dict[str, torch.Tensor],
    state: dict,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """One file: weights, optimizer state, the best weights so far (with the feature statistics), the
    training state and `extra` named groups of tensors (the weight average), with a checksum of every
    tensor in its header. A single atomic rename, so a kill leaves the previous checkpoint or this
    one, never a mix of two epochs."""
    opt_tensors, groups = _optimizer_tensors(opt)
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **opt_tensors,
        **{f"best.{k}": v for k, v in best.items()},
        **{f"extra.{name}.{k}": v for name, group in (extra or {}).items() for k, v in group.items()},
    }
    save_tensors(
        Path(folder) / CHECKPOINT,
        tensors,
        {"state": {**state, "param_groups": groups}, "blake2b": tensors_hash(tensors)},
    )


def load_checkpoint(folder: Path, model, opt, fingerprint: str) -> tuple[dict, dict, dict] | None:
    """(state, best weights, extra groups) after loading model and optimizer in place; None if there
    is no checkpoint of this training; DamagedCheckpoint if it does not match its checksum."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path)
    except Exception as exc:  # a damaged header or payload: safetensors and json say why
        raise DamagedCheckpoint(f"unreadable: {exc}") from None
    if meta.get("blake2b") != tensors_hash(tensors):
        raise DamagedCheckpoint("its tensors do not match the checksum in its header")
    state = meta["state"]
    if state.get("fingerprint") != fingerprint:
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer(opt, tensors, state.pop("param_groups"))
    extra: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("extra."):
            name, key = k[6:].split(".", 1)
            extra.setdefault(name, {})[key] = v
    return state, {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}, extra
