"""Streaming shards into training: each rank and loader worker reads a disjoint, per-epoch
reshuffled subset of a dataset's shards (image or latent: the same tar layout) through a
shuffle buffer, skipping and counting what is corrupt.
"""

from __future__ import annotations

import bisect
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
from ldmflow.data.shard_order import (Unit, as_units, assign_shards, reader_pass, replay_shuffle, rest_rng, shuffled,
                                     unit_sizes)

log = logging.getLogger(__name__)


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


def _torch_worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Stream decoded samples from image shards, split across ranks and loader workers.

    A ``torch.utils.data.IterableDataset``: each pass reads the
    shards assigned to this rank and dataloader worker for the current ``epoch``, through a
    shuffle buffer, and skips (and counts in ``skips``) a sample or shard that is corrupt.
    Call :meth:`set_epoch` before each epoch to reshuffle. ``keep(key)`` selects samples
    (for example :func:`is_held_out` or its negation), after the shuffle buffer. ``counts``,
    each shard's number of samples (from its manifest), lets a resumed reader skip whole
    shards unopened. ``rest``, ``(epoch, units of each reader)``, is that epoch's
    remainder, dealt to this rank when a run resumes on another number of ranks or readers
    (:func:`remainder`).
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
        self.rest: tuple[int, list[Any]] | None = None
        self.skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = _torch_worker()
        for _, sample in self.read(worker, num_workers):
            yield sample

    def read(self, reader: int, readers: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """``(position, decoded sample)`` for reader ``reader`` of this rank's ``readers`` this epoch.

        ``position`` counts the samples out of the shuffle buffer so far, corrupt ones and
        ones ``keep`` refuses included; the first ``skip`` are passed over without being
        decoded, which is how a resumed run gets back to where it was without the cost of
        what it had trained on. With the shards' sample ``counts`` known, the shuffle buffer
        is replayed on sample numbers instead (:func:`replay_shuffle`): only the shards
        holding samples still in the buffer, or not yet taken in, are opened, so a resume
        costs about the same at any position of the epoch, its last buffer included.
        """
        units, rng = self.reader_pass(reader, readers)
        if units is None:  # readers outnumber shards and the counts are unknown: split as read
            indices, (split, splits) = assign_shards(len(self.urls), rank=self.rank, world_size=self.world_size,
                                                     worker=reader, num_workers=readers, epoch=self.epoch,
                                                     seed=self.seed, shuffle=self.shuffle_buffer > 1)
            raw = iter_raw_samples([self.urls[i] for i in indices], self.skips)
            numbered = enumerate(shuffled((s for i, s in enumerate(raw) if i % splits == split),
                                          self.shuffle_buffer, rng), start=1)
        elif skip and self.counts is not None:
            kept, taken, draining = replay_shuffle(sum(unit_sizes(units, self.counts)), self.shuffle_buffer, rng, skip)
            numbered = enumerate(self._resumed(units, kept, taken, draining, rng), start=skip + 1)
        else:
            numbered = enumerate(shuffled(self._samples(units), self.shuffle_buffer, rng), start=1)
        keep = self.keep
        yield from self._decoded((position, sample) for position, sample in numbered
                                 if position > skip and (keep is None or keep(sample["__key__"])))

    def reader_pass(self, reader: int, readers: int) -> tuple[list[Unit] | None, random.Random]:
        """This epoch's units for reader ``reader`` and its shuffle buffer's random stream:
        the remainder dealt to it where this epoch is an interrupted one resumed
        (:attr:`rest`), else its share (:func:`reader_pass`)."""
        if self.rest is not None and self.rest[0] == self.epoch:
            return as_units(self.rest[1][reader]), rest_rng(self.seed, self.epoch, self.rank, reader)
        return reader_pass(len(self.urls), self.counts, rank=self.rank, world_size=self.world_size, reader=reader,
                           readers=readers, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle_buffer > 1)

    def _samples(self, units: Iterable[Unit]) -> Iterator[dict[str, Any]]:
        """The raw samples of ``units``, in order."""
        for unit in units:
            yield from self._unit_samples(unit)

    def _unit_samples(self, unit: Unit, upto: int | None = None) -> Iterator[dict[str, Any]]:
        """One unit's raw samples, in order; with ``upto``, only its first ``upto``."""
        shard, picks = unit
        raw = iter_raw_samples([self.urls[shard]], self.skips)
        if picks is not None:
            raw = _picked(raw, picks)
        yield from raw if upto is None else itertools.islice(raw, upto)

    def _decoded(self, numbered: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, Any]]:
        """``(position, raw sample)`` pairs decoded; an undecodable sample skipped and counted."""
        for position, sample in numbered:
            try:
                yield position, self.decode(sample)
            except ValueError as exc:
                self.skips(exc)

    def _resumed(self, units: list[Unit], kept: list[int], taken: int, draining: bool,
                 rng: random.Random) -> Iterator[dict[str, Any]]:
        """The rest of a shuffled pass over ``units`` whose buffer holds samples ``kept``
        (numbers in the pass) and whose next sample is number ``taken``: the kept ones are
        read back, the units before ``taken`` that hold none of them are not opened."""
        held, found = sorted(kept), {}
        wanted_numbers = set(held)

        def rest() -> Iterator[dict[str, Any]]:
            start = 0
            for unit, size in zip(units, unit_sizes(units, self.counts)):
                end = start + size
                wanted = held[bisect.bisect_left(held, start):bisect.bisect_left(held, end)]
                if end > taken:
                    samples = self._unit_samples(unit)
                elif wanted:
                    samples = self._unit_samples(unit, upto=wanted[-1] - start + 1)
                else:
                    samples = iter(())
                for i, sample in enumerate(samples, start=start):
                    if i >= taken:
                        yield sample
                    elif i in wanted_numbers:
                        found[i] = sample
                start = end

        after = rest()
        following = next(after, None)  # every kept sample lies before it, so all are found by now
        buffer = [found[i] for i in kept if i in found]
        if draining:
            yield from buffer
            return
        items = after if following is None else itertools.chain([following], after)
        yield from shuffled(items, self.shuffle_buffer, rng, buffer)


def _picked(raw: Iterator[dict[str, Any]], picks: Sequence[int]) -> Iterator[dict[str, Any]]:
    """The samples of ``raw`` numbered ``picks`` (ascending), the shard read no further."""
    if not picks:
        return
    wanted = set(picks)
    for i, sample in enumerate(raw):
        if i in wanted:
            yield sample
        if i >= picks[-1]:
            return


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
