"""The shard stage: raw inputs → validated, deduplicated, resized WebDataset shards.

Three steps, each an importable function that the Prefect flow in ``flows/shard.py`` runs
as a task:

1. :func:`plan` lists the source once, finds exact duplicates (same bytes: only inputs
   whose sizes collide are hashed), and deals the unique inputs into chunks of
   ``shard_size`` in sorted order. Chunk *i* becomes ``shard-i.tar``.
2. :func:`write_chunk` fetches, validates and preprocesses one chunk and writes its shard
   atomically, then a small part record (``_parts/shard-i.json``: rejects, statistics,
   the shard's hash, and a digest of the chunk's inputs and config). A chunk whose part
   record matches its digest is already done and is skipped, which is what makes a killed
   run resumable.
3. :func:`finalize` gathers the part records into ``rejects.jsonl``,
   ``duplicates.jsonl`` and, last, ``manifest.json``.

The same inputs and config give byte-identical shards and the same manifest, whether the
run was interrupted or not.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ldmflow import configs
from ldmflow.data import image_shards, images, storage
from ldmflow.data.sources import Listing, RawItem, Reject, Vanished, fetch, list_source

PARTS = "_parts"


@configs.stage_config
class ShardConfig:
    """Sharding raw images: validate, deduplicate, resize and write them as WebDataset shards."""

    resolution: Annotated[int, Field(ge=1, description="output side in pixels")] = 256
    shard_size: Annotated[int, Field(ge=1, description="inputs per shard")] = 1000
    format: Annotated[Literal["png", "jpg"], Field(description="`png` or `jpg` inside the shards")] = "png"
    jpeg_quality: Annotated[int, Field(ge=1, le=100, description="for `jpg`")] = 95
    png_compress_level: Annotated[int, Field(ge=0, le=9, description=(
        "zlib level for `png`: 1 encodes about twice as fast as Pillow's default 6, for files about 10% larger"))] = 1
    min_size: Annotated[int, Field(ge=0, description="refuse images whose short side is smaller (0: accept any)")] = 0
    max_pixels: Annotated[int, Field(ge=1, description="refuse larger images as decompression bombs")] = 64_000_000
    resample: Annotated[Literal["nearest", "bilinear", "bicubic", "lanczos"], Field(
        description="`nearest`, `bilinear`, `bicubic`, `lanczos`")] = "bicubic"
    limit: Annotated[int, Field(ge=0, description="take only the first N inputs (0: all)")] = 0
    workers: Annotated[int, Field(ge=1, description=(
        "images decoded and encoded concurrently (threads: Pillow releases the GIL), and chunks in flight")
    )] = configs.execution(2)


@dataclass(frozen=True)
class Duplicate:
    source: str
    duplicate_of: str


@dataclass(frozen=True)
class Chunk:
    index: int
    items: tuple[tuple[int, RawItem], ...]  # (input index in the sorted listing, item)

    @property
    def shard(self) -> str:
        return image_shards.shard_name(self.index)


@dataclass(frozen=True)
class Plan:
    source: str
    num_inputs: int
    chunks: tuple[Chunk, ...]
    duplicates: tuple[Duplicate, ...]
    listing_rejects: tuple[Reject, ...]
    class_names: tuple[str, ...] | None


@dataclass(frozen=True)
class Part:
    """What writing one chunk produced; saved as ``_parts/shard-i.json``."""

    shard: str
    digest: str
    num_inputs: int
    shard_info: image_shards.ShardInfo | None  # None when every input was refused
    rejects: tuple[Reject, ...]
    histogram: tuple[tuple[int, ...], ...]  # (3, 256) counts of each 8-bit value per channel
    skipped: bool = field(default=False, compare=False)  # already complete on disk

    def to_json(self) -> str:
        body = asdict(self)
        del body["skipped"]
        return json.dumps(body, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Part:
        body = json.loads(text)
        info = body["shard_info"]
        return cls(
            shard=body["shard"],
            digest=body["digest"],
            num_inputs=body["num_inputs"],
            shard_info=image_shards.ShardInfo(**info) if info else None,
            rejects=tuple(Reject(**r) for r in body["rejects"]),
            histogram=tuple(tuple(row) for row in body["histogram"]),
        )


# ---------------------------------------------------------------------------------------
# 1. Plan


def plan(source: str, config: ShardConfig) -> Plan:
    """List ``source`` once, mark exact duplicates, and deal the rest into chunks."""
    listing = list_source(source, limit=config.limit)
    hashes = _content_hashes(listing)
    seen: dict[str, str] = {}
    duplicates: list[Duplicate] = []
    unique: list[tuple[int, RawItem]] = []
    for index, item in enumerate(listing.items):
        digest = hashes.get(item.source)
        if digest is not None and digest in seen:
            duplicates.append(Duplicate(item.source, seen[digest]))
            continue
        if digest is not None:
            seen[digest] = item.source
        unique.append((index, item))
    chunks = tuple(
        Chunk(i, tuple(unique[start : start + config.shard_size]))
        for i, start in enumerate(range(0, len(unique), config.shard_size))
    )
    return Plan(
        source=source,
        num_inputs=len(listing.items) + len(listing.rejects),
        chunks=chunks,
        duplicates=tuple(duplicates),
        listing_rejects=listing.rejects,
        class_names=listing.class_names,
    )


def _content_hashes(listing: Listing) -> dict[str, str]:
    """sha256 of every non-empty input that could have a twin (same size), by source."""
    by_size: dict[int, list[RawItem]] = defaultdict(list)
    for item in listing.items:
        if item.size > 0:
            by_size[item.size].append(item)
    candidates = [item for group in by_size.values() if len(group) > 1 for item in group]
    known = {item.source: item.sha256 for item in candidates if item.sha256 is not None}
    todo = [item for item in candidates if item.sha256 is None]

    def digest(item: RawItem) -> str | None:
        try:
            return hashlib.sha256(storage.read_bytes(item.url)).hexdigest()
        except storage.NotFound:
            return None  # vanished: write_chunk will reject it
        except storage.StorageError:
            raise
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        for item, value in zip(todo, pool.map(digest, todo)):
            if value is not None:
                known[item.source] = value
    return known


# ---------------------------------------------------------------------------------------
# 2. Write one chunk


def chunk_digest(chunk: Chunk, config: ShardConfig, class_names: Sequence[str] | None) -> str:
    """Identifies a chunk's output: its inputs (as listed) and the config's identity."""
    return configs.key(
        config,
        class_names=list(class_names) if class_names is not None else None,
        items=[[index, item.source, item.size, item.caption, item.label, item.sha256] for index, item in chunk.items],
        format=[image_shards.FORMAT_NAME, image_shards.FORMAT_VERSION],
    )


def part_url(dest: str, shard: str) -> str:
    return storage.join(dest, PARTS, shard.replace(".tar", ".json"))


def completed_part(dest: str, chunk: Chunk, digest: str) -> Part | None:
    """The part record of a chunk already written with this digest, if any."""
    try:
        part = Part.from_json(storage.read_text(part_url(dest, chunk.shard)))
    except storage.NotFound:
        return None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # unreadable record: redo the chunk
    if part.digest != digest:
        return None
    if part.shard_info is not None and not storage.exists(storage.join(dest, part.shard_info.url)):
        return None
    return part


def write_chunk(chunk: Chunk, dest: str, config: ShardConfig, class_names: Sequence[str] | None = None) -> Part:
    """Fetch, validate and preprocess one chunk; write its shard, then its part record."""
    digest = chunk_digest(chunk, config, class_names)
    done = completed_part(dest, chunk, digest)
    if done is not None:
        return replace(done, skipped=True)

    samples: list[image_shards.Sample] = []
    rejects: list[Reject] = []
    histogram = np.zeros((3, 256), dtype=np.int64)  # exact integer statistics

    def prepare(index: int, item: RawItem, data: bytes | Vanished) -> tuple[image_shards.Sample, np.ndarray] | Reject:
        if isinstance(data, Vanished):
            return Reject(item.source, str(data))
        try:
            return _sample(index, item, data, config)
        except images.Rejected as exc:
            return Reject(item.source, str(exc))

    fetched = ((index, item, data)
               for (index, item), (_, data) in zip(chunk.items, fetch(item for _, item in chunk.items)))
    for result in in_order(image_pool(config.workers), prepare, fetched, ahead=4 * config.workers):
        if isinstance(result, Reject):
            rejects.append(result)
        else:
            samples.append(result[0])
            histogram += result[1]

    info = None
    if samples:
        written = image_shards.write_shard(storage.join(dest, chunk.shard), samples)
        info = image_shards.ShardInfo(chunk.shard, written.num_samples, written.bytes, written.sha256)
    part = Part(
        shard=chunk.shard,
        digest=digest,
        num_inputs=len(chunk.items),
        shard_info=info,
        rejects=tuple(rejects),
        histogram=tuple(tuple(int(v) for v in row) for row in histogram),
    )
    storage.write_text(part_url(dest, chunk.shard), part.to_json())
    return part


def _sample(index: int, item: RawItem, data: bytes, config: ShardConfig) -> tuple[image_shards.Sample, np.ndarray]:
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
        key=image_shards.sample_key(index),
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


def channel_histograms(image) -> np.ndarray:
    """``(3, 256)`` counts of each value per channel of an 8-bit RGB image."""
    pixels = np.asarray(image).reshape(-1, 3)
    return np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(3)])


def histogram_mean_std(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation, in [0, 1] units, from value counts."""
    values = np.arange(256, dtype=np.float64) / 255.0
    count = np.maximum(histogram.sum(axis=1), 1)
    mean = histogram @ values / count
    variance = histogram @ np.square(values) / count - np.square(mean)
    return mean, np.sqrt(np.maximum(variance, 0.0))


