"""The shard stage: raw inputs → validated, deduplicated, resized WebDataset shards.

Three steps, each an importable function that the Prefect flow in ``flows/shard.py`` runs
as a task:

1. :func:`plan` lists the source once, finds exact duplicates (same bytes: only inputs
   whose sizes collide are compared, by S3's content ETag where every one of them has it,
   else by sha256), and deals the unique inputs into chunks. A fresh output is cut into
   chunks of ``shard_size`` in sorted order; a rerun deals the inputs into the *ranges* its
   previous manifest recorded (each chunk's first source), so an input added or removed
   changes the one chunk whose range holds it. A chunk grown past twice ``shard_size`` is
   split, the new pieces taking new shard numbers; an emptied one is dropped.
2. :func:`write_chunk` fetches, validates and preprocesses one chunk and writes its shard
   atomically, then a small part record, named by the chunk's digest (its inputs as
   listed, with their version tags, and the config's identity):
   ``_parts/shard-i.DIGEST.json`` holds rejects, statistics and the shard's hash. One
   listing of the output says which chunks are done, which is what makes a killed run
   resumable and a rerun cost what changed.
3. :func:`finalize` gathers the part records into ``rejects.jsonl``,
   ``duplicates.jsonl`` and, last, ``manifest.json``, then removes shards and records the
   plan no longer has.

Before any of it, :func:`unchanged` compares the source's listing (names, sizes, version
tags) and the config with what the manifest at the output was made from: equal, and the
shards all there, the run is done with one LIST of the source, one of the output and one
GET of the manifest.

The same inputs, config and previous manifest give byte-identical shards and the same
manifest, whether the run was interrupted or not.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
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
from ldmflow.data.sources import Listing, RawItem, Reject, Scan, SmallFile, Vanished, fetch, list_source

SIDECARS = "_sidecars.jsonl"  # the sidecars and metadata files read, so a rerun reads only the changed ones


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
        "images decoded and encoded concurrently (threads: Pillow releases the GIL), and chunks in flight; on Ray, "
        "the threads (and CPUs) of each chunk's task")
    )] = configs.execution(2)
    runner: Annotated[Literal["auto", "threads", "ray"], Field(description=(
        "where chunks are written: `threads` in the flow's process; `ray` as Ray tasks spread over the cluster "
        "(`RAY_ADDRESS`, else a local instance); `auto`: `ray` when `RAY_ADDRESS` is set")
    )] = configs.execution("auto")

    def on_ray(self) -> bool:
        import os

        return self.runner == "ray" or (self.runner == "auto" and bool(os.environ.get("RAY_ADDRESS")))


@dataclass(frozen=True)
class Duplicate:
    source: str
    duplicate_of: str


@dataclass(frozen=True)
class Chunk:
    index: int  # its shard's number
    start: str  # the first source of its range; "" for the first chunk
    items: tuple[RawItem, ...]

    @property
    def shard(self) -> str:
        return image_shards.shard_name(self.index)


@dataclass(frozen=True)
class Plan:
    source: str
    num_inputs: int
    chunks: tuple[Chunk, ...]  # sorted by range
    duplicates: tuple[Duplicate, ...]
    listing_rejects: tuple[Reject, ...]
    class_names: tuple[str, ...] | None
    input_key: str  # see :func:`input_key`
    small_files: tuple[SmallFile, ...] = ()  # sidecars and metadata files, for :data:`SIDECARS`


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


def input_key(scanned: Scan, config: ShardConfig) -> str:
    """What a shard run is made from: the source's listing and the config's identity."""
    return configs.key(config, listing=scanned.digest, format=[image_shards.FORMAT_NAME, image_shards.FORMAT_VERSION])


def previous_manifest(dest: str) -> image_shards.ImageManifest | None:
    """The manifest a previous run left at ``dest``, if there is a readable one."""
    try:
        return image_shards.ImageManifest.from_json(storage.read_text(image_shards.manifest_url(dest)), where=dest)
    except (storage.NotFound, image_shards.ManifestError):
        return None


def unchanged(previous: image_shards.ImageManifest | None, key: str, dest: str, listed: dict[str, int]) -> bool:
    """Whether ``previous`` was made from this listing and config and all it names is still
    at ``dest`` (``listed``: URL → size, one listing of ``dest``)."""
    if previous is None or previous.input_key != key:
        return False
    reports = [storage.join(dest, image_shards.REJECTS), storage.join(dest, image_shards.DUPLICATES)]
    return (all(url in listed for url in reports)
            and all(listed.get(storage.join(dest, info.url)) == info.bytes for info in previous.shards))


def plan(source: str, config: ShardConfig, scanned: Scan, previous: image_shards.ImageManifest | None = None,
         known: dict[str, SmallFile] | None = None) -> Plan:
    """List ``source`` (from ``scanned``: no second listing; sidecars ``known`` from the last
    run not read again), mark exact duplicates, and deal the rest into chunks: into
    ``previous``'s ranges when it was made with this config."""
    listing = list_source(source, limit=config.limit, scanned=scanned, known=known)
    hashes = _content_hashes(listing)
    seen: dict[str, str] = {}
    duplicates: list[Duplicate] = []
    unique: list[RawItem] = []
    for item in listing.items:
        digest = hashes.get(item.source)
        if digest is not None and digest in seen:
            duplicates.append(Duplicate(item.source, seen[digest]))
            continue
        if digest is not None:
            seen[digest] = item.source
        unique.append(item)
    same_config = previous is not None and _identity_of(previous) == configs.identity(config)
    return Plan(
        source=source,
        num_inputs=len(listing.items) + len(listing.rejects),
        chunks=deal(unique, config.shard_size, previous.ranges if same_config else ()),
        duplicates=tuple(duplicates),
        listing_rejects=listing.rejects,
        class_names=listing.class_names,
        input_key=input_key(scanned, config),
        small_files=listing.small_files,
    )


