"""Training checkpoints: a folder of safetensors weights, optimizer state and JSON.

Whole (one rank writes everything): ``MODULE.safetensors`` holds each module's weights;
``optimizers.pt`` holds optimizer and LR-scheduler state dicts (tensors, numbers and dicts
only, loaded with ``torch.load(weights_only=True)``, so nothing arbitrary is ever
unpickled).

Sharded (a model sharded by FSDP; every rank writes its own part at once):
``sharded/shard-0000R-*.safetensors`` holds rank R-1's slices of every module's weights and
of the optimizer state, written by ``torch.distributed.checkpoint`` in its safetensors
format, whose slice offsets are JSON in each file's header (its default format keeps them
in a pickle, which ldmflow never loads); ``sharded.json`` holds the optimizer
hyperparameters and LR-scheduler state. It loads into any number of ranks, sharded or
not, and into one process (:func:`load_weights`).

Both: ``state.json`` holds the format version, the step, data position, RNG seeds and the
full stage config; ``rng-R.safetensors`` a rank's generator state. A checkpoint of another
format version is refused before anything is read into the modules.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldmflow.errors import LdmflowError
from ldmflow.model import meta
from ldmflow.training import parallel
from ldmflow.training.parallel import unwrap

VERSION = 1  # of the checkpoint format: another is refused, not converted
STATE = "state.json"
OPTIMIZERS = "optimizers.pt"
SHARDED = "sharded"
SHARDED_EXTRA = "sharded.json"


class CheckpointError(LdmflowError, ValueError):
    """A checkpoint this ldmflow does not read: another format version."""


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE).write_text(json.dumps({**state, "version": VERSION}, indent=2, sort_keys=True) + "\n")


def read_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` less its version, which must be this ldmflow's."""
    state = json.loads((Path(folder) / STATE).read_text())
    meta.check_version(state.pop("version", 0), VERSION, f"checkpoint {folder}",
                       "start the run afresh (ldmflow run --force STAGE, or another checkpoint_storage)",
                       CheckpointError)
    return state


def save(folder: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any], state: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(module).state_dict().items()}
        save_file(weights, folder / f"{name}.safetensors")
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, folder / OPTIMIZERS)
    _write_state(folder, state)


