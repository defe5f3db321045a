"""Storage by URL: one small layer over local paths and ``s3://bucket/prefix``.

Every stage reads and writes through these functions, so the same code runs against a
folder on a laptop and an S3-compatible store on a cluster.

- Writes are atomic. Locally a file is written under a hidden temporary name in the
  destination folder and renamed into place; on S3 the object appears only when its
  upload completes (``upload_fileobj`` switches to multipart above ``MULTIPART_THRESHOLD``
  and aborts the upload if anything fails). A reader never sees half an object.
- S3 goes through boto3 with its standard credential chain; the endpoint comes from
  ``AWS_ENDPOINT_URL`` (boto3 reads it), so MinIO, Ceph and R2 work unchanged. Transient
  errors (throttling, 5xx, dropped connections) are retried with exponential backoff by
  botocore's ``standard`` retry mode.

Hand-written rather than fsspec: fsspec's local and s3fs writes are not atomic (a killed
writer leaves a partial file that readers take), and atomicity is what resumption rests on.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO

from ldmflow.errors import LdmflowError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
S3_MAX_ATTEMPTS = 8
_TMP_MARKER = ".tmp-"


class StorageError(LdmflowError, RuntimeError):
    """A storage operation failed after retries (or could not be retried)."""


class NotFound(StorageError, FileNotFoundError):
    """The URL names no object or file."""


@dataclass(frozen=True)
class Entry:
    """One object found by :func:`list_prefix`."""

    url: str
    size: int
    etag: str = ""  # what changes when the content does: S3's ETag, a local file's mtime in ns


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def absolute(url: str) -> str:
    """A local path made absolute (other processes, Ray workers among them, have another
    working directory); URLs with a scheme are returned as they are."""
    if "://" in url or url.startswith("builtin:"):
        return url
    return os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    """Join URL path segments with ``/`` (local paths too, on POSIX)."""
    url = base
    for part in parts:
        url = url.rstrip("/") + "/" + part.lstrip("/")
    return url


def dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def relative_to(url: str, base: str) -> str:
    """``url`` with the prefix ``base/`` removed."""
    base = base.rstrip("/") + "/"
    if not url.startswith(base):
        raise ValueError(f"{url} is not under {base}")
    return url[len(base) :]


def is_temporary(name: str) -> bool:
    """True for the hidden names that :func:`open_write` writes before renaming."""
    name = basename(name)
    return name.startswith(".") and _TMP_MARKER in name


# ---------------------------------------------------------------------------------------
# S3


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, key


_clients = threading.local()


def s3_client():
    """A boto3 S3 client for this thread (clients are cached per thread and process)."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    cache = getattr(_clients, "cache", None)
    if cache is None:
        cache = _clients.cache = {}
    client = cache.get(key)
    if client is None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=10,
            read_timeout=60,
        )
        client = cache[key] = boto3.session.Session().client("s3", config=config)
    return client


