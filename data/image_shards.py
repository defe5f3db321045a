"""The image-shard format, defined once: its writer, its manifest, and how one sample decodes.

A dataset is a folder (local or ``s3://``) of WebDataset tars named ``shard-000000.tar``
and so on, with ``manifest.json``, ``rejects.jsonl`` and ``duplicates.jsonl`` beside them.
Each sample in a tar is a group of members sharing a key (a zero-padded input index):

=============  ===========================================================
``KEY.png``    the image (or ``KEY.jpg``), RGB, ``resolution`` pixels square
``KEY.txt``    the caption, UTF-8, where known
``KEY.cls``    the integer label as ASCII digits, where known
``KEY.json``   ``source``, ``sha256`` of the original bytes, original
               ``width`` and ``height``, original ``mode`` and ``format``
=============  ===========================================================

Tars are written with a fixed mtime, owner and mode, so the same samples always give the
same bytes. The manifest lists every shard with its sample count, byte size and sha256;
shard URLs in it are relative to the manifest, so a dataset can be copied as a folder.
Streaming shards into training is :mod:`ldmflow.data.shard_stream`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldmflow.data import storage
from ldmflow.data.images import decode_rgb
from ldmflow.errors import LdmflowError

FORMAT_NAME = "ldmflow.image-shards"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("png", "jpg")
KEY_CAPTION = "txt"
KEY_LABEL = "cls"
KEY_META = "json"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
DUPLICATES = "duplicates.jsonl"
TAR_MTIME = 0  # fixed: the same samples give byte-identical tars


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


PARTS = "_parts"  # a stage's part records, one per output shard


def part_record_url(dest: str, shard: str, digest: str) -> str:
    """The part record of ``shard`` as written for ``digest`` (the shard and precompute stages
    alike): named by the digest, so one listing of ``dest`` says which shards are done."""
    return storage.join(dest, PARTS, f"{shard.removesuffix('.tar')}.{digest}.json")


def sample_key(shard: int, position: int) -> str:
    """The key of the ``position``-th input of shard ``shard``: stable while that shard's
    inputs are (an input added to another shard moves no key)."""
    return f"{shard:06d}{position:06d}"


# ---------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Sample:
    """One sample as stored: the encoded image and what is known about it."""

    key: str
    image: bytes
    image_ext: str  # "png" or "jpg"
    meta: dict[str, Any]
    caption: str | None = None
    label: int | None = None

    def members(self) -> dict[str, bytes | str]:
        members: dict[str, bytes | str] = {"__key__": self.key, self.image_ext: self.image}
        if self.caption is not None:
            members[KEY_CAPTION] = self.caption.encode("utf-8")
        if self.label is not None:
            members[KEY_LABEL] = str(int(self.label)).encode("ascii")
        members[KEY_META] = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return members


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``target`` while counting bytes and hashing them."""

    def __init__(self, target):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.target.write(data)
        return len(data)


@dataclass(frozen=True)
class WrittenShard:
    url: str
    num_samples: int
    bytes: int
    sha256: str


def write_shard(url: str, samples: Iterable[Sample | dict[str, Any]]) -> WrittenShard:
    """Write ``samples`` (or raw member dicts with ``__key__``) as one tar at ``url``, atomically.

    webdataset's ``TarWriter`` writes the tar; around it, by hand, what ``ShardWriter``
    lacks: an atomic upload through :mod:`ldmflow.data.storage`, fixed tar metadata (the same
    samples give the same bytes), and the sha256 and size taken while writing."""
    import webdataset as wds

    count = 0
    with storage.open_write(url) as handle:
        hashing = _HashingWriter(handle)
        writer = wds.TarWriter(hashing, encoder=False, mtime=TAR_MTIME, user="ldmflow", group="ldmflow", mode=0o444)
        for sample in samples:
            writer.write(sample.members() if isinstance(sample, Sample) else sample)
            count += 1
        writer.close()
    return WrittenShard(url, count, hashing.bytes, hashing.sha256.hexdigest())


