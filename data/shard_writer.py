"""Step 2 of the shard stage (:mod:`ldmflow.data.sharding`): write one chunk, in the task
that holds it. :func:`write_chunk` reads the chunk (its items, or its span: listed, sidecars
and metadata read, labels numbered), fetches, validates, deduplicates and preprocesses its
inputs, writes its shard atomically, then its part record, named by :func:`chunk_digest`.
:func:`todo` tells, from one listing of the output, which chunks are already written.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ldmflow import configs
from ldmflow.data import image_shards, images, spans, storage
from ldmflow.data.sharding import Chunk, Duplicate, Part, Plan, ShardConfig, Unnamed, channel_histograms
from ldmflow.data.fetching import Vanished, fetch
from ldmflow.data.sources import RawItem, Reject


def chunk_digest(plan: Plan, chunk: Chunk, config: ShardConfig) -> str:
    """Identifies a chunk's output: its shard number (in its samples' keys), the digest of
    what was dealt into its range (names, sizes, version tags; for given items, their
    captions, labels and hashes too), the metadata files it reads, how labels are numbered,
    and the config's identity."""
    return configs.key(
        config,
        class_names=list(plan.class_names) if plan.class_names is not None else None,
        class_folders=plan.class_folders,
        shard=chunk.index,
        listing=chunk.listing,
        metadata=[[storage.relative_to(e.url, plan.source), e.size, e.etag] for e in chunk.metadata],
        format=[image_shards.FORMAT_NAME, image_shards.FORMAT_VERSION],
    )


@dataclass(frozen=True)
class Todo:
    """One chunk as the flow hands it to a task: what to write, how to read it, and what
    the listing of the output found of it (its record's URL when listed, whether its shard is)."""

    chunk: Chunk
    digest: str
    record: str | None
    shard_listed: bool
    source: str  # spans: where to list
    class_names: tuple[str, ...] | None  # spans: the names labels are numbered by
    class_folders: bool


def todo(plan: Plan, dest: str, config: ShardConfig, listed: dict[str, int]) -> tuple[list[Todo], list[str]]:
    """Each chunk with what one listing of ``dest`` says of it, and what the listing holds
    that this plan does not (shards and records of other plans or digests: removed once the
    new manifest is written). Records of another digest for a chunk still to write are
    removed now, so a record never vouches for another run's shard."""
    todos = []
    keep = set()
    for chunk in plan.chunks:
        digest = chunk_digest(plan, chunk, config)
        record = image_shards.part_record_url(dest, chunk.shard, digest)
        shard = storage.join(dest, chunk.shard)
        todos.append(Todo(chunk, digest, record if record in listed else None, shard in listed, plan.source,
                          plan.class_names if plan.spans else None, plan.class_folders))
        keep.update((record, shard))
    stale = [url for url in listed if url not in keep and _is_shard_or_record(storage.relative_to(url, dest))]
    planned = {chunk.shard.removesuffix(".tar") for chunk in plan.chunks}
    for url in stale:
        if url.endswith(".json") and storage.basename(url).split(".", 1)[0] in planned:
            storage.delete(url)
    return todos, stale


def _is_shard_or_record(rel: str) -> bool:
    return bool(re.fullmatch(r"shard-\d+\.tar|" + image_shards.PARTS + r"/shard-\d+(\.[0-9a-f]+)?\.json", rel))


def completed_part(todo: Todo) -> Part | None:
    """The part record of a chunk already written with its digest, if the listing had one."""
    if todo.record is None:
        return None
    try:
        part = Part.from_json(storage.read_text(todo.record))
    except storage.NotFound:
        return None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # unreadable record: redo the chunk
    if part.digest != todo.digest or (part.shard_info is not None and not todo.shard_listed):
        return None
    return part