# ---------------------------------------------------------------------------------------
# 3. Finalize


def finalize(plan: Plan, parts: Sequence[Part], dest: str, config: ShardConfig) -> image_shards.ImageManifest:
    """Write rejects, duplicates and (last) the manifest; remove shards no longer planned."""
    parts = sorted(parts, key=lambda part: part.shard)
    if [part.shard for part in parts] != [chunk.shard for chunk in plan.chunks]:
        raise RuntimeError("finalize needs exactly one part per planned chunk")
    rejects = sorted([*plan.listing_rejects, *(r for part in parts for r in part.rejects)], key=lambda r: r.source)
    image_shards.write_jsonl(storage.join(dest, image_shards.REJECTS), (asdict(r) for r in rejects))
    image_shards.write_jsonl(storage.join(dest, image_shards.DUPLICATES), (asdict(d) for d in plan.duplicates))

    histogram = np.zeros((3, 256), dtype=np.int64)
    for part in parts:
        histogram += np.asarray(part.histogram, dtype=np.int64)
    mean, std = histogram_mean_std(histogram)
    infos = tuple(part.shard_info for part in parts if part.shard_info is not None)
    manifest = image_shards.ImageManifest(
        source=plan.source,
        config=configs.to_dict(config),
        num_inputs=plan.num_inputs,
        num_samples=sum(info.num_samples for info in infos),
        num_duplicates=len(plan.duplicates),
        num_rejected=len(rejects),
        shards=infos,
        class_names=plan.class_names,
        stats={"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]},
    )
    _remove_unplanned(dest, {info.url for info in infos}, {part.shard for part in parts})
    storage.write_text(image_shards.manifest_url(dest), manifest.to_json())
    return manifest


def _remove_unplanned(dest: str, keep_shards: set[str], keep_parts: set[str]) -> None:
    """Delete shards and part records left by an earlier run with another plan."""
    for entry in storage.list_prefix(dest):
        rel = storage.relative_to(entry.url, dest)
        if rel.startswith("shard-") and rel.endswith(".tar") and rel not in keep_shards:
            storage.delete(entry.url)
        elif rel.startswith(PARTS + "/") and rel.endswith(".json"):
            if storage.basename(rel).replace(".json", ".tar") not in keep_parts:
                storage.delete(entry.url)


def summary_line(manifest: image_shards.ImageManifest, dest: str, written: int, skipped: int, seconds: float) -> str:
    rate = manifest.num_inputs / seconds if seconds > 0 else math.inf
    return (
        f"shard: {manifest.summary()} -> {dest} "
        f"[{written} shards written, {skipped} already complete, {seconds:.1f}s, {rate:.0f} inputs/s]"
    )