def known_small_files(dest: str, listed: dict[str, int]) -> dict[str, SmallFile]:
    """The sidecars and metadata files the last run read (:data:`SIDECARS`), by URL."""
    url = storage.join(dest, SIDECARS)
    if url not in listed:
        return {}
    try:
        rows = image_shards.read_jsonl(url)
        return {row["url"]: SmallFile(row["url"], int(row["size"]), row["etag"], row["content"].encode("latin-1"))
                for row in rows}
    except storage.NotFound:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable: read every sidecar again


def _identity_of(manifest: image_shards.ImageManifest) -> dict | None:
    try:
        return configs.identity(configs.from_dict(ShardConfig, manifest.config))
    except configs.ConfigError:
        return None


def deal(items: Sequence[RawItem], shard_size: int, ranges: Sequence[tuple[str, str]] = ()) -> tuple[Chunk, ...]:
    """Chunks of ``items`` (sorted by source): cut every ``shard_size`` without ``ranges``;
    with them, each item goes to the range (first source, shard) it falls in. A range with
    no item is dropped; one holding more than ``2 * shard_size`` is split into pieces of
    ``shard_size``, the first keeping its shard and the others numbered after the largest."""
    if not ranges:
        pieces = [tuple(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]
        return tuple(Chunk(i, piece[0].source if i else "", piece) for i, piece in enumerate(pieces))
    starts = ["", *(start for start, _ in ranges[1:])]  # the first range reaches down to anything
    groups: list[list[RawItem]] = [[] for _ in ranges]
    for item in items:
        groups[bisect.bisect_right(starts, item.source) - 1].append(item)
    following = max(shard_number(shard) for _, shard in ranges) + 1
    chunks: list[Chunk] = []
    for start, (_, shard), group in zip(starts, ranges, groups):
        if len(group) <= 2 * shard_size:
            if group:
                chunks.append(Chunk(shard_number(shard), start, tuple(group)))
            continue
        for offset in range(0, len(group), shard_size):
            piece = tuple(group[offset : offset + shard_size])
            if offset == 0:
                chunks.append(Chunk(shard_number(shard), start, piece))
            else:
                chunks.append(Chunk(following, piece[0].source, piece))
                following += 1
    if chunks and chunks[0].start:
        chunks[0] = replace(chunks[0], start="")
    return tuple(chunks)


def shard_number(shard: str) -> int:
    match = re.fullmatch(r"shard-(\d+)\.tar", shard)
    if match is None:
        raise image_shards.ManifestError(f"{shard!r} is not a shard name")
    return int(match.group(1))


def _content_hashes(listing: Listing) -> dict[str, str]:
    """sha256 of every non-empty input that could have a twin (same size), by source."""
    by_size: dict[int, list[RawItem]] = defaultdict(list)
    for item in listing.items:
        if item.size > 0:
            by_size[item.size].append(item)
    known: dict[str, str] = {}
    todo: list[RawItem] = []
    for group in by_size.values():
        if len(group) < 2:
            continue
        if all(_content_etag(item) for item in group):  # S3 already hashed them: no GET
            known.update((item.source, "md5:" + _content_etag(item)) for item in group)
            continue
        known.update((item.source, item.sha256) for item in group if item.sha256 is not None)
        todo.extend(item for item in group if item.sha256 is None)

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


def _content_etag(item: RawItem) -> str:
    """An S3 object's ETag when it looks like the MD5 of its bytes (one part), else "".
    Multipart ETags are not content hashes and are refused; a single-part SSE-KMS ETag is
    not one either, but it is unique per object, so twins go unnoticed, never confused."""
    if not storage.is_s3(item.url) or "#" in item.url:
        return ""
    return item.etag if re.fullmatch(r"[0-9a-f]{32}", item.etag) else ""


# ---------------------------------------------------------------------------------------
# 2. Write one chunk


def chunk_digest(chunk: Chunk, config: ShardConfig, class_names: Sequence[str] | None) -> str:
    """Identifies a chunk's output: its shard number (in its samples' keys), its inputs as
    listed (with their version tags) and the config's identity."""
    return configs.key(
        config,
        class_names=list(class_names) if class_names is not None else None,
        shard=chunk.index,
        items=[[item.source, item.size, item.etag, item.caption, item.label, item.sha256] for item in chunk.items],
        format=[image_shards.FORMAT_NAME, image_shards.FORMAT_VERSION],
    )



@dataclass(frozen=True)
class Todo:
    """One chunk as the flow hands it to a task: what to write, and what the listing of the
    output found of it (its record's URL when listed, whether its shard is)."""

    chunk: Chunk
    digest: str
    record: str | None
    shard_listed: bool


def todo(plan: Plan, dest: str, config: ShardConfig, listed: dict[str, int]) -> tuple[list[Todo], list[str]]:
    """Each chunk with what one listing of ``dest`` says of it, and what the listing holds
    that this plan does not (shards and records of other plans or digests: removed once the
    new manifest is written). Records of another digest for a chunk still to write are
    removed now, so a record never vouches for another run's shard."""
    todos = []
    keep = set()
    for chunk in plan.chunks:
        digest = chunk_digest(chunk, config, plan.class_names)
        record = image_shards.part_record_url(dest, chunk.shard, digest)
        shard = storage.join(dest, chunk.shard)
        todos.append(Todo(chunk, digest, record if record in listed else None, shard in listed))
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


def write_chunk(todo: Todo, dest: str, config: ShardConfig) -> Part:
    """Fetch, validate and preprocess one chunk; write its shard, then its part record."""
    done = completed_part(todo)
    if done is not None:
        return replace(done, skipped=True)
    chunk, digest = todo.chunk, todo.digest

    samples: list[image_shards.Sample] = []
    rejects: list[Reject] = []
    histogram = np.zeros((3, 256), dtype=np.int64)  # exact integer statistics

    def prepare(position: int, item: RawItem, data: bytes | Vanished) -> tuple[image_shards.Sample, np.ndarray] | Reject:
        if isinstance(data, Vanished):
            return Reject(item.source, str(data))
        try:
            return _sample(image_shards.sample_key(chunk.index, position), item, data, config)
        except images.Rejected as exc:
            return Reject(item.source, str(exc))

    fetched = ((position, item, data) for position, (item, data) in enumerate(fetch(chunk.items)))
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


def finalize(plan: Plan, parts: Sequence[Part], dest: str, config: ShardConfig,
             stale: Sequence[str] = ()) -> image_shards.ImageManifest:
    """Write rejects, duplicates and (last) the manifest; then remove ``stale``, the shards
    and records of an earlier plan, which a reader of the old manifest no longer needs."""
    by_shard = {part.shard: part for part in parts}
    if sorted(by_shard) != sorted(chunk.shard for chunk in plan.chunks) or len(parts) != len(plan.chunks):
        raise RuntimeError("finalize needs exactly one part per planned chunk")
    parts = [by_shard[chunk.shard] for chunk in plan.chunks]  # in range order
    rejects = sorted([*plan.listing_rejects, *(r for part in parts for r in part.rejects)], key=lambda r: r.source)
    image_shards.write_jsonl(storage.join(dest, image_shards.REJECTS), (asdict(r) for r in rejects))
    image_shards.write_jsonl(storage.join(dest, image_shards.DUPLICATES), (asdict(d) for d in plan.duplicates))
    if plan.small_files:
        image_shards.write_jsonl(storage.join(dest, SIDECARS), (
            {"url": f.url, "size": f.size, "etag": f.etag, "content": f.content.decode("latin-1")} for f in plan.small_files))

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
        input_key=plan.input_key,
        ranges=tuple((chunk.start, chunk.shard) for chunk in plan.chunks),
    )
    storage.write_text(image_shards.manifest_url(dest), manifest.to_json())
    for url in stale:
        storage.delete(url)
    return manifest


def summary_line(manifest: image_shards.ImageManifest, dest: str, written: int, skipped: int, seconds: float,
                 unchanged: bool = False) -> str:
    if unchanged:
        return f"shard: {manifest.summary()} -> {dest} [unchanged source and config: nothing to do, {seconds:.1f}s]"
    rate = manifest.num_inputs / seconds if seconds > 0 else math.inf
    return (
        f"shard: {manifest.summary()} -> {dest} "
        f"[{written} shards written, {skipped} already complete, {seconds:.1f}s, {rate:.0f} inputs/s]"
    )