def write_chunk(todo: Todo, dest: str, config: ShardConfig) -> Part | Unnamed:
    """Read one chunk (its items; its span: listed, sidecars and metadata read; or its tar,
    streamed once; labels then numbered), fetch, validate, deduplicate and preprocess its inputs; write its shard, then
    its part record."""
    done = completed_part(todo)
    if done is not None:
        return replace(done, skipped=True)
    chunk, digest = todo.chunk, todo.digest
    items, rejects, labels = list(chunk.items), [], ()
    if chunk.tar:
        raw, rejects = spans.read_tar(chunk.tar, chunk.start)
    elif not chunk.items:
        raw, rejects = spans.read_span(todo.source, chunk.start, chunk.end, chunk.metadata, todo.class_folders)
    if chunk.tar or not chunk.items:
        labels = spans.label_names(raw)
        items = spans.number_labels(raw, todo.class_names)
        if items is None:
            return Unnamed(chunk.shard, labels)
    num_inputs = len(items) + len(rejects)

    samples: list[image_shards.Sample] = []
    duplicates: list[Duplicate] = []
    first_of: dict[str, str] = {}  # sha256 → source
    histogram = np.zeros((3, 256), dtype=np.int64)  # exact integer statistics

    def prepare(position: int, item: RawItem, data: bytes | Vanished) -> tuple[image_shards.Sample, np.ndarray] | Reject:
        if isinstance(data, Vanished):
            return Reject(item.source, str(data))
        try:
            return _sample(image_shards.sample_key(chunk.index, position), item, data, config)
        except images.Rejected as exc:
            return Reject(item.source, str(exc))

    fetched = ((position, item, data) for position, (item, data) in enumerate(fetch(items)))
    for result in in_order(image_pool(config.workers), prepare, fetched, ahead=4 * config.workers):
        if isinstance(result, Reject):
            rejects.append(result)
            continue
        sample, counts = result
        source, sha256 = sample.meta["source"], sample.meta["sha256"]
        if sha256 in first_of:
            duplicates.append(Duplicate(source, first_of[sha256]))
            continue
        first_of[sha256] = source
        samples.append(sample)
        histogram += counts

    info = None
    if samples:
        written = image_shards.write_shard(storage.join(dest, chunk.shard), samples)
        info = image_shards.ShardInfo(chunk.shard, written.num_samples, written.bytes, written.sha256)
    part = Part(
        shard=chunk.shard,
        digest=digest,
        num_inputs=num_inputs,
        shard_info=info,
        rejects=tuple(sorted(rejects, key=lambda r: r.source)),
        duplicates=tuple(duplicates),
        labels=labels,
        histogram=tuple(tuple(int(v) for v in row) for row in histogram),
    )
    storage.write_text(image_shards.part_record_url(dest, chunk.shard, digest), part.to_json())
    return part


def _sample(key: str, item: RawItem, data: bytes, config: ShardConfig) -> tuple[image_shards.Sample, np.ndarray]:
    """One input as a sample and its pixel histogram; raises :class:`images.Rejected`."""
    decoded = images.preprocess(data, config.resolution, min_size=config.min_size, max_pixels=config.max_pixels,
                                resample=config.resample)
    meta = {
        "source": item.source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": decoded.width,
        "height": decoded.height,
        "mode": decoded.mode,
        "format": decoded.format,
    }
    sample = image_shards.Sample(
        key=key,
        image=images.encode(decoded.image, config.format, config.jpeg_quality, config.png_compress_level),
        image_ext=config.format,
        meta=meta,
        caption=item.caption,
        label=item.label,
    )
    return sample, channel_histograms(decoded.image)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def image_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads for image work, shared by the chunks in
    flight so that the images decoded at once stay ``workers`` however many chunks run."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ldmflow-images")
        return _pools[workers]


def in_order(pool: ThreadPoolExecutor, fn: Callable, calls: Iterable[tuple], ahead: int) -> Iterator:
    """``fn(*args)`` for each of ``calls`` on ``pool``, results in order, at most ``ahead``
    submitted and not yet taken (so a chunk's raw bytes are not all in memory at once)."""
    pending: deque = deque()
    for args in calls:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
