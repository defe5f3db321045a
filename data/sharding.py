"""The shard stage: raw inputs → validated, deduplicated, resized WebDataset shards.

Three steps, each an importable function that the Prefect flow in ``flows/shard.py`` runs
as a task:

1. :func:`ldmflow.data.shard_plan.plan` deals the source into chunks, each a range of its
   sorted stems (a name without its extension: an image and its sidecars share one). A
   folder or prefix of files is surveyed in one streamed listing that keeps a count and a
   digest per range and never the names, so the driver holds O(shards); the task writing a
   chunk lists its own span; a tar, or a folder of tars only, is a chunk per tar that its
   task streams. Built-in sets are planned whole, exact duplicates found across them. A fresh output is cut every ``shard_size`` inputs; a rerun deals into
   the *ranges* its previous manifest recorded, so an input added or removed changes the
   one chunk whose range holds it. A range grown past twice ``shard_size`` is split, the
   new pieces taking new shard numbers; an emptied one is dropped.
2. :func:`ldmflow.data.shard_writer.write_chunk` reads one chunk (for a span: lists it,
   reads its sidecars and metadata, numbers its labels), fetches, validates, deduplicates
   and preprocesses it and writes its shard atomically, then a small part record named by
   the chunk's digest (what was dealt into its range, and the config's identity):
   ``_parts/shard-i.DIGEST.json`` holds rejects, duplicates, labels, statistics and the
   shard's hash. One listing of the output says which chunks are done, which is what makes
   a killed run resumable and a rerun cost what changed.
3. :func:`finalize` (here) gathers the part records into ``rejects.jsonl``,
   ``duplicates.jsonl`` and, last, ``manifest.json``, then removes shards and records the
   plan no longer has.

This module holds the stage's config, the types the three steps pass between them, and
what they share. Before writing, :func:`unchanged` compares the source's listing (names,
sizes, version tags) and the config with what the manifest at the output was made from:
equal, and the shards all there, the run is done with one LIST of the source, one of the
output and one GET of the manifest.

The same inputs, config and previous manifest give byte-identical shards and the same
manifest, whether the run was interrupted or not.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ldmflow import configs
from ldmflow.data import image_shards, storage
from ldmflow.data.sources import RawItem, Reject


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
    """One shard to write: a range of the source's stems (as dealt by
    :class:`~ldmflow.data.shard_plan.Dealer`), or one tar of a source of tars."""

    index: int  # its shard's number
    start: str  # the first stem of its range ("" for the first chunk); a tar's name in the source
    end: str = ""  # the next chunk's start: the range is [start, end), "" for no end
    listing: str = ""  # digest of the names, sizes and version tags dealt into the range (or of the tar)
    items: tuple[RawItem, ...] = ()  # given by the plan (built-ins, a mixed source); else the task reads them
    metadata: tuple[storage.Entry, ...] = ()  # a span's: the metadata files of the folders it touches
    tar: str = ""  # a source of tars: the URL of the tar this chunk is, read whole by its task

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
    - a tar, or a folder or prefix of tars only: ``spans`` too, a chunk per tar. The task
      streams its tar (members hashed, sidecars resolved), numbers its labels and drops its
      duplicates; the driver lists the tars and never opens one.
    - built-in sets, and folders that mix tars with other files, or a run with ``limit``:
      the plan reads them whole (tar members, hashes, sidecars in memory) and gives each
      chunk its items, with duplicates across the whole source found.
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
# What the plan (:mod:`ldmflow.data.shard_plan`) and the flow both use


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


def shard_number(shard: str) -> int:
    match = re.fullmatch(r"shard-(\d+)\.tar", shard)
    if match is None:
        raise image_shards.ManifestError(f"{shard!r} is not a shard name")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------
# Pixel statistics: each chunk's histograms (:mod:`ldmflow.data.shard_writer`), summed here


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
# Finalize


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
