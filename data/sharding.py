"""The shard stage: raw inputs → validated, deduplicated, resized WebDataset shards.

Three steps, each an importable function that the Prefect flow in ``flows/shard.py`` runs
as a task:

1. :func:`plan` deals the source into chunks, each a range of its sorted stems (a name
   without its extension: an image and its sidecars share one). A folder or prefix of
   files is surveyed in one streamed listing that keeps a count and a digest per range and
   never the names, so the driver holds O(shards); the task writing a chunk lists its own
   span. Tars and built-in sets are planned whole, exact duplicates found across them. A
   fresh output is cut every ``shard_size`` inputs; a rerun deals into the *ranges* its
   previous manifest recorded, so an input added or removed changes the one chunk whose
   range holds it. A range grown past twice ``shard_size`` is split, the new pieces taking
   new shard numbers; an emptied one is dropped.
2. :func:`write_chunk` reads one chunk (for a span: lists it, reads its sidecars and
   metadata, numbers its labels), fetches, validates, deduplicates and preprocesses it and
   writes its shard atomically, then a small part record named by the chunk's digest (what
   was dealt into its range, and the config's identity): ``_parts/shard-i.DIGEST.json``
   holds rejects, duplicates, labels, statistics and the shard's hash. One listing of the
   output says which chunks are done, which is what makes a killed run resumable and a
   rerun cost what changed.
3. :func:`finalize` gathers the part records into ``rejects.jsonl``,
   ``duplicates.jsonl`` and, last, ``manifest.json``, then removes shards and records the
   plan no longer has.

Before writing, :func:`unchanged` compares the source's listing (names, sizes, version
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
import posixpath
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
from ldmflow.data import builtin, image_shards, images, sources, storage
from ldmflow.data.sources import (Listing, RawItem, Reject, Vanished, fetch, is_metadata, is_sidecar, is_tar,
                                  list_source, scan, stem)


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
    """One shard to write: a range of the source's stems, as dealt by :class:`Dealer`."""

    index: int  # its shard's number
    start: str  # the first stem of its range; "" for the first chunk
    end: str = ""  # the next chunk's start: the range is [start, end), "" for no end
    listing: str = ""  # digest of the names, sizes and version tags dealt into the range
    items: tuple[RawItem, ...] = ()  # given by the plan (tars, built-ins); else the task reads its span
    metadata: tuple[storage.Entry, ...] = ()  # a span's: the metadata files of the folders it touches

    @property
    def shard(self) -> str:
        return image_shards.shard_name(self.index)


@dataclass(frozen=True)
class Plan:
    """What a run writes: its chunks and what they share. Two kinds of source:

    - a folder or prefix of files: ``spans``. The plan holds each chunk's range and a digest
      of its names, and the task that writes a chunk lists its own span, reads its
      sidecars and metadata, numbers its labels and drops its duplicates. The driver holds
      O(shards), never O(inputs).
    - tars and built-in sets: the plan reads them whole (tar members, hashes, sidecars in
      memory) and gives each chunk its items, with duplicates across the whole source found.
    """

    source: str
    chunks: tuple[Chunk, ...]  # sorted by range
    input_key: str  # see :func:`input_key`
    class_names: tuple[str, ...] | None  # spans: the names labels are numbered by (None: as integers)
    spans: bool = False
    class_folders: bool = False  # spans: the source is one folder per class
    duplicates: tuple[Duplicate, ...] = ()  # found by the plan (tars, built-ins)
    listing_rejects: tuple[Reject, ...] = ()  # refused by the plan (tars, built-ins)


@dataclass(frozen=True)
class Part:
    """What writing one chunk produced; saved as ``_parts/shard-i.DIGEST.json``."""

    shard: str
    digest: str
    num_inputs: int
    shard_info: image_shards.ShardInfo | None  # None when every input was refused
    rejects: tuple[Reject, ...]
    duplicates: tuple[Duplicate, ...]  # found within the chunk
    labels: tuple[str, ...]  # a span's labels as written, each once
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
            duplicates=tuple(Duplicate(**d) for d in body["duplicates"]),
            labels=tuple(body["labels"]),
            histogram=tuple(tuple(row) for row in body["histogram"]),
        )