def _s3_error(url: str, exc: Exception) -> StorageError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"404", "NoSuchKey", "NotFound"}:
            return NotFound(f"{url}: no such object")
        if code == "NoSuchBucket":
            return NotFound(f"{url}: no such bucket")
        return StorageError(f"{url}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"{url}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(url, exc) from exc


# ---------------------------------------------------------------------------------------
# The API


def open_read(url: str) -> BinaryIO:
    """A binary stream of the object at ``url`` (streaming on S3; close it when done)."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        return io.BufferedReader(_S3Reader(body, url), buffer_size=1 << 20)
    try:
        return open(url, "rb")
    except FileNotFoundError as exc:
        raise NotFound(f"{url}: no such file") from exc


def read_bytes(url: str) -> bytes:
    with open_read(url) as stream:
        return stream.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """Write ``url`` atomically: it appears complete when the block exits, or not at all.

    Locally the data goes to a hidden temporary file beside the target, which is fsynced
    and renamed over it. For S3 it is spooled to a local temporary file and uploaded when
    the block exits (multipart for large objects); an exception inside the block uploads
    nothing.
    """
    if is_s3(url):
        bucket, key = _split_s3(url)
        with tempfile.TemporaryFile(prefix="ldmflow-upload-") as spool:
            yield spool
            spool.seek(0)
            from boto3.s3.transfer import TransferConfig

            transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
            with _s3_errors(url):
                s3_client().upload_fileobj(spool, bucket, key, Config=transfer)
        return
    folder = os.path.dirname(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(url)}{_TMP_MARKER}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, url)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url) as handle:
        handle.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def exists(url: str) -> bool:
    if is_s3(url):
        bucket, key = _split_s3(url)
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise _s3_error(url, exc) from exc
    return os.path.isfile(url)


def size(url: str) -> int:
    return stat(url).size


def stat(url: str) -> Entry:
    """One object's size and version tag (one HEAD on S3)."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return Entry(url, int(head["ContentLength"]), head.get("ETag", "").strip('"'))
    try:
        return _local_entry(url)
    except FileNotFoundError as exc:
        raise NotFound(f"{url}: no such file") from exc


def _local_entry(path: str) -> Entry:
    info = os.stat(path)
    return Entry(path, info.st_size, str(info.st_mtime_ns))


def delete(url: str) -> None:
    """Remove one object or file; a missing one is not an error."""
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(url)


def list_prefix(prefix: str, recursive: bool = True, start: str = "") -> Iterator[Entry]:
    """Every object under the folder ``prefix``, sorted by URL; temporary files are skipped.

    ``prefix`` names a folder: ``s3://b/data`` lists ``s3://b/data/...`` and not
    ``s3://b/database``. With ``start``, the listing begins at the first object whose path
    relative to ``prefix`` is not below it (S3's ``StartAfter``; locally, folders that sort
    before it are not walked). Either way the listing streams: a consumer that stops early
    reads no further, and memory holds one page (one folder's names locally), not the listing.
    """
    if is_s3(prefix):
        bucket, key = _split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        kwargs = {"Bucket": bucket, "Prefix": key}
        if start:
            kwargs["StartAfter"] = key + start[:-1]  # below ``start``, whatever its last character
        if not recursive:
            kwargs["Delimiter"] = "/"
        with _s3_errors(prefix):
            for page in paginator.paginate(**kwargs):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/") or is_temporary(obj["Key"]) or obj["Key"][len(key):] < start:
                        continue
                    yield Entry(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj.get("ETag", "").strip('"'))
        return
    if not os.path.isdir(prefix):
        raise NotFound(f"{prefix}: no such folder")
    base = prefix.rstrip("/")
    if recursive:
        yield from _walk_sorted(base, "", start)
        return
    found = []
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if os.path.isfile(path) and not is_temporary(name) and name >= start:
            found.append(_local_entry(path))
    yield from sorted(found, key=lambda entry: entry.url)


def _walk_sorted(base: str, folder: str, start: str) -> Iterator[Entry]:
    """The files under ``base/folder`` in the order of their full paths: siblings sorted by
    name, a folder's name followed by "/" (so ``a-b`` comes before ``a/x`` and ``a.png``
    before ``a/``). Symbolic links to folders are not followed, as ``os.walk`` does not."""
    with os.scandir(os.path.join(base, folder) if folder else base) as found:
        children = [(entry.name + "/" if entry.is_dir() else entry.name, entry) for entry in found]
    for name, entry in sorted(children, key=lambda pair: pair[0]):
        rel = folder + name
        if name.endswith("/"):
            if entry.is_symlink() or (rel < start and not start.startswith(rel)):
                continue
            yield from _walk_sorted(base, rel, start)
        elif rel >= start and not is_temporary(name):
            yield _local_entry(os.path.join(base, rel))


def remove_stale_temporaries(folder: str) -> int:
    """Delete temporary files that a killed writer left in a local ``folder``.

    Only for a folder this process owns (a stage's output); S3 uploads leave no visible
    temporaries. Returns how many were removed.
    """
    if is_s3(folder) or not os.path.isdir(folder):
        return 0
    removed = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if is_temporary(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


class _S3Reader(io.RawIOBase):
    """A botocore StreamingBody as a raw binary stream whose errors are StorageErrors."""

    def __init__(self, body, url: str):
        self._body = body
        self._url = url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._body.read(len(buffer))
        except Exception as exc:  # botocore raises several types for a dropped stream
            raise StorageError(f"{self._url}: read failed: {exc}") from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()