def load(folder: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> dict[str, Any]:
    """Restore modules and optimizers in place; return the saved state."""
    folder = Path(folder)
    state = read_state(folder)
    for name, module in modules.items():
        unwrap(module).load_state_dict(load_file(folder / f"{name}.safetensors"))
    saved = torch.load(folder / OPTIMIZERS, weights_only=True, map_location="cpu")
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    return state


def load_weights(folder: str | Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Module ``name``'s weights into ``module``, a whole one, from either kind of checkpoint
    (a sharded one read in this process alone)."""
    folder = Path(folder)
    read_state(folder)
    if not is_sharded(folder):
        unwrap(module).load_state_dict(load_file(folder / f"{name}.safetensors"))
        return module
    import torch.distributed.checkpoint as dcp

    weights = {f"{name}.{k}": v for k, v in unwrap(module).state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(weights, storage_reader=dcp.HuggingFaceStorageReader(str(folder / SHARDED)), no_dist=True)
    unwrap(module).load_state_dict({k.removeprefix(f"{name}."): v for k, v in weights.items()})
    return module


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / SHARDED).is_dir()


# ---------------------------------------------------------------------------------------
# Training state of any parallel layout: modules whole, DDP-wrapped or FSDP-sharded, with
# their optimizers (each named with the module it optimizes) and LR schedules.

Optimizers = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]


def save_sharded(folder: str | Path, rank: int, *, modules: dict[str, torch.nn.Module], optimizers: Optimizers,
                 schedules: dict[str, Any], state: dict[str, Any]) -> None:
    """This rank's part of a sharded checkpoint into its own ``folder`` (Ray Train gathers
    every rank's files into one checkpoint). Every rank must call it at the same step."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    tensors, extra = _training_state(modules, optimizers)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / SHARDED), save_distributed=True))
    if rank == 0:
        extra["schedules"] = {name: schedule.state_dict() for name, schedule in schedules.items()}
        (folder / SHARDED_EXTRA).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        _write_state(folder, state)


def load_training(folder: str | Path, *, modules: dict[str, torch.nn.Module], optimizers: Optimizers,
                  schedules: dict[str, Any]) -> dict[str, Any]:
    """Restore a checkpoint of either kind in place, whatever the layout it was written from
    and is read into (a whole checkpoint into sharded modules, a sharded one into whole or
    DDP modules, with any number of ranks); return the saved state. With sharded modules
    every rank must call it."""
    folder = Path(folder)
    state = read_state(folder)
    if is_sharded(folder):
        _load_sharded(folder, modules, optimizers, schedules)
    elif any(parallel.is_sharded(module) for module in modules.values()):
        _load_whole_into_sharded(folder, modules, optimizers, schedules)
    else:
        load(folder, modules=modules, optimizers={name: opt for name, (_, opt) in optimizers.items()} | schedules)
    return state


def _training_state(modules: dict[str, torch.nn.Module], optimizers: Optimizers) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the modules and optimizers as one flat dict (``NAME.KEY`` and
    ``NAME.state.PARAM.KEY``, sharded tensors as they are), and the rest as JSON-able values."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {"optimizers": {}}
    for name, module in modules.items():
        tensors.update({f"{name}.{key}": value for key, value in get_model_state_dict(unwrap(module)).items()})
    for name, (module, optimizer) in optimizers.items():
        saved = get_optimizer_state_dict(unwrap(module), optimizer)  # keyed by parameter name
        values = {}
        for param, fields in saved["state"].items():
            for key, value in fields.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.state.{param}.{key}"] = value
                else:
                    values.setdefault(param, {})[key] = value
        extra["optimizers"][name] = {"param_groups": saved["param_groups"], "values": values}
    return tensors, json.loads(json.dumps(extra))


def _load_sharded(folder: Path, modules: dict[str, torch.nn.Module], optimizers: Optimizers,
                  schedules: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    tensors, _ = _training_state(modules, optimizers)  # the shapes and shards to read into
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder / SHARDED)),
             no_dist=not torch.distributed.is_initialized())
    extra = json.loads((folder / SHARDED_EXTRA).read_text())
    for name, module in modules.items():
        prefix = f"{name}."
        set_model_state_dict(unwrap(module), {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    for name, (module, optimizer) in optimizers.items():
        saved = extra["optimizers"][name]
        state: dict[str, dict[str, Any]] = {param: dict(values) for param, values in saved["values"].items()}
        prefix = f"{name}.state."
        for key, value in tensors.items():
            if key.startswith(prefix):
                param, field = key.removeprefix(prefix).rsplit(".", 1)
                state.setdefault(param, {})[field] = value
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                  for group in saved["param_groups"]]  # JSON made the betas a list
        set_optimizer_state_dict(unwrap(module), optimizer, {"state": state, "param_groups": groups})
    for name, schedule in schedules.items():
        schedule.load_state_dict(extra["schedules"][name])


def _load_whole_into_sharded(folder: Path, modules: dict[str, torch.nn.Module], optimizers: Optimizers,
                             schedules: dict[str, Any]) -> None:
    """A whole checkpoint (every rank reads all of it) into sharded modules."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True)
    for name, module in modules.items():
        set_model_state_dict(module, load_file(folder / f"{name}.safetensors"), options=whole)
    saved = torch.load(folder / OPTIMIZERS, weights_only=True, map_location="cpu")
    for name, (module, optimizer) in optimizers.items():
        names = [param for param, _ in module.named_parameters()]  # the order torch.optim numbers them in
        by_index = saved[name]
        by_name = {"state": {names[i]: fields for i, fields in by_index["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in by_index["param_groups"]]}
        set_optimizer_state_dict(module, optimizer, by_name, options=whole)
    for name, schedule in schedules.items():
        schedule.load_state_dict(saved[name])


def save_tensor(folder: str | Path, name: str, tensor: torch.Tensor) -> None:
    """One tensor (an RNG state, say) as ``NAME.safetensors``."""
    save_file({"tensor": tensor.contiguous()}, Path(folder) / f"{name}.safetensors")


def load_tensor(folder: str | Path, name: str) -> torch.Tensor:
    return load_file(Path(folder) / f"{name}.safetensors")["tensor"]
