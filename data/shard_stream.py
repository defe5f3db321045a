"""Streaming shards into training: each rank and loader worker reads a disjoint, per-epoch
reshuffled subset of a dataset's shards (image or latent: the same tar layout) through a
shuffle buffer, skipping and counting what is corrupt.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ldmflow.data import storage
from ldmflow.data.image_shards import DecodedSample, decode_sample, shard_urls

log = logging.getLogger(__name__)


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


def is_held_out(key: str, fraction: float) -> bool:
    """A fixed, key-determined ``fraction`` of samples, held out of training for evaluation."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


class SkipCounter:
    """Counts (and logs) corrupt samples and unreadable shards instead of raising."""

    def __init__(self) -> None:
        self.skipped = 0
        self.errors: list[str] = []

    def __call__(self, exc: Exception) -> bool:
        self.skipped += 1
        message = f"{type(exc).__name__}: {str(exc.args[0]) if exc.args else exc}"
        if len(self.errors) < 100:
            self.errors.append(message)
        log.warning("skipped a corrupt sample or shard: %s", message)
        return True


def samples_from_streams(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw member dicts grouped by key from ``{"url", "stream"}`` tar sources."""
    from webdataset import tariterators

    files = tariterators.tar_file_expander(sources, handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


def iter_raw_samples(urls: Sequence[str], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw member dicts (``__key__``, ``png``, ``txt``…) from tars read through storage."""

    def opened() -> Iterator[dict[str, Any]]:
        for url in urls:
            try:
                stream = storage.open_read(url)
            except storage.StorageError as exc:
                if handler(exc):
                    continue
                raise
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    yield from samples_from_streams(opened(), handler)


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


def replay_shuffle(total: int, buffer_size: int, rng: random.Random, skip: int) -> tuple[list[int], int] | None:
    """Where :func:`shuffled` over ``total`` items stands once it has yielded ``skip``, worked
    out from the item indices alone: the indices in its buffer (in buffer order) and the
    index of the next item it takes in, ``rng`` advanced as the pass advanced it. None when
    the pass would have been draining its buffer by then (the last ``buffer_size`` items of
    a stream), which this does not replay."""
    buffer = list(range(min(buffer_size, total)))
    taken, yielded = len(buffer), 0
    while yielded < skip and taken < total:
        buffer[rng.randrange(buffer_size)] = taken
        taken, yielded = taken + 1, yielded + 1
    return (buffer, taken) if yielded == skip else None


def _torch_worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Stream decoded samples from image shards, split across ranks and loader workers.

    A ``torch.utils.data.IterableDataset``: each pass reads the
    shards assigned to this rank and dataloader worker for the current ``epoch``, through a
    shuffle buffer, and skips (and counts in ``skips``) a sample or shard that is corrupt.
    Call :meth:`set_epoch` before each epoch to reshuffle. ``keep(key)`` selects samples
    (for example :func:`is_held_out` or its negation). ``counts``, each shard's number of
    samples (from its manifest), lets a resumed reader skip whole shards unopened.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        decode: Callable[[dict[str, Any]], Any] = decode_sample,
        keep: Callable[[str], bool] | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no shards to read")
        if counts is not None and len(counts) != len(urls):
            raise ValueError(f"{len(counts)} sample counts for {len(urls)} shards")
        self.urls = list(urls)
        self.counts = list(counts) if counts is not None else None
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.decode = decode
        self.keep = keep
        self.epoch = 0
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _torch_worker()
        for _, sample in self.read(worker, num_workers):
            yield sample

    def read(self, reader: int, readers: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """``(position, decoded sample)`` for reader ``reader`` of this rank's ``readers`` this epoch.

        ``position`` counts the samples out of the shuffle buffer so far, corrupt ones
        included; the first ``skip`` are passed over without being decoded, which is how a
        resumed run gets back to where it was without the cost of what it had trained on.
        With the shards' sample ``counts`` known (and no ``keep`` filter or sample split),
        the shuffle buffer is replayed on sample indices instead (:func:`replay_shuffle`):
        only the shards holding samples still in the buffer are read again, the others
        already taken are not opened, so a resume costs about the same at any step.
        """
        indices, sample_split = assign_shards(
            len(self.urls),
            rank=self.rank,
            world_size=self.world_size,
            worker=reader,
            num_workers=readers,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.shuffle_buffer > 1,
        )
        urls = [self.urls[i] for i in indices]
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{reader}")
        if skip and self.counts is not None and self.keep is None and sample_split is None and self.shuffle_buffer > 1:
            counts = [self.counts[i] for i in indices]
            where = replay_shuffle(sum(counts), self.shuffle_buffer, rng, skip)
            if where is not None:
                yield from self._decoded(enumerate(self._resumed(urls, counts, *where, rng), start=skip + 1))
                return
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{reader}")  # replay from the start
        raw = iter_raw_samples(urls, self.skips)
        if self.keep is not None:
            raw = (sample for sample in raw if self.keep(sample["__key__"]))
        if sample_split is not None:
            split, splits = sample_split
            raw = (sample for i, sample in enumerate(raw) if i % splits == split)
        numbered = enumerate(shuffled(raw, self.shuffle_buffer, rng), start=1)
        yield from self._decoded((position, sample) for position, sample in numbered if position > skip)

    def _decoded(self, numbered: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, Any]]:
        """``(position, raw sample)`` pairs decoded; an undecodable sample skipped and counted."""
        for position, sample in numbered:
            try:
                yield position, self.decode(sample)
            except ValueError as exc:
                self.skips(exc)

    def _resumed(self, urls: list[str], counts: list[int], kept: list[int], taken: int,
                 rng: random.Random) -> Iterator[dict[str, Any]]:
        """The rest of a shuffled pass whose buffer holds samples ``kept`` (indices into the
        concatenated shards) and whose next sample is number ``taken``: the kept ones are
        read back, the shards before ``taken`` that hold none of them are not opened."""
        wanted, found = set(kept), {}

        def rest() -> Iterator[dict[str, Any]]:
            start = 0
            for url, count in zip(urls, counts):
                end = start + count
                if end > taken or any(start <= i < end for i in wanted):
                    for i, sample in enumerate(iter_raw_samples([url], self.skips), start=start):
                        if i >= taken:
                            yield sample
                        elif i in wanted:
                            found[i] = sample
                start = end

        after = rest()
        following = next(after, None)  # every kept sample lies before it, so all are found by now
        buffer = [found[i] for i in kept if i in found]
        items = after if following is None else itertools.chain([following], after)
        yield from shuffled(items, self.shuffle_buffer, rng, buffer)


@dataclass
class Batch:
    """A batch as one reader made it: ``data`` (None for the reader's last word, which
    carries its ``skipped`` count and first ``errors``), and the reader's ``position`` after it."""

    reader: int
    position: int
    data: Any = None
    skipped: int = 0
    errors: tuple[str, ...] = ()


class BatchStream(torch.utils.data.IterableDataset):
    """Batches of a :class:`ShardStream`, collated in the DataLoader worker that reads them
    (``DataLoader(batch_stream, batch_size=None, num_workers=readers, persistent_workers=True)``).

    Each loader worker is one reader of the rank's shards. Where each reader starts comes
    from :meth:`set_epoch`, through shared memory (persistent workers keep their own copy
    of the dataset): the epoch, every reader's position, and which reader goes first, so
    that the DataLoader's round-robin over its workers continues the order an interrupted
    run had. Each reader ends with a :class:`Batch` whose ``data`` is None, and then begins
    its next epoch (fills its shuffle buffer) before the loader asks for it.
    """

    def __init__(self, stream: ShardStream, batch_size: int, collate: Callable[[list[Any]], Any], *,
                 readers: int = 1, drop_last: bool = True) -> None:
        self.stream, self.batch_size, self.collate, self.drop_last = stream, batch_size, collate, drop_last
        self.readers = readers
        self._where = torch.zeros(2 + readers, dtype=torch.long).share_memory_()  # epoch, first, positions…
        self._ahead: tuple[tuple[int, int, int], Iterator[tuple[int, Any]], int] | None = None

    def set_epoch(self, epoch: int, positions: Sequence[int] = (), first: int = 0) -> None:
        """Read ``epoch`` from ``positions`` (one per reader; none: the start), ``first`` first."""
        self._where[0], self._where[1] = epoch, first
        self._where[2:] = torch.tensor(list(positions) or [0] * self.readers, dtype=torch.long)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _torch_worker()
        if workers != self.readers:
            raise ValueError(f"a BatchStream of {self.readers} readers is read by {workers} loader workers")
        where = self._where.tolist()
        reader, epoch = (worker + where[1]) % workers, where[0]
        position = where[2 + reader]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (epoch, reader, workers) and position == 0:
            _, read, skips_before = ahead  # begun when the last epoch ended
        else:
            read, skips_before = self._begin(epoch, reader, workers, position)
        samples: list[Any] = []
        for position, sample in read:
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield Batch(reader, position, self.collate(samples))
                samples = []
        if samples and not self.drop_last:
            yield Batch(reader, position, self.collate(samples))
        yield Batch(reader, position, skipped=self.stream.skips.skipped - skips_before,
                    errors=tuple(self.stream.skips.errors[:3]))
        # The loader asks once more before it stops, while the training loop still has the
        # batches it fetched ahead: fill the next epoch's shuffle buffer now, not when asked.
        read, skips_before = self._begin(epoch + 1, reader, workers, 0)
        first = next(read, None)
        self._ahead = (epoch + 1, reader, workers), read if first is None else itertools.chain([first], read), skips_before

    def _begin(self, epoch: int, reader: int, readers: int, skip: int) -> tuple[Iterator[tuple[int, Any]], int]:
        """The reader's ``(position, sample)`` stream of ``epoch`` from ``skip``, and the skip count before it."""
        self.stream.set_epoch(epoch)
        return self.stream.read(reader, readers, skip), self.stream.skips.skipped


def collate(samples: Sequence[DecodedSample]) -> dict[str, Any]:
    """Stack decoded samples into a batch: ``image`` (B, 3, H, W), ``label`` (B,), lists."""
    return {
        "image": torch.from_numpy(np.stack([s.image for s in samples])),
        "label": torch.tensor([s.label for s in samples], dtype=torch.long),
        "caption": [s.caption for s in samples],
        "key": [s.key for s in samples],
    }


def make_loader(
    dataset: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    drop_last: bool = False,
):
    """A ``torch.utils.data.DataLoader`` of batches from the image dataset at ``dataset``."""
    stream = ShardStream(shard_urls(dataset), rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer, seed=seed)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=False,
    )
