"""Training checkpoints: a folder of safetensors weights, optimizer state and JSON.

``MODULE.safetensors`` holds each module's weights; ``optimizers.pt`` holds optimizer and
LR-scheduler state dicts (tensors, numbers and dicts only, loaded with
``torch.load(weights_only=True)``, so nothing arbitrary is ever unpickled); ``state.json``
holds the step, data position, RNG seeds and the full stage config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
OPTIMIZERS = "optimizers.pt"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def save(folder: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any], state: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(module).state_dict().items()}
        save_file(weights, folder / f"{name}.safetensors")
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, folder / OPTIMIZERS)
    (folder / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def load(folder: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict[str, Any]:
    """Restore modules and optimizers in place; return the saved state."""
    folder = Path(folder)
    for name, module in modules.items():
        unwrap(module).load_state_dict(load_file(folder / f"{name}.safetensors"))
    saved = torch.load(folder / OPTIMIZERS, weights_only=True, map_location="cpu")
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    return json.loads((folder / STATE).read_text())


def load_weights(folder: str | Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    unwrap(module).load_state_dict(load_file(Path(folder) / f"{name}.safetensors"))
    return module


def save_tensor(folder: str | Path, name: str, tensor: torch.Tensor) -> None:
    """One tensor (an RNG state, say) as ``NAME.safetensors``."""
    save_file({"tensor": tensor.contiguous()}, Path(folder) / f"{name}.safetensors")


def load_tensor(folder: str | Path, name: str) -> torch.Tensor:
    return load_file(Path(folder) / f"{name}.safetensors")["tensor"]
