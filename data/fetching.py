"""The bytes of a source's inputs, chunk by chunk, in order: files and objects read
``FETCH_THREADS`` at a time, tar members by streaming each tar once, built-in images from
their package; an input that can no longer be read as listed is :class:`Vanished`."""

from __future__ import annotations

import collections
import hashlib
import itertools
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ldmflow.data import builtin, storage
from ldmflow.data.sources import RawItem

class Vanished(Exception):
    """An input listed earlier that can no longer be read as listed."""


FETCH_THREADS = 16  # requests in flight per chunk: a store's latency, not its bandwidth, bounds one GET at a time


def fetch(items: Iterable[RawItem], ahead: int = 2 * FETCH_THREADS) -> Iterator[tuple[RawItem, bytes | Vanished]]:
    """The bytes of each item, in order; an unreadable one yields :class:`Vanished`.

    Files and objects are read ``FETCH_THREADS`` at a time, at most ``ahead`` beyond the one
    the caller is at (one GET at a time would leave a chunk waiting on the store's latency:
    20–50 ms an object on S3). Transient storage errors propagate (as
    ``storage.StorageError``), in order, so the caller's task can be retried; a file that
    disappeared or changed since listing is this item's error. Tar members are read by
    streaming each tar once per call.
    """
    items = list(items)
    from_tars: dict[str, dict[str, bytes]] = {}
    tar_urls = sorted({item.url.split("#", 1)[0] for item in items if _is_tar_member(item)})
    for tar_url in tar_urls:
        wanted = {item.url.split("#", 1)[1] for item in items if item.url.startswith(tar_url + "#")}
        from_tars[tar_url] = _read_members(tar_url, wanted)

    def read(item: RawItem) -> bytes | Vanished | storage.StorageError:
        try:
            if builtin.is_builtin(item.url):
                source, _, index = item.url.partition("#")
                data = builtin.load(source).png(int(index))
            elif _is_tar_member(item):
                tar_url, _, member = item.url.partition("#")
                if member not in from_tars[tar_url]:
                    return Vanished(f"no longer readable from {storage.basename(tar_url)}")
                data = from_tars[tar_url][member]
            else:
                data = storage.read_bytes(item.url)
        except storage.NotFound:
            return Vanished("no longer exists")
        except storage.StorageError as exc:
            return exc
        except OSError as exc:
            return Vanished(f"unreadable: {exc.strerror or exc}")
        if item.sha256 is not None and hashlib.sha256(data).hexdigest() != item.sha256:
            return Vanished("changed since it was listed")
        return data

    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(items)), thread_name_prefix="ldmflow-fetch") as pool:
        pending: collections.deque = collections.deque()
        queued = iter(items)
        for item in itertools.islice(queued, ahead):
            pending.append((item, pool.submit(read, item)))
        while pending:
            item, future = pending.popleft()
            following = next(queued, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
            result = future.result()
            if isinstance(result, storage.StorageError):
                for _, waiting in pending:
                    waiting.cancel()
                raise result
            yield item, result


def _is_tar_member(item: RawItem) -> bool:
    return "#" in item.url and not builtin.is_builtin(item.url)


def _read_members(url: str, wanted: set[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
                    if len(found) == len(wanted):
                        break
    except storage.StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError):
        pass  # members not found are reported by the caller as vanished
    return found
