"""How the UNet is spread over the Ray Train ranks: ``ddp`` or ``fsdp``.

``ddp``: every rank holds the whole model and optimizer state; DistributedDataParallel
(through Ray Train's ``prepare_model``) averages the gradients. ``fsdp``: each rank holds
1/world of the parameters, gradients and optimizer state (Zhao et al. 2023, "PyTorch
FSDP"), through torch's ``fully_shard`` (FSDP2): each down, mid and up block is a unit
gathered for its forward and backward and freed after, the gradients reduce-scattered. Ray
Train's own ``prepare_model(parallel_strategy="fsdp")`` wraps the older FSDP1 class and
refuses CPU workers, so ldmflow shards the model itself in Ray Train's process group, on
GPUs (nccl) and CPUs (gloo) alike. The EMA copy is sharded the same way, so its update is
local to each rank; a sample grid gathers it whole on rank 0 only.

Weights stay fp32 under both (mixed precision is bf16 autocast around the forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

Strategy = Literal["ddp", "fsdp"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def prepare(model: torch.nn.Module, ema: torch.nn.Module, strategy: Strategy, device: torch.device,
            world: int) -> torch.nn.Module:
    """The model to train (wrapped for ``ddp``, sharded in place for ``fsdp``), with ``ema``
    moved to ``device`` and, for ``fsdp``, sharded like the model. Build the optimizer over
    the returned model's parameters afterwards: sharding replaces them."""
    if strategy == "ddp":
        import ray.train.torch

        ema.to(device)
        return ray.train.torch.prepare_model(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh and the collectives use the current device
    mesh = init_device_mesh(device.type, (world,))
    for module in (model.to(device), ema.to(device)):
        for block in _blocks(module):
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
    return model


def _blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """A diffusers UNet's down, mid and up blocks: the units FSDP gathers one at a time."""
    return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Gradients accumulate locally, unsynchronised, inside (when ``skip``): the micro-batches
    of gradient accumulation before the last."""
    if not skip:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def whole(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``value`` (a replicated DTensor, such as a sharded model's gradient
    norm, made whole)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def cpu_copy(module: torch.nn.Module, rank: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """A whole CPU copy of ``module`` on rank 0 (None on the others), for work off the training
    loop. A sharded module is gathered: every rank must call this at the same step."""
    import copy

    if not is_sharded(module):
        return copy.deepcopy(unwrap(module)).to("cpu") if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    whole = build()
    whole.load_state_dict(state)
    return whole.eval()
