"""What every ldmflow Ray Train worker loop does the same way: its start (config, rank,
world size, device), its loader and the batches of its epochs resumed mid-epoch, the time it
waits for them, and its checkpoints.

The autoencoder loop (:mod:`ldmflow.training.autoencoder_loop`) and the diffusion loop
(:mod:`ldmflow.training.diffusion_loop`) keep only what is their own: the model, the loss
and the optimizer steps.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ldmflow import configs
from ldmflow.data import shard_order
from ldmflow.data.shard_stream import BatchStream, ShardStream
from ldmflow.errors import LdmflowError
from ldmflow.registry import runs

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


def loader(stream: ShardStream, batch_size: int, collate: Callable[[list[Any]], Any], *, workers: int,
           prefetch: int) -> tuple[BatchStream, torch.utils.data.DataLoader]:
    """The rank's batches: ``workers`` persistent DataLoader worker processes each read a
    share of the rank's shards, decode and collate, ``prefetch`` batches ahead of the step (0
    workers: all of it in the training process, between steps)."""
    batched = BatchStream(stream, batch_size, collate, readers=max(1, workers))
    return batched, torch.utils.data.DataLoader(
        batched, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers else None)


class DataWait:
    """Seconds the training loop spent waiting for its next batch, and since when."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.waited, self.since = 0.0, time.perf_counter()

    def fraction(self) -> float:
        """The share of the time since :meth:`restart` spent waiting for data."""
        return self.waited / max(time.perf_counter() - self.since, 1e-9)


def batches(batched: BatchStream, loader, rank: int, start: dict[str, Any] | None,
            wait: DataWait | None = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """``(position, batch)`` for ever, from ``start`` (a position a checkpoint recorded, or
    :func:`rank_start`'s).

    A position is ``{"epoch", "readers", "first"}``: the epoch, how far each of the rank's
    readers (loader workers) has read in it, and which of them the loader asks next; in an
    interrupted epoch resumed on other ranks or readers, also ``"units"``, what each reader
    reads of the epoch's remainder. Each epoch reshuffles the shards; on resumption every
    reader passes over what it had read without decoding it, and the loader goes on in the
    same order, so the run sees exactly the batches it would have seen without the
    interruption. An epoch without a single batch raises :class:`EmptyEpoch` naming what
    the readers skipped. Time spent waiting for a batch is added to ``wait``.
    """
    readers = batched.readers
    position = resume_position(start, readers)
    if "units" in position:  # before the loader's workers start: they hold a copy of the stream
        batched.stream.rest = (position["epoch"], position["units"])
    rest = batched.stream.rest
    while True:
        epoch, positions, first = position["epoch"], list(position["readers"]), position["first"]
        units = {"units": rest[1]} if rest is not None and rest[0] == epoch else {}
        resumed = any(positions) or bool(units)
        batched.set_epoch(epoch, positions, first)
        got, skipped, errors = False, 0, []
        iterator = iter(loader)
        while True:
            started = time.perf_counter()
            item = next(iterator, None)
            if wait is not None:
                wait.waited += time.perf_counter() - started
            if item is None:
                break
            if item.data is None:  # a reader's last word
                skipped, errors = skipped + item.skipped, errors + list(item.errors)
                continue
            got = True
            positions[item.reader] = item.position
            yield {"epoch": epoch, "readers": list(positions), "first": (item.reader + 1) % readers, **units}, item.data
        if not got and not resumed:
            raise EmptyEpoch(f"rank {rank} read no batch in epoch {epoch}: {skipped} samples or shards skipped "
                             f"({'; '.join(errors[:3])})")
        position = {"epoch": epoch + 1, "readers": [0] * readers, "first": 0}


def resume_position(saved: dict[str, Any] | None, readers: int) -> dict[str, Any]:
    """A saved position for this many readers (:func:`rank_start`'s): as saved; with another
    number of readers, the next epoch from its start."""
    start = {"epoch": 0, "readers": [0] * readers, "first": 0}
    if not saved:
        return start
    if len(saved["readers"]) == readers:
        return {"epoch": saved["epoch"], "readers": list(saved["readers"]), "first": saved["first"],
                **({"units": saved["units"]} if "units" in saved else {})}
    return {**start, "epoch": saved["epoch"] + 1}


def rank_start(stream: ShardStream, saved: Sequence[dict[str, Any]], readers: int) -> dict[str, Any]:
    """This rank's data position among every rank's ``saved`` positions (a checkpoint's).

    On the ranks and readers that saved them, its own. On another number of either (a run
    resumed after losing a node, or on a larger reservation) the interrupted epoch's
    remainder is dealt anew (:func:`ldmflow.data.shard_order.remainder`), so each of its
    samples not yet taken out of a shuffle buffer is read once; where the shards' sample
    counts are unknown, every rank starts the next epoch instead.
    """
    world, rank = stream.world_size, stream.rank
    if len(saved) == world and len(saved[rank].get("readers", ())) == readers:
        return saved[rank]
    if stream.counts is None:
        return {"epoch": max(position["epoch"] for position in saved) + 1, "readers": [0] * readers, "first": 0}
    epoch, left = shard_order.remainder(saved, len(stream.urls), stream.counts, seed=stream.seed,
                                         shuffle_buffer=stream.shuffle_buffer)
    units = [[[shard, None if picks is None else list(picks)]
              for shard, picks in shard_order.deal(left, rank=rank, world_size=world, reader=reader, readers=readers)]
             for reader in range(readers)]
    return {"epoch": epoch, "readers": [0] * readers, "first": 0, "units": units}


def restore(load: Callable[[str], dict[str, Any]]) -> dict[str, Any] | None:
    """``load(folder)`` of Ray Train's latest checkpoint of this run, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as folder:
        return load(folder)


_in_process = {"on": False, "last": None}  # Ray Train's local mode: the loop's last checkpoint folder


def keep_only_the_last_checkpoint(on: bool, discard_last: bool = False) -> None:
    """In Ray Train's local mode nothing uploads a reported checkpoint and removes its folder:
    :func:`report` then removes the one before (the last is removed by
    :func:`ldmflow.training.launch.fit` once read, or here with ``discard_last``: a loop that
    failed, whose checkpoint nobody will read)."""
    if discard_last and _in_process["last"]:
        shutil.rmtree(_in_process["last"], ignore_errors=True)
    _in_process.update(on=on, last=None)


def report(metrics: dict[str, Any], rank: int, write: Callable[[str], None], every_rank: bool = False) -> None:
    """Report ``metrics`` with a checkpoint that rank 0 writes with ``write(folder)``; the other
    ranks report the metrics alone (Ray Train keeps rank 0's files). With ``every_rank``
    (a sharded checkpoint) every rank writes its own files, and Ray Train gathers them into
    the one checkpoint.

    The folder is written locally, then uploaded by Ray Train in the background while the
    steps go on (one upload at a time; the checkpoint is recorded, and so can be resumed
    from, only once its upload is complete; the local folder is removed then). The metrics
    queued so far are written first, so the run's history is never behind its checkpoint."""
    import ray.train

    saved = None
    if rank == 0:
        runs.flush()
    if rank == 0 or every_rank:
        folder = tempfile.mkdtemp(prefix="ldmflow-checkpoint-")
        write(folder)
        saved = ray.train.Checkpoint.from_directory(folder)
    ray.train.report(metrics, checkpoint=saved, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    if _in_process["on"] and saved is not None:
        if _in_process["last"]:
            shutil.rmtree(_in_process["last"], ignore_errors=True)
        _in_process["last"] = folder