@dataclass(frozen=True)
class Unnamed:
    """A span not written: one of its labels is a name the plan's class names lack. The
    flow gathers every span's names and deals again with all of them."""

    shard: str
    labels: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# 1. Plan


class _Piece:
    __slots__ = ("start", "files", "inputs", "hasher", "items")

    def __init__(self, start: str) -> None:
        self.start = start
        self.files = 0
        self.inputs = 0
        self.hasher = hashlib.sha256()
        self.items: list[RawItem] = []


class _Range:
    __slots__ = ("shard", "pieces", "starts", "highest")

    def __init__(self, start: str, shard: int | None) -> None:
        self.shard = shard  # None: a range of a fresh cut
        self.pieces = [_Piece(start)]
        self.starts = [start]  # the pieces'
        self.highest = ""  # the highest stem dealt into it

    def piece(self, stem: str) -> _Piece:
        return self.pieces[bisect.bisect_right(self.starts, stem) - 1]

    def cut(self, stem: str) -> None:
        self.pieces.append(_Piece(stem))
        self.starts.append(stem)


class Dealer:
    """Deals a source's files into ranges of stems as its sorted listing streams by,
    holding a count and a running hash per piece of ``shard_size`` inputs: O(shards)
    memory, never the files (unless it is given items to keep).

    Without ``ranges`` (a fresh output) the source is cut into pieces, each a chunk. With
    the ranges of the previous manifest, each file goes to the range its stem falls in, so a
    file added or removed changes the one range that holds it; a range is a chunk, unless it
    has grown past twice ``shard_size`` inputs: then each of its pieces is, the first keeping
    the range's shard and the others numbered after the largest. A range with no file is
    dropped.

    A piece ends once it has ``shard_size`` inputs and a file comes whose stem is above
    every stem of its range, so an image and its sidecars stay together. A range's digest
    is the hash of its pieces' digests: what a later run computes for it, cut or not.
    """

    def __init__(self, shard_size: int, ranges: Sequence[tuple[str, str]] = ()) -> None:
        self.shard_size = shard_size
        self.fresh = not ranges
        if ranges:
            self.ranges = [_Range(start if i else "", shard_number(shard)) for i, (start, shard) in enumerate(ranges)]
        else:
            self.ranges = [_Range("", None)]
        self.starts = [r.starts[0] for r in self.ranges]
        self.highest = ""
        self.end = ""

    def add(self, stem: str, line: str, is_input: bool, item: RawItem | None = None) -> None:
        """Deal one file (``line``: its name, size and version tag), in listing order."""
        at = bisect.bisect_right(self.starts, stem) - 1
        target = self.ranges[at]
        if stem > target.highest and target.pieces[-1].inputs >= self.shard_size:
            if self.fresh and at == len(self.ranges) - 1:
                target = _Range(stem, None)
                self.ranges.append(target)
                self.starts.append(stem)
            else:
                target.cut(stem)
        piece = target.piece(stem)
        piece.files += 1
        piece.hasher.update(line.encode())
        if is_input:
            piece.inputs += 1
            if item is not None:
                piece.items.append(item)
        target.highest = max(target.highest, stem)
        self.highest = max(self.highest, stem)

    def end_at(self, stem: str) -> None:
        """Take nothing from ``stem`` on (a ``limit``), if it is above every stem dealt."""
        if stem > self.highest:
            self.end = stem

    def chunks(self) -> tuple[Chunk, ...]:
        following = 1 + max((r.shard for r in self.ranges if r.shard is not None), default=-1)
        dealt: list[tuple[int, str, str, tuple[RawItem, ...]]] = []
        for r in self.ranges:
            pieces = [piece for piece in r.pieces if piece.files]
            if not pieces:
                continue
            if r.shard is not None and sum(p.inputs for p in pieces) <= 2 * self.shard_size:
                dealt.append((r.shard, r.starts[0], _digest_of(pieces), tuple(i for p in pieces for i in p.items)))
                continue
            for n, piece in enumerate(pieces):
                if n == 0 and r.shard is not None:
                    number = r.shard
                else:
                    number, following = following, following + 1
                dealt.append((number, r.starts[0] if n == 0 else piece.start, _digest_of([piece]), tuple(piece.items)))
        ends = [start for _, start, _, _ in dealt[1:]] + [self.end]
        return tuple(Chunk(number, start if i else "", end, listing, items)
                     for i, ((number, start, listing, items), end) in enumerate(zip(dealt, ends)))


