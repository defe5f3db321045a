"""What every ldmflow Ray Train worker loop does the same way: its start (config, rank,
world size, device), the batches of its epochs resumed mid-epoch, and its checkpoints.

The autoencoder loop (:mod:`ldmflow.training.autoencoder_loop`) and the diffusion loop
(:mod:`ldmflow.training.diffusion_loop`) keep only what is their own: the model, the loss
and the optimizer steps.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ldmflow import configs
from ldmflow.errors import LdmflowError

C = TypeVar("C")


class EmptyEpoch(LdmflowError, RuntimeError):
    """An epoch that yielded no batch: the run would otherwise spin for ever."""


@dataclass(frozen=True)
class Worker(Generic[C]):
    """One Ray Train worker: the stage config it runs, its place in the group, its device."""

    config: C
    rank: int
    world: int
    device: torch.device


def start(config_class: type[C], loop_config: dict[str, Any]) -> Worker[C]:
    """The worker's config (rebuilt from the driver's JSON) and its rank, world size and device."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return Worker(configs.from_dict(config_class, loop_config["config"]), context.get_world_rank(),
                  context.get_world_size(), ray.train.torch.get_device())


def batches(stream, loader, rank: int, epoch: int, batches_done: int) -> Iterator[tuple[int, int, Any]]:
    """``(epoch, index in epoch, batch)`` for ever, from the position a checkpoint recorded.

    Each epoch reshuffles the worker's shards (``stream.set_epoch``); on resumption the
    first ``batches_done`` batches of ``epoch`` are read and passed over, so the run sees
    exactly the data it would have seen without the interruption. An epoch without a single
    batch raises :class:`EmptyEpoch` naming what the stream skipped.
    """
    while True:
        stream.set_epoch(epoch)
        index = -1
        for index, batch in enumerate(loader):
            if index >= batches_done:
                yield epoch, index, batch
        if index < 0:
            raise EmptyEpoch(f"rank {rank} read no batch in epoch {epoch}: {stream.skips.skipped} samples or "
                             f"shards skipped ({'; '.join(stream.skips.errors[:3])})")
        epoch, batches_done = epoch + 1, 0


def restore(load: Callable[[str], dict[str, Any]]) -> dict[str, Any] | None:
    """``load(folder)`` of Ray Train's latest checkpoint of this run, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as folder:
        return load(folder)


def report(metrics: dict[str, Any], rank: int, write: Callable[[str], None]) -> None:
    """Report ``metrics`` with a checkpoint that rank 0 writes with ``write(folder)``; the other
    ranks report the metrics alone (Ray Train keeps rank 0's files)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if rank == 0:
            write(folder)
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved)
