"""Step 1 of the shard stage (:mod:`ldmflow.data.sharding`): deal a source into chunks.

:func:`plan` deals the source into chunks, each a range of its sorted stems (a name without
its extension: an image and its sidecars share one). A folder or prefix of files is
surveyed in one streamed listing (:func:`survey`) that keeps a count and a digest per range
and never the names, so the driver holds O(shards); the task writing a chunk lists its own
span. A tar, or a folder of tars only, is a chunk per tar (:func:`tar_plan`) that its task
streams. Built-in sets and folders mixing tars with other files are planned whole
(:func:`plan_whole`), exact duplicates found across them. The :class:`Dealer` cuts a fresh output every ``shard_size`` inputs; a rerun
deals into the *ranges* its previous manifest recorded.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import posixpath
import re
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ldmflow import configs
from ldmflow.data import builtin, image_shards, sources, storage
from ldmflow.data.sharding import Chunk, Duplicate, Plan, ShardConfig, input_key, shard_number
from ldmflow.data.sources import Listing, RawItem, is_metadata, is_sidecar, is_tar, list_source, scan, stem


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


def plan(source: str, config: ShardConfig, previous: image_shards.ImageManifest | None = None) -> Plan:
    """Deal ``source`` into chunks: into ``previous``'s ranges when it was made with this
    config. A folder or prefix of files (or of tars only) is surveyed in one streamed listing
    (:func:`survey`), and so is a tar; built-in sets, folders that mix tars with other files,
    and runs with ``limit`` over tars are listed whole (:func:`plan_whole`)."""
    same_config = previous is not None and _identity_of(previous) == configs.identity(config)
    ranges = previous.ranges if same_config else ()
    names = previous.class_names if same_config and not _numbered(previous.class_names) else None
    if builtin.is_builtin(source) or (is_tar(source) and config.limit):
        return plan_whole(source, config, ranges)
    if is_tar(source):
        try:
            entry = storage.stat(source)
        except storage.NotFound as exc:
            raise sources.SourceError(f"{source}: no such tar") from exc
        whole = hashlib.sha256(f"{source}\nlimit 0\n{storage.basename(source)} {entry.size} {entry.etag}\n".encode())
        return tar_plan(source, [(storage.basename(source), entry)], whole.hexdigest(), config, ranges, names)
    surveyed = survey(source, config, ranges, names)
    return surveyed if surveyed is not None else plan_whole(source, config, ranges)


def survey(source: str, config: ShardConfig, ranges: Sequence[tuple[str, str]] = (),
           class_names: tuple[str, ...] | None = None) -> Plan | None:
    """One streamed pass over the listing of a folder or prefix, dealing its names into
    ranges and keeping a digest of it all; the class folders (when every input is one folder
    down) and the metadata files are the only other things kept. A folder of tars only is a
    chunk per tar (:func:`tar_plan`); None when it mixes tars with other files, or holds tars
    and a ``limit`` is set: those are planned whole."""
    dealer = Dealer(config.shard_size, ranges)
    whole = hashlib.sha256(f"{source}\nlimit {config.limit}\n".encode())
    metadata: list[storage.Entry] = []
    folders: set[str] | None = set()  # None once an input is not one folder down
    tars: list[tuple[str, storage.Entry]] = []
    taken = others = 0
    for entry in storage.list_prefix(source):
        rel = storage.relative_to(entry.url, source)
        if is_tar(rel):
            if config.limit or others:
                return None
            tars.append((rel, entry))
            whole.update(f"{rel} {entry.size} {entry.etag}\n".encode())
            continue
        if tars:
            return None
        others += 1
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
    if tars:
        return tar_plan(source, tars, whole.hexdigest(), config, ranges, class_names)
    class_folders = bool(folders)
    if class_folders:
        class_names = tuple(sorted(folders))
    chunks = tuple(replace(chunk, metadata=_metadata_for(chunk, source, metadata)) for chunk in dealer.chunks())
    return Plan(source, chunks, input_key(whole.hexdigest(), config), class_names, spans=True,
                class_folders=class_folders)


def tar_plan(source: str, tars: Sequence[tuple[str, storage.Entry]], digest: str, config: ShardConfig,
             ranges: Sequence[tuple[str, str]] = (), class_names: tuple[str, ...] | None = None) -> Plan:
    """A source of tars (``tars``: each one's name in the source, and its entry): a chunk per
    tar, which its task streams and writes as one shard. A tar keeps the shard it had in the
    previous ``ranges``; a new one takes a number after the largest, and one no longer there
    is dropped, so adding or changing a tar rewrites its own shard only."""
    numbers = {start: shard_number(shard) for start, shard in ranges}
    following = 1 + max(numbers.values(), default=-1)
    dealt = []
    for rel, entry in sorted(tars, key=lambda pair: pair[0]):
        number = numbers.get(rel)
        if number is None:
            number, following = following, following + 1
        listing = hashlib.sha256(f"{rel} {entry.size} {entry.etag}\n".encode()).hexdigest()
        dealt.append((number, rel, listing, entry.url))
    ends = [rel for _, rel, _, _ in dealt[1:]] + [""]
    chunks = tuple(Chunk(number, rel, end, listing, tar=url) for (number, rel, listing, url), end in zip(dealt, ends))
    return Plan(source, chunks, input_key(digest, config), class_names, spans=True)


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