def _digest_of(pieces: Sequence[_Piece]) -> str:
    return hashlib.sha256("".join(piece.hasher.hexdigest() for piece in pieces).encode()).hexdigest()


def deal(items: Sequence[RawItem], shard_size: int, ranges: Sequence[tuple[str, str]] = ()) -> tuple[Chunk, ...]:
    """:class:`Dealer` over ``items`` (sorted by source), each chunk holding its own."""
    dealer = Dealer(shard_size, ranges)
    for item in items:
        line = json.dumps([item.source, item.size, item.etag, item.caption, item.label, item.sha256]) + "\n"
        dealer.add(stem(item.source), line, True, item)
    return dealer.chunks()


def input_key(digest: str, config: ShardConfig) -> str:
    """What a shard run is made from: the digest of the source's listing and the config's identity."""
    return configs.key(config, listing=digest, format=[image_shards.FORMAT_NAME, image_shards.FORMAT_VERSION])


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


def plan(source: str, config: ShardConfig, previous: image_shards.ImageManifest | None = None) -> Plan:
    """Deal ``source`` into chunks: into ``previous``'s ranges when it was made with this
    config. A folder or prefix of files is surveyed in one streamed listing (:func:`survey`);
    tars and built-in sets are listed whole (:func:`plan_whole`)."""
    same_config = previous is not None and _identity_of(previous) == configs.identity(config)
    ranges = previous.ranges if same_config else ()
    if not builtin.is_builtin(source) and not is_tar(source):
        names = previous.class_names if same_config and not _numbered(previous.class_names) else None
        surveyed = survey(source, config, ranges, names)
        if surveyed is not None:
            return surveyed
    return plan_whole(source, config, ranges)


def survey(source: str, config: ShardConfig, ranges: Sequence[tuple[str, str]] = (),
           class_names: tuple[str, ...] | None = None) -> Plan | None:
    """One streamed pass over the listing of a folder or prefix, dealing its names into
    ranges and keeping a digest of it all; the class folders (when every input is one folder
    down) and the metadata files are the only other things kept. None when it holds tars,
    which are planned whole."""
    dealer = Dealer(config.shard_size, ranges)
    whole = hashlib.sha256(f"{source}\nlimit {config.limit}\n".encode())
    metadata: list[storage.Entry] = []
    folders: set[str] | None = set()  # None once an input is not one folder down
    taken = 0
    for entry in storage.list_prefix(source):
        rel = storage.relative_to(entry.url, source)
        if is_tar(rel):
            return None
        name = stem(rel)
        is_input = not is_sidecar(rel) and not is_metadata(rel)
        if is_input and config.limit and taken == config.limit:
            dealer.end_at(name)
            break
        line = f"{rel} {entry.size} {entry.etag}\n"
        whole.update(line.encode())
        if is_metadata(rel):
            metadata.append(entry)
            continue
        if is_input:
            taken += 1
            if folders is not None and rel.count("/") == 1:
                folders.add(rel.split("/", 1)[0])
            else:
                folders = None
        dealer.add(name, line, is_input)
    class_folders = bool(folders)
    if class_folders:
        class_names = tuple(sorted(folders))
    chunks = tuple(replace(chunk, metadata=_metadata_for(chunk, source, metadata)) for chunk in dealer.chunks())
    return Plan(source, chunks, input_key(whole.hexdigest(), config), class_names, spans=True,
                class_folders=class_folders)


def _metadata_for(chunk: Chunk, source: str, metadata: Sequence[storage.Entry]) -> tuple[storage.Entry, ...]:
    """The metadata files that can name a file of ``chunk``: those of the folders its range
    touches (at the top: all of them)."""

    def touches(entry: storage.Entry) -> bool:
        folder = posixpath.dirname(storage.relative_to(entry.url, source))
        if not folder:
            return True
        return chunk.start < folder + "0" and (not chunk.end or chunk.end > folder + "/")  # stems under FOLDER/

    return tuple(entry for entry in metadata if touches(entry))


