import os
import threading
import time

import pytest

from ldmflow.data import storage
from tests import helpers


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("bucket") + "/store"


def test_write_read_list_delete(root):
    storage.write_bytes(storage.join(root, "a/one.bin"), b"1")
    storage.write_text(storage.join(root, "a/two.txt"), "two")
    storage.write_bytes(storage.join(root, "b.bin"), b"333")
    storage.write_bytes(storage.join(root + "x", "other.bin"), b"not under root")

    assert storage.read_bytes(storage.join(root, "a/one.bin")) == b"1"
    assert storage.read_text(storage.join(root, "a/two.txt")) == "two"
    assert storage.exists(storage.join(root, "b.bin"))
    assert not storage.exists(storage.join(root, "missing.bin"))
    assert storage.size(storage.join(root, "b.bin")) == 3
    listed = [(storage.relative_to(e.url, root), e.size) for e in storage.list_prefix(root)]
    assert listed == [("a/one.bin", 1), ("a/two.txt", 3), ("b.bin", 3)]

    storage.delete(storage.join(root, "b.bin"))
    storage.delete(storage.join(root, "b.bin"))  # deleting twice is fine
    assert not storage.exists(storage.join(root, "b.bin"))
    with pytest.raises(storage.NotFound):
        storage.read_bytes(storage.join(root, "b.bin"))


def test_streaming_read(root):
    data = os.urandom(3 << 20)
    storage.write_bytes(storage.join(root, "big.bin"), data)
    with storage.open_read(storage.join(root, "big.bin")) as stream:
        chunks = []
        while chunk := stream.read(1 << 16):
            chunks.append(chunk)
    assert b"".join(chunks) == data


def test_failed_write_leaves_nothing_visible(root):
    url = storage.join(root, "partial.bin")
    storage.write_bytes(url, b"old complete version")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as handle:
            handle.write(b"half of the new ver")
            raise RuntimeError("writer died")
    assert storage.read_bytes(url) == b"old complete version"
    assert [storage.basename(e.url) for e in storage.list_prefix(root)] == ["partial.bin"]


def test_local_write_is_invisible_until_complete(tmp_path):
    url = str(tmp_path / "shard.tar")
    with storage.open_write(url) as handle:
        handle.write(b"x" * 100)
        assert not os.path.exists(url)
        assert list(storage.list_prefix(str(tmp_path))) == []  # the temporary is hidden
    assert open(url, "rb").read() == b"x" * 100


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".shard-000001.tar.tmp-abc").write_bytes(b"left by a killed writer")
    (tmp_path / "shard-000000.tar").write_bytes(b"complete")
    assert storage.remove_stale_temporaries(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]


def test_s3_multipart_upload(bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024 + 5)
    url = f"{bucket}/large/object.bin"
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data
    head = storage.s3_client().head_object(Bucket=bucket[5:], Key="large/object.bin")
    assert head["ETag"].strip('"').endswith("-3")  # uploaded in three parts


def test_s3_errors_are_clear(s3_server):
    with pytest.raises(storage.NotFound, match="no such bucket"):
        storage.read_bytes("s3://no-such-bucket-here/x")
    with pytest.raises(storage.NotFound):
        list(storage.list_prefix("/definitely/not/a/folder"))


def test_s3_outage_is_retried_until_the_store_returns(s3_server, bucket):
    """A store that goes away mid-run and comes back: the write's first attempt meets the
    outage, the store returns only once the client has retried, and the write lands, once."""
    from moto.server import ThreadedMotoServer

    host, port = s3_server.get_host_and_port()
    s3_server.stop()
    restarted = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    attempts: list[float] = []  # each PutObject botocore sends, retries included

    def count(**_) -> None:
        attempts.append(time.monotonic())

    events = storage.s3_client().meta.events  # this thread's client, the one the write uses
    events.register("before-send.s3.PutObject", count)

    def come_back():
        helpers.wait_until(lambda: len(attempts) >= 2, 120, "a retry of the write")
        restarted.start()

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        storage.write_bytes(f"{bucket}/after-outage.bin", b"payload")
        assert len(attempts) >= 2  # the first failed: the object is there because a retry was sent
        assert storage.read_bytes(f"{bucket}/after-outage.bin") == b"payload"
        assert [e.url.rsplit("/", 1)[1] for e in storage.list_prefix(bucket)] == ["after-outage.bin"]
    finally:
        events.unregister("before-send.s3.PutObject", count)
        thread.join()
        # The session fixture stops the original server object; move the new one into it.
        s3_server._server, s3_server._thread = restarted._server, restarted._thread


def test_path_helpers():
    assert storage.join("s3://b/p/", "/x", "y") == "s3://b/p/x/y"
    assert storage.dirname("s3://b/p/manifest.json") == "s3://b/p"
    assert storage.basename("s3://b/p/manifest.json") == "manifest.json"
    assert storage.relative_to("s3://b/p/x/y", "s3://b/p/") == "x/y"
    assert storage.is_temporary(".shard-000000.tar.tmp-0123")
    assert not storage.is_temporary("shard-000000.tar")