def write_jsonl(url: str, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    storage.write_text(url, text)


def read_jsonl(url: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# The manifest


class ManifestError(LdmflowError, ValueError):
    """A manifest that is missing, unreadable, or of another format."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # relative to the manifest's folder
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ImageManifest:
    """What a shard run produced; ``num_inputs == num_samples + num_duplicates + num_rejected``."""

    source: str
    config: dict[str, Any]
    num_inputs: int
    num_samples: int
    num_duplicates: int
    num_rejected: int
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...] | None
    stats: dict[str, list[float]]  # per-channel "mean" and "std" of pixels in [0, 1]
    # What the shards were made from: a key of the source's listing and the config's identity
    # (equal keys: a rerun has nothing to do), and each chunk's range as (first source, shard),
    # sorted, the first from "": a rerun deals its inputs into the same ranges, so an input
    # added or removed changes one shard only.
    input_key: str = ""
    ranges: tuple[tuple[str, str], ...] = ()
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        total = self.num_samples + self.num_duplicates + self.num_rejected
        if self.num_inputs != total:
            raise ManifestError(
                f"counts do not reconcile: {self.num_inputs} inputs != {self.num_samples} samples "
                f"+ {self.num_duplicates} duplicates + {self.num_rejected} rejected"
            )
        if sum(shard.num_samples for shard in self.shards) != self.num_samples:
            raise ManifestError("shard sample counts do not add up to num_samples")

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "version": self.version,
            "source": self.source,
            "num_inputs": self.num_inputs,
            "num_samples": self.num_samples,
            "num_duplicates": self.num_duplicates,
            "num_rejected": self.num_rejected,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "stats": self.stats,
            "config": self.config,
            "shards": [vars(shard) for shard in self.shards],
            "input_key": self.input_key,
            "ranges": [list(r) for r in self.ranges],
        }
        return json.dumps(body, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> ImageManifest:
        body = parse_manifest(text, where, FORMAT_NAME, FORMAT_VERSION)
        try:
            return cls(
                source=body["source"],
                config=body["config"],
                num_inputs=body["num_inputs"],
                num_samples=body["num_samples"],
                num_duplicates=body["num_duplicates"],
                num_rejected=body["num_rejected"],
                shards=tuple(ShardInfo(**shard) for shard in body["shards"]),
                class_names=tuple(body["class_names"]) if body["class_names"] is not None else None,
                stats=body["stats"],
                input_key=body.get("input_key", ""),
                ranges=tuple((str(start), str(shard)) for start, shard in body.get("ranges", [])),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: missing or malformed field: {exc}") from exc

    def summary(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return (
            f"{self.num_inputs} inputs -> {self.num_samples} samples in {len(self.shards)} shards"
            f" ({self.num_duplicates} duplicates, {self.num_rejected} rejected{classes})"
        )


def parse_manifest(text: str, where: str, format_name: str, version: int) -> dict[str, Any]:
    """A manifest's JSON body, checked to be of ``format_name`` at ``version``."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != format_name:
        found = body.get("format") if isinstance(body, dict) else None
        raise ManifestError(f"{where}: format is {found!r}, expected {format_name!r}")
    if body.get("version") != version:
        raise ManifestError(f"{where}: version {body.get('version')} is not supported (expected {version})")
    return body


def read_manifest_text(dataset: str, stage: str) -> tuple[str, str]:
    """``(url, text)`` of a dataset's manifest; a clear error naming ``stage`` when missing."""
    url = manifest_url(dataset)
    try:
        return url, storage.read_text(url)
    except storage.NotFound as exc:
        raise ManifestError(f"{url}: no manifest (has the {stage} stage finished here?)") from exc


def manifest_url(dataset: str) -> str:
    """The manifest of a dataset folder, or ``dataset`` itself if it names the manifest."""
    return dataset if dataset.endswith(".json") else storage.join(dataset, MANIFEST)


def read_manifest(dataset: str) -> ImageManifest:
    url, text = read_manifest_text(dataset, "shard")
    return ImageManifest.from_json(text, where=url)


def shard_urls(dataset: str, manifest=None) -> list[str]:
    """Absolute URLs of a dataset's shards (image or latent manifest), in manifest order."""
    manifest = manifest or read_manifest(dataset)
    folder = storage.dirname(manifest_url(dataset))
    return [storage.join(folder, shard.url) for shard in manifest.shards]


# ---------------------------------------------------------------------------------------
# Decoding one sample


@dataclass
class DecodedSample:
    key: str
    image: np.ndarray  # (3, H, W) float32 in [-1, 1]
    label: int  # -1 where unknown
    caption: str  # "" where unknown
    meta: dict[str, Any] = field(default_factory=dict)


def pixels_to_model(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels, (..., H, W, 3) uint8, as the models take them: (..., 3, H, W) float32 in [-1, 1]."""
    return np.moveaxis(pixels.astype(np.float32), -1, -3) / 127.5 - 1.0


def image_member(raw: dict[str, Any]) -> str:
    """The name of a sample's image member; ``ValueError`` where it has none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw.get('__key__')!r} in {raw.get('__url__')} has no image")
    return ext


def decode_sample(raw: dict[str, Any]) -> DecodedSample:
    """A raw member dict as arrays; raises ``ValueError`` for a corrupt or incomplete one."""
    ext = image_member(raw)
    try:
        pixels = decode_rgb(raw[ext])
    except Exception as exc:
        raise ValueError(f"sample {raw['__key__']!r} in {raw.get('__url__')}: undecodable image: {exc}") from exc
    image = pixels_to_model(pixels)
    label = int(raw[KEY_LABEL].decode("ascii")) if KEY_LABEL in raw else -1
    caption = raw[KEY_CAPTION].decode("utf-8") if KEY_CAPTION in raw else ""
    meta = json.loads(raw[KEY_META]) if KEY_META in raw else {}
    return DecodedSample(raw["__key__"], image, label, caption, meta)