def _numbered(names: Sequence[str] | None) -> bool:
    """Whether class names are those of integer labels ("0" … "N-1") or absent."""
    return names is None or tuple(names) == tuple(str(i) for i in range(len(names)))


def plan_whole(source: str, config: ShardConfig, ranges: Sequence[tuple[str, str]] = ()) -> Plan:
    """List ``source`` whole (tars read, sidecars in memory), mark exact duplicates across
    it, and deal the rest into chunks that carry their items."""
    scanned = scan(source, config.limit)
    listing = list_source(source, limit=config.limit, scanned=scanned)
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
    return Plan(source, deal(unique, config.shard_size, ranges), input_key(scanned.digest, config),
                listing.class_names, duplicates=tuple(duplicates), listing_rejects=listing.rejects)


def _identity_of(manifest: image_shards.ImageManifest) -> dict | None:
    try:
        return configs.identity(configs.from_dict(ShardConfig, manifest.config))
    except configs.ConfigError:
        return None


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
    """Read one chunk (its items, or its span: listed, sidecars and metadata read, labels
    numbered), fetch, validate, deduplicate and preprocess its inputs; write its shard, then
    its part record."""
    done = completed_part(todo)
    if done is not None:
        return replace(done, skipped=True)
    chunk, digest = todo.chunk, todo.digest
    items, rejects, labels = list(chunk.items), [], ()
    if not chunk.items:
        raw, rejects = sources.read_span(todo.source, chunk.start, chunk.end, chunk.metadata, todo.class_folders)
        labels = sources.label_names(raw)
        items = sources.number_labels(raw, todo.class_names)
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
    duplicates = sorted([*plan.duplicates, *(d for part in parts for d in part.duplicates)], key=lambda d: d.source)
    image_shards.write_jsonl(storage.join(dest, image_shards.REJECTS), (asdict(r) for r in rejects))
    image_shards.write_jsonl(storage.join(dest, image_shards.DUPLICATES), (asdict(d) for d in duplicates))

    histogram = np.zeros((3, 256), dtype=np.int64)
    for part in parts:
        histogram += np.asarray(part.histogram, dtype=np.int64)
    mean, std = histogram_mean_std(histogram)
    infos = tuple(part.shard_info for part in parts if part.shard_info is not None)
    manifest = image_shards.ImageManifest(
        source=plan.source,
        config=configs.to_dict(config),
        num_inputs=sum(part.num_inputs for part in parts) + len(plan.duplicates) + len(plan.listing_rejects),
        num_samples=sum(info.num_samples for info in infos),
        num_duplicates=len(duplicates),
        num_rejected=len(rejects),
        shards=infos,
        class_names=class_names(plan, parts),
        stats={"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]},
        input_key=plan.input_key,
        ranges=tuple((chunk.start, chunk.shard) for chunk in plan.chunks),
    )
    storage.write_text(image_shards.manifest_url(dest), manifest.to_json())
    for url in stale:
        storage.delete(url)
    return manifest


def class_names(plan: Plan, parts: Sequence[Part | Unnamed]) -> tuple[str, ...] | None:
    """The dataset's class names: the plan's, or for spans whose labels are integers, their
    numbers ("0" … the largest; none if one is negative)."""
    if not plan.spans or plan.class_names is not None:
        return plan.class_names
    numbers = [int(label) for part in parts for label in part.labels]
    return tuple(str(i) for i in range(max(numbers) + 1)) if numbers and min(numbers) >= 0 else None


def gathered_names(parts: Sequence[Part | Unnamed]) -> tuple[str, ...]:
    """Every label the spans hold, as written: the class names to deal with again when a
    span was :class:`Unnamed`."""
    return tuple(sorted({label for part in parts for label in part.labels}))


def summary_line(manifest: image_shards.ImageManifest, dest: str, written: int, skipped: int, seconds: float,
                 unchanged: bool = False) -> str:
    if unchanged:
        return f"shard: {manifest.summary()} -> {dest} [unchanged source and config: nothing to do, {seconds:.1f}s]"
    rate = manifest.num_inputs / seconds if seconds > 0 else math.inf
    return (
        f"shard: {manifest.summary()} -> {dest} "
        f"[{written} shards written, {skipped} already complete, {seconds:.1f}s, {rate:.0f} inputs/s]"
    )
