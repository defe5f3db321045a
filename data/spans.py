"""A folder or prefix read one *span* at a time, by the task that writes the span's shard:
the files whose stems (names without extensions) lie in a range, listed from its first
stem (:func:`read_span`), so that no process holds the whole listing; the span's labels
then numbered by the source's class names (:func:`number_labels`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ldmflow.data import storage
from ldmflow.data.sources import (RawItem, Reject, SourceFile, as_int, is_metadata, is_tar, list_tar, resolve_tree,
                                  stem)

def span_limit(end: str) -> str:
    """The least name from which no file's stem sorts below ``end`` ("": no end). That is
    ``end`` itself, unless a stem that begins ``end`` is followed there by a character that
    sorts before "." (stem ``x``, end ``x-1``: ``x.png`` comes after ``x-1``); a stem's files
    all sort below the stem followed by "/"."""
    limit = end
    for n in range(1, len(end)):
        if end[n] < ".":
            limit = max(limit, end[:n] + "/")
    return limit


def in_span(rel: str, start: str, end: str) -> bool:
    return start <= stem(rel) and (not end or stem(rel) < end)


def list_span(source: str, start: str, end: str) -> list[storage.Entry]:
    """The files of a folder or prefix whose stems lie in [``start``, ``end``) (``end`` "":
    no end), by one listing that begins at ``start``. Metadata files and tars belong to no
    span: the caller knows them from its own listing."""
    limit = span_limit(end)
    found = []
    for entry in storage.list_prefix(source, start=start):
        rel = storage.relative_to(entry.url, source)
        if limit and rel >= limit:
            break
        if in_span(rel, start, end) and not is_metadata(rel) and not is_tar(rel):
            found.append(entry)
    return found


def read_span(source: str, start: str, end: str, metadata: Sequence[storage.Entry], class_folders: bool
              ) -> tuple[list[tuple[RawItem, str | int | None]], list[Reject]]:
    """The inputs of one span of ``source``, sorted, each with its caption and its label as
    written (not yet a class index), and the span's rejects. ``metadata``: the metadata files
    of the folders the span touches (a refused one is reported by the span holding its name);
    ``class_folders``: whether the whole source is one folder per class."""
    files = [SourceFile(storage.relative_to(e.url, source), e.url, e.size, etag=e.etag)
             for e in [*list_span(source, start, end), *metadata]]
    items, rejects = resolve_tree("", files, class_folders)
    rejects = [r for r in rejects if not is_metadata(r.source) or in_span(r.source, start, end)]
    items.sort(key=lambda pair: pair[0].source)
    rejects.sort(key=lambda reject: reject.source)
    return items, rejects


def read_tar(url: str, root: str) -> tuple[list[tuple[RawItem, str | int | None]], list[Reject]]:
    """The inputs of one tar of a source of tars (``root``: its name in the source, the
    prefix of its inputs' names), read in one pass that hashes its members and keeps its
    sidecars; sorted, each with its label as written, and the tar's rejects (a truncated tar
    after the members before the damage, orphan sidecars)."""
    files, rejects = list_tar(url)
    items, more = resolve_tree(root, files)
    items.sort(key=lambda pair: pair[0].source)
    return items, sorted([*rejects, *more], key=lambda reject: reject.source)


def number_labels(items: Sequence[tuple[RawItem, str | int | None]], names: Sequence[str] | None
                  ) -> list[RawItem] | None:
    """A span's labels as class indices: by their place in ``names`` when given, else as the
    integers they are. None when one is neither (a name not in ``names``, or a name where
    the labels were taken for numbers): the source's names must be gathered first."""
    index = {name: i for i, name in enumerate(names)} if names is not None else None
    numbered = []
    for item, label in items:
        if label is not None:
            label = as_int(label) if index is None else index.get(str(label))
            if label is None:
                return None
        numbered.append(replace(item, label=label))
    return numbered


def label_names(items: Sequence[tuple[RawItem, str | int | None]]) -> tuple[str, ...]:
    """The labels of a span as written, each once."""
    return tuple(sorted({str(label) for _, label in items if label is not None}))
