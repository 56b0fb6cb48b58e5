"""Model files and training checkpoints: safetensors for tensors, JSON for the rest. Never pickle."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leakpipe.pipeline.store.atomic import atomic_path, atomic_write_json


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors write; `metadata` values are JSON-encoded into the header."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
    return load_file(str(path)), meta


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(folder: Path, model, opt, extra: dict[str, torch.Tensor], state: dict) -> None:
    """checkpoint.safetensors (model, optimizer, extra tensors), then checkpoint.json (written last)."""
    opt_tensors, groups = _optimizer_tensors(opt)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors,
               **{f"extra.{k}": v for k, v in extra.items()}}
    save_tensors(Path(folder) / "checkpoint.safetensors", tensors)
    atomic_write_json(Path(folder) / "checkpoint.json", {**state, "param_groups": groups})


def load_checkpoint(folder: Path, model, opt) -> tuple[dict, dict] | None:
    """(state, extra tensors) after loading model and optimizer in place; None if there is none."""
    meta_path, tensor_path = Path(folder) / "checkpoint.json", Path(folder) / "checkpoint.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        return None
    state = json.loads(meta_path.read_text())
    tensors, _ = load_tensors(tensor_path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer(opt, tensors, state.pop("param_groups"))
    return state, {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
