"""The order an epoch reads a dataset's shards in: which shards each rank's readers take
(:func:`assign_shards`, :func:`reader_pass`), the shuffle buffer each reader passes its
samples through (:func:`shuffled`, and :func:`replay_shuffle`, where it stood after a number
of samples, worked out without reading one), and what is left of an interrupted epoch, dealt
anew to another number of ranks or readers (:func:`remainder`, :func:`deal`).

Pure functions of shard counts, seeds and positions: :class:`ldmflow.data.shard_stream.ShardStream`
reads by them, and a resumed training loop computes its start with them.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

def assign_shards(
    num_shards: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[list[int], tuple[int, int] | None]:
    """Which shards one reader (a rank's dataloader worker) reads this epoch.

    Shards are reshuffled each epoch from ``(seed, epoch)``, dealt round-robin to the ranks
    (so ranks' shard counts differ by at most one: no rank waits on another holding twice its
    share), then each rank's share round-robin to its loader workers. Together the readers
    cover every sample once. A rank with fewer shards than workers has each worker read the
    rank's whole share and keep one sample in ``num_workers``; with fewer shards than ranks,
    every reader reads every shard and keeps one sample in ``world_size * num_workers``. The
    second value is then that ``(index, n)``, else ``None``.
    """
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if num_shards < world_size:
        return order, (rank * num_workers + worker, world_size * num_workers)
    share = order[rank::world_size]
    if len(share) < num_workers:
        return share, (worker, num_workers)
    return share[worker::num_workers], None


Unit = tuple[int, "tuple[int, ...] | None"]
"""Part of a reader's pass: a shard's index, and which of its samples (by number in the shard,
ascending) the pass reads; None: all of them."""


def reader_pass(
    num_shards: int,
    counts: Sequence[int] | None,
    *,
    rank: int,
    world_size: int,
    reader: int,
    readers: int,
    epoch: int,
    seed: int,
    shuffle: bool,
) -> tuple[list[Unit] | None, random.Random]:
    """What one reader reads in ``epoch``, as units (:func:`assign_shards`), and the shuffle
    buffer's random stream. Where readers outnumber shards the units pick every n-th sample,
    which needs the shards' sample ``counts``; without them the units are None."""
    indices, split = assign_shards(num_shards, rank=rank, world_size=world_size, worker=reader, num_workers=readers,
                                   epoch=epoch, seed=seed, shuffle=shuffle)
    rng = random.Random(f"{seed}:{epoch}:{rank}:{reader}")
    if split is None:
        return [(i, None) for i in indices], rng
    if counts is None:
        return None, rng
    index, n = split
    units, offset = [], 0
    for i in indices:
        first = (index - offset) % n
        picks = tuple(range(first, counts[i], n))
        if picks:
            units.append((i, picks))
        offset += counts[i]
    return units, rng


def unit_sizes(units: Sequence[Unit], counts: Sequence[int]) -> list[int]:
    return [counts[shard] if picks is None else len(picks) for shard, picks in units]


def unseen(units: Sequence[Unit], counts: Sequence[int], kept: Sequence[int], taken: int) -> list[Unit]:
    """The samples of a pass over ``units`` not yet out of its shuffle buffer, as units: those
    from number ``taken`` on, and the ones ``kept`` in the buffer (:func:`replay_shuffle`)."""
    kept = sorted(kept)
    left, start = [], 0
    for (shard, picks), size in zip(units, unit_sizes(units, counts)):
        end = start + size
        if start >= taken:
            left.append((shard, picks))
        else:
            held = kept[bisect.bisect_left(kept, start):bisect.bisect_left(kept, min(end, taken))]
            local = [i - start for i in held] + list(range(max(taken - start, 0), size))
            if local:
                left.append((shard, tuple(local) if picks is None else tuple(picks[j] for j in local)))
        start = end
    return left


def remainder(saved: Sequence[dict[str, Any]], num_shards: int, counts: Sequence[int], *, seed: int,
              shuffle_buffer: int) -> tuple[int, list[Unit]]:
    """The epoch an interrupted run was in, and every sample of it that no reader had yet
    taken out of its shuffle buffer, from each rank's saved position (``{"epoch",
    "readers", "units"?}``, as :func:`ldmflow.training.loop.batches` yields them).

    The epoch is the earliest any rank was in: ranks whose share is smaller begin the next
    epoch first, and what they read of it is read again. Nothing is opened: each reader's
    buffer is replayed on sample numbers, which costs one random draw per sample read so far
    in the epoch, on every rank (about a second per 2M samples)."""
    epoch = min(p["epoch"] for p in saved)
    left: list[Unit] = []
    for rank, position in enumerate(saved):
        if position["epoch"] != epoch:
            continue  # this rank had read all of its share
        readers = len(position["readers"])
        for reader, skip in enumerate(position["readers"]):
            if "units" in position:  # the rank was reading an earlier remainder
                units, rng = as_units(position["units"][reader]), rest_rng(seed, epoch, rank, reader)
            else:
                units, rng = reader_pass(num_shards, counts, rank=rank, world_size=len(saved), reader=reader,
                                         readers=readers, epoch=epoch, seed=seed, shuffle=shuffle_buffer > 1)
            kept, taken, _ = replay_shuffle(sum(unit_sizes(units, counts)), shuffle_buffer, rng, skip)
            left.extend(unseen(units, counts, kept, taken))
    return epoch, left


def deal(units: Sequence[Unit], *, rank: int, world_size: int, reader: int, readers: int) -> list[Unit]:
    """One reader's share of ``units``: dealt to the ranks first, then to each rank's readers."""
    return list(units[rank::world_size][reader::readers])


def as_units(saved: Iterable[Sequence[Any]]) -> list[Unit]:
    """Units as a checkpoint's JSON holds them."""
    return [(int(shard), None if picks is None else tuple(int(i) for i in picks)) for shard, picks in saved]


def rest_rng(seed: int, epoch: int, rank: int, reader: int) -> random.Random:
    """The shuffle buffer's random stream of a pass over an interrupted epoch's remainder."""
    return random.Random(f"{seed}:{epoch}:{rank}:{reader}:rest")


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random, buffer: Sequence[Any] = ()) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` items (1 or less: no shuffle),
    starting from ``buffer`` (where :func:`replay_shuffle` says an earlier pass stood)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer = list(buffer)
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def replay_shuffle(total: int, buffer_size: int, rng: random.Random, skip: int) -> tuple[list[int], int, bool]:
    """Where :func:`shuffled` over ``total`` items stands once it has yielded ``skip``, worked
    out from the item indices alone: the indices still to come out of its buffer (in buffer
    order), the index of the next item it takes in, ``rng`` advanced as the pass advanced
    it, and whether the pass was by then draining its buffer (after its last item: the
    buffer's remaining indices are then in the order they come out)."""
    if buffer_size <= 1:
        return [], min(skip, total), False
    buffer = list(range(min(buffer_size, total)))
    taken, yielded = len(buffer), 0
    while yielded < skip and taken < total:
        buffer[rng.randrange(buffer_size)] = taken
        taken, yielded = taken + 1, yielded + 1
    if yielded == skip and len(buffer) == buffer_size:
        return buffer, taken, False
    rng.shuffle(buffer)
    return buffer[skip - yielded:], taken, True
