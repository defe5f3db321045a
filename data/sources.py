"""Raw datasets: what a source holds and how its inputs are listed, with their captions
and labels (the bytes are read by :mod:`ldmflow.data.fetching`).

A source is one of

- a local folder or an ``s3://`` prefix: flat, or one sub-folder per class (torchvision's
  ImageFolder layout);
- a ``.tar`` file, or a folder/prefix holding tars (WebDataset or plain tars of a tree);
- ``builtin:digits`` or ``builtin:mnist`` (:mod:`ldmflow.data.builtin`).

Captions and labels come from a sidecar beside the image (``NAME.txt`` caption,
``NAME.cls`` label, ``NAME.json`` with ``caption`` and/or ``label``), from a
``metadata.jsonl`` or ``metadata.csv`` with a ``file_name`` column (the Hugging Face
imagefolder convention; ``caption``/``text`` and ``label`` columns), or for labels from the
class folder. A sidecar wins over metadata, metadata over the folder.

Every file that is neither a sidecar nor a metadata file is an input; whatever cannot be
used becomes a reject with its reason, so ``inputs = samples + duplicates + rejects``.

A folder or prefix can be read one *span* at a time (:mod:`ldmflow.data.spans`): the files
whose stems (names without extensions) lie in a range, so that no process need hold the
whole listing, and a tar one at a time (:func:`ldmflow.data.spans.read_tar`). Built-ins and
folders mixing tars with other files are listed whole (:func:`list_source`).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ldmflow.data import builtin, storage
from ldmflow.data.builtin import SourceError

SIDECAR_SUFFIXES = (".txt", ".cls", ".json")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("caption", "text", "txt")
LABEL_COLUMNS = ("label", "cls")


@dataclass(frozen=True)
class RawItem:
    """One input: where its bytes are and what is known of it before decoding."""

    source: str  # path relative to SOURCE; unique; the sort order of the dataset
    url: str  # file or object URL, "TAR_URL#member", or "builtin:NAME#index"
    size: int
    caption: str | None = None
    label: int | None = None
    sha256: str | None = None  # known at listing for tar members and built-ins
    etag: str = ""  # the store's version tag of the image file (S3 ETag, local mtime); "" in a tar


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """What a source holds, from one LIST (one HEAD for a tar file): every file's name, size
    and version tag, and a digest of them all. Equal digests mean an unchanged source, so a
    rerun can know it has nothing to do before reading a sidecar or a tar."""

    source: str
    entries: tuple[storage.Entry, ...]
    digest: str


@dataclass(frozen=True)
class Listing:
    items: tuple[RawItem, ...]  # sorted by source
    rejects: tuple[Reject, ...]  # inputs refused while listing (orphan sidecars, broken tars)
    class_names: tuple[str, ...] | None


# ---------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class SourceFile:
    rel: str  # relative to the tree's root
    url: str
    size: int
    sha256: str | None = None
    content: bytes | None = None  # kept for small files read while listing (tar members)
    etag: str = ""


def scan(source: str, limit: int = 0) -> Scan:
    """One listing of ``source``: its files and their digest (with ``limit``, which changes
    what is taken)."""
    if builtin.is_builtin(source):
        entries: tuple[storage.Entry, ...] = ()
        what = builtin.fingerprint(source)
    else:
        if _is_tar_file(source):
            try:
                entries = (storage.stat(source),)
            except storage.NotFound as exc:
                raise SourceError(f"{source}: no such tar") from exc
        else:
            try:
                entries = tuple(storage.list_prefix(source))
            except storage.NotFound as exc:
                raise SourceError(f"{source}: no such folder or prefix") from exc
        what = "".join(f"{storage.relative_to(e.url, source) if e.url != source else ''} {e.size} {e.etag}\n"
                       for e in entries)
    digest = hashlib.sha256(f"{source}\nlimit {limit}\n{what}".encode()).hexdigest()
    return Scan(source, entries, digest)


def _is_tar_file(source: str) -> bool:
    return source.endswith(".tar") and not source.endswith("/")


def list_source(source: str, limit: int = 0, scanned: Scan | None = None) -> Listing:
    """List every input of ``source`` once, sorted, with captions and labels resolved
    (from ``scanned``, when given, with no second listing)."""
    if builtin.is_builtin(source):
        return _list_builtin(source, limit)
    entries = (scanned or scan(source, limit)).entries
    if _is_tar_file(source):
        trees = [(storage.basename(source), list_tar(source))]
    else:
        loose: list[SourceFile] = []
        trees = []
        for entry in entries:
            rel = storage.relative_to(entry.url, source)
            if rel.endswith(".tar"):
                trees.append((rel, list_tar(entry.url)))
            else:
                loose.append(SourceFile(rel, entry.url, entry.size, etag=entry.etag))
        trees.insert(0, ("", (loose, [])))
    items: list[tuple[RawItem, str | int | None]] = []
    rejects: list[Reject] = []
    for root, (files, tree_rejects) in trees:
        tree_items, more_rejects = resolve_tree(root, files)
        items.extend(tree_items)
        rejects.extend(tree_rejects)
        rejects.extend(more_rejects)
    items.sort(key=lambda pair: pair[0].source)
    if limit:
        items = items[:limit]
    resolved, class_names = _number_labels(items)
    rejects.sort(key=lambda reject: reject.source)
    return Listing(tuple(resolved), tuple(rejects), class_names)


def check_source(source: str) -> None:
    """Fail fast, before any work starts, on a source that does not exist or is empty."""
    if builtin.is_builtin(source):
        builtin.load(source)
        return
    if _is_tar_file(source):
        if not storage.exists(source):
            raise SourceError(f"{source}: no such tar")
        return
    try:
        next(iter(storage.list_prefix(source)))
    except storage.NotFound as exc:
        raise SourceError(f"{source}: no such folder or prefix") from exc
    except StopIteration as exc:
        raise SourceError(f"{source}: no such folder or prefix, or it is empty") from exc


def _list_builtin(source: str, limit: int) -> Listing:
    dataset = builtin.load(source)
    count = len(dataset.labels) if not limit else min(limit, len(dataset.labels))
    items = []
    for index in range(count):
        png = dataset.png(index)
        items.append(
            RawItem(
                source=f"{dataset.name}/{index:05d}.png",
                url=f"{source}#{index}",
                size=len(png),
                caption=dataset.caption(index),
                label=int(dataset.labels[index]),
                sha256=hashlib.sha256(png).hexdigest(),
            )
        )
    return Listing(tuple(items), (), dataset.class_names)


def list_tar(url: str) -> tuple[list[SourceFile], list[Reject]]:
    """Members of a tar, hashed as they stream by; small sidecars are kept in memory."""
    files: list[SourceFile] = []
    rejects: list[Reject] = []
    name = storage.basename(url)
    try:
        with storage.open_read(url) as raw:
            stream = _TailWatcher(raw)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    keep = data if _is_sidecar_or_metadata(member.name) else None
                    sha = hashlib.sha256(data).hexdigest()
                    files.append(SourceFile(member.name, f"{url}#{member.name}", len(data), sha, keep))
                end = tar.offset
            if not stream.has_end_marker(end):
                raise tarfile.ReadError("the archive ends without its end-of-archive marker")
    except storage.StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        rejects.append(Reject(name, f"truncated or corrupt tar after {len(files)} members: {exc}"))
    return files, rejects


class _TailWatcher(io.RawIOBase):
    """Reads through a stream, remembering the total length and the last bytes.

    Python's tarfile takes a tar cut at a header boundary for a complete one; a complete
    tar has a zero block where the next header would be, which :meth:`has_end_marker`
    checks.
    """

    KEEP = 1 << 16

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.total += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - self.KEEP)]
        return len(data)

    def has_end_marker(self, offset: int) -> bool:
        drained = iter(lambda: self.read(1 << 16), b"")  # the marker may lie beyond what tarfile read
        collections.deque(drained, maxlen=0)
        start = offset - (self.total - len(self.tail))
        return 0 <= start and start + 512 <= len(self.tail) and not any(self.tail[start : start + 512])


def _is_sidecar_or_metadata(path: str) -> bool:
    return posixpath.basename(path) in METADATA_NAMES or path.endswith(SIDECAR_SUFFIXES)


def resolve_tree(root: str, files: list[SourceFile], class_folders: bool | None = None
                  ) -> tuple[list[tuple[RawItem, str | int | None]], list[Reject]]:
    """Pair the inputs of one tree (a folder or one tar, or a span of a folder's names)
    with their sidecars and metadata, read here. ``class_folders``: whether the whole tree
    is one folder per class (by default, whether these files are)."""

    def source_of(rel: str) -> str:
        return f"{root}/{rel}" if root else rel

    metadata_files = [f for f in files if posixpath.basename(f.rel) in METADATA_NAMES]
    others = [f for f in files if posixpath.basename(f.rel) not in METADATA_NAMES]
    stems = {posixpath.splitext(f.rel)[0] for f in others if not f.rel.endswith(SIDECAR_SUFFIXES)}
    sidecars = {f.rel: f for f in others if f.rel.endswith(SIDECAR_SUFFIXES) and posixpath.splitext(f.rel)[0] in stems}
    inputs = [f for f in others if f.rel not in sidecars]

    rejects: list[Reject] = []
    for f in inputs:
        if f.rel.endswith(SIDECAR_SUFFIXES):
            rejects.append(Reject(source_of(f.rel), f"a {posixpath.splitext(f.rel)[1]} sidecar with no image beside it"))
    inputs = [f for f in inputs if not f.rel.endswith(SIDECAR_SUFFIXES)]

    contents = _read_small([*sidecars.values(), *metadata_files])
    metadata = {}
    for f in metadata_files:
        try:
            metadata.update(_parse_metadata(f, contents[f.rel]))
        except ValueError as exc:  # the whole file is refused; its images are still inputs
            rejects.append(Reject(source_of(f.rel), f"unusable metadata file: {exc}"))
    if class_folders is None:
        class_folders = bool(inputs) and all(f.rel.count("/") == 1 for f in inputs)

    items = []
    for f in inputs:
        stem = posixpath.splitext(f.rel)[0]
        caption, label = metadata.get(f.rel, (None, None))
        if class_folders and label is None:
            label = f.rel.split("/", 1)[0]
        side = {suffix: contents.get(stem + suffix) for suffix in SIDECAR_SUFFIXES}
        if side[".json"] is not None:
            try:
                body = json.loads(side[".json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                rejects.append(Reject(source_of(stem + ".json"), "a sidecar that is not valid JSON"))
                body = {}
            if isinstance(body, dict):
                caption = body.get("caption", body.get("text", caption))
                label = body.get("label", label)
        if side[".cls"] is not None:
            label = side[".cls"].decode("utf-8", "replace").strip()
        if side[".txt"] is not None:
            caption = side[".txt"].decode("utf-8", "replace").strip()
        items.append((RawItem(source_of(f.rel), f.url, f.size, caption, None, f.sha256, f.etag), label))
    return items, rejects


def _read_small(files: Sequence[SourceFile]) -> dict[str, bytes]:
    """Contents of sidecars and metadata files: in memory (tar members), else read concurrently."""
    contents = {f.rel: f.content for f in files if f.content is not None}
    todo = [f for f in files if f.content is None]
    with ThreadPoolExecutor(max_workers=16) as pool:
        contents |= dict(zip([f.rel for f in todo], pool.map(lambda f: storage.read_bytes(f.url), todo)))
    return contents


def _parse_metadata(f: SourceFile, content: bytes) -> dict[str, tuple[str | None, str | int | None]]:
    """``file_name`` → (caption, label) from a metadata.jsonl or metadata.csv."""
    folder = posixpath.dirname(f.rel)
    text = content.decode("utf-8", "replace")
    if f.rel.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {number} is not JSON: {exc}") from exc
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    found = {}
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row:
            raise ValueError("every row needs a file_name")
        caption = next((row[c] for c in CAPTION_COLUMNS if row.get(c) not in (None, "")), None)
        label = next((row[c] for c in LABEL_COLUMNS if row.get(c) not in (None, "")), None)
        found[posixpath.normpath(posixpath.join(folder, row["file_name"]))] = (caption, label)
    return found


def _number_labels(items: Sequence[tuple[RawItem, str | int | None]]) -> tuple[list[RawItem], tuple[str, ...] | None]:
    """Integer labels as they are, named by their numbers ("0" … the largest: a `.cls` sidecar
    of the WebDataset convention); names (class folders, string labels) as sorted indices."""
    labels = [label for _, label in items if label is not None]
    if all(as_int(label) is not None for label in labels):
        numbers = [as_int(label) for label in labels]
        names = tuple(str(i) for i in range(max(numbers) + 1)) if numbers and min(numbers) >= 0 else None
        return [replace(item, label=as_int(label) if label is not None else None) for item, label in items], names
    names = tuple(sorted({str(label) for label in labels}))
    index = {name: i for i, name in enumerate(names)}
    return [replace(item, label=index[str(label)] if label is not None else None) for item, label in items], names


def as_int(value: str | int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


# ---------------------------------------------------------------------------------------
# Names: what a file is, by its name


def stem(rel: str) -> str:
    """A name without its extension: an image and its sidecars share it."""
    return posixpath.splitext(rel)[0]


def is_metadata(rel: str) -> bool:
    return posixpath.basename(rel) in METADATA_NAMES


def is_sidecar(rel: str) -> bool:
    return rel.endswith(SIDECAR_SUFFIXES)


def is_tar(rel: str) -> bool:
    return rel.endswith(".tar")
