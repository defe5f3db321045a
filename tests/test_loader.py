"""Reading shards: rank/worker splits, shuffling, corrupt samples skipped and counted."""

import itertools
import random

import numpy as np
import pytest
import torch

from ldmflow.data import image_shards, shard_order, shard_stream, storage


def make_shards(root: str, num_shards: int, per_shard: int) -> list[str]:
    from PIL import Image

    from tests import helpers

    urls = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            index = s * per_shard + i
            image = helpers.encode(Image.fromarray(np.full((4, 4, 3), index % 256, dtype=np.uint8)))
            samples.append(image_shards.Sample(image_shards.sample_key(0, index), image, "png", {"source": f"{index}.png"}, f"c{index}", index % 3))
        urls.append(image_shards.write_shard(storage.join(root, image_shards.shard_name(s)), samples).url)
    return urls


@pytest.mark.parametrize("num_shards", [1, 3, 5, 8, 13, 16])
def test_assign_shards_covers_every_sample_once_with_balanced_ranks(num_shards):
    """2 ranks × 3 loader workers: each sample of each epoch read by exactly one reader, and
    the ranks' shard counts differ by at most one."""
    world, workers, per_shard = 2, 3, 5
    for epoch in range(3):
        read, shards_of_rank = [], []
        for rank in range(world):
            shards = set()
            for worker in range(workers):
                indices, split = shard_order.assign_shards(
                    num_shards, rank=rank, world_size=world, worker=worker, num_workers=workers, epoch=epoch, seed=7
                )
                stream = [shard * per_shard + i for shard in indices for i in range(per_shard)]
                if split is not None:
                    stream = [sample for position, sample in enumerate(stream) if position % split[1] == split[0]]
                read += stream
                shards |= set(indices)
            shards_of_rank.append(len(shards))
        assert sorted(read) == list(range(num_shards * per_shard))
        assert max(shards_of_rank) - min(shards_of_rank) <= 1, shards_of_rank


def test_assign_shards_balances_ranks_at_scale():
    """1,000 shards over 64 ranks × 8 loader workers: 15 or 16 shards a rank (round-robin over
    all 512 readers would give some ranks 16 and others 8)."""
    counts = [sum(len(shard_order.assign_shards(1000, rank=rank, world_size=64, worker=worker, num_workers=8)[0])
                  for worker in range(8)) for rank in range(64)]
    assert sum(counts) == 1000 and set(counts) == {15, 16}


def test_assign_shards_reshuffles_each_epoch():
    orders = {tuple(shard_order.assign_shards(20, epoch=epoch, seed=1)[0]) for epoch in range(5)}
    assert len(orders) == 5
    assert shard_order.assign_shards(20, epoch=3, seed=1) == shard_order.assign_shards(20, epoch=3, seed=1)


def test_shuffle_buffer_is_a_permutation():
    items = list(range(100))
    out = list(shard_order.shuffled(items, 10, random.Random(0)))
    assert sorted(out) == items and out != items
    assert list(shard_order.shuffled(items, 0, random.Random(0))) == items


def test_ranks_and_workers_read_every_sample_once(tmp_path):
    urls = make_shards(str(tmp_path), num_shards=6, per_shard=5)
    keys = []
    for rank in range(2):
        stream = shard_stream.ShardStream(urls, rank=rank, world_size=2, shuffle_buffer=4, seed=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=shard_stream.collate)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 4, 4) and batch["image"].dtype == torch.float32
            keys.extend(batch["key"])
    assert sorted(keys) == [image_shards.sample_key(0, i) for i in range(30)]


def test_fewer_shards_than_readers_falls_back_to_samples(tmp_path):
    urls = make_shards(str(tmp_path), num_shards=1, per_shard=10)
    keys = []
    for rank in range(3):
        keys.extend(s.key for s in shard_stream.ShardStream(urls, rank=rank, world_size=3, shuffle_buffer=0))
    assert sorted(keys) == [image_shards.sample_key(0, i) for i in range(10)]


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    urls = make_shards(str(tmp_path), num_shards=2, per_shard=4)
    bad = image_shards.Sample("900000000", b"\x89PNG not really", "png", {"source": "bad.png"})
    urls.append(image_shards.write_shard(str(tmp_path / "shard-000002.tar"), [bad]).url)
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[:2000])  # cut the second shard inside its first sample's image

    stream = shard_stream.ShardStream(urls, shuffle_buffer=0)
    keys = [s.key for s in stream]
    assert keys == [image_shards.sample_key(0, i) for i in range(4)]
    assert stream.skips.skipped >= 2
    assert any("undecodable image" in e for e in stream.skips.errors)


def test_make_loader_reads_a_dataset_by_manifest(tmp_path):
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow

    shard_flow.run("builtin:digits", str(tmp_path / "d"), ShardConfig(resolution=8, shard_size=50, limit=120), progress=False)
    loader = shard_stream.make_loader(str(tmp_path / "d"), batch_size=32, shuffle_buffer=64, seed=0)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 120
    images = torch.cat([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1 and images.shape[1:] == (3, 8, 8)
    assert set(torch.cat([b["label"] for b in batches]).tolist()) == set(range(10))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(image_shards.ManifestError, match="no manifest"):
        image_shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(image_shards.ManifestError, match="format is 'something-else'"):
        image_shards.read_manifest(str(tmp_path))


# ---- the training loop's batches: loader workers, exact resumption, data wait ----------


def keys_of(batch) -> list[str]:
    return list(batch["key"])


def read_batches(urls, workers: int, start=None, count=None, decode=image_shards.decode_sample, counts=None):
    """(position, keys) of the batches the training loop would get, ``count`` of them."""
    from ldmflow.training import loop

    stream = shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5, decode=decode, counts=counts)
    batched, loader = loop.loader(stream, 4, shard_stream.collate, workers=workers, prefetch=2)
    got, wait = [], loop.DataWait()
    for position, batch in loop.batches(batched, loader, 0, start, wait):
        got.append((position, keys_of(batch)))
        if len(got) == count:
            break
    assert 0 <= wait.fraction() <= 1
    return got


@pytest.mark.parametrize("workers, counted", [(0, False), (2, False), (0, True), (2, True)])
def test_a_resumed_loader_continues_exactly_where_it_stopped(tmp_path, workers, counted):
    """With the shards' sample counts, through the replayed shuffle buffer; without, by
    passing over what was read."""
    urls = make_shards(str(tmp_path), 6, 10)
    with open(urls[2], "r+b") as shard:  # a corrupt member: skipped, and still counted in the position
        data = bytearray(shard.read())
        data[data.index(b"\x89PNG") + 40] ^= 0xFF
        shard.seek(0)
        shard.write(bytes(data))
    unbroken = read_batches(urls, workers, count=40)  # two and a half epochs (14 batches each)
    for stop in (3, 13, 16):
        position = unbroken[stop - 1][0]
        resumed = read_batches(urls, workers, start=position, count=40 - stop, counts=[10] * 6 if counted else None)
        assert [keys for _, keys in resumed] == [keys for _, keys in unbroken[stop:]], stop


def test_a_resume_with_other_ranks_or_readers_and_no_counts_starts_the_next_epoch(tmp_path):
    from ldmflow.training import loop

    urls = make_shards(str(tmp_path), 6, 10)
    saved = [read_batches(urls, 2, count=17)[-1][0]]  # in epoch 1, two readers
    assert saved[0]["epoch"] == 1
    stream = shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5)
    assert loop.rank_start(stream, saved, 2) == saved[0]
    fresh = {"epoch": 2, "readers": [0], "first": 0}
    assert loop.rank_start(stream, saved, 1) == fresh  # another number of readers, no sample counts
    assert loop.rank_start(shard_stream.ShardStream(urls, rank=1, world_size=2), saved, 1) == fresh
    unbroken = read_batches(urls, 0, count=40)
    first_of_epoch_2 = next(keys for position, keys in unbroken if position["epoch"] == 2)
    assert read_batches(urls, 0, start=fresh, count=1)[0][1] == first_of_epoch_2


def uneven_shards(root: str, num_shards: int = 13) -> tuple[list[str], list[int]]:
    """Shards of 3 to 9 samples, numbered across them: their URLs and sample counts."""
    from PIL import Image

    from tests import helpers

    urls, counts, index = [], [], 0
    image = helpers.encode(Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)))
    for s in range(num_shards):
        count = 3 + (s * 5) % 7
        samples = [image_shards.Sample(image_shards.sample_key(0, index + i), image, "png", {}) for i in range(count)]
        urls.append(image_shards.write_shard(storage.join(root, image_shards.shard_name(s)), samples).url)
        counts.append(count)
        index += count
    return urls, counts


def interrupted(urls, counts, world: int, readers: int, reads: int, **stream_args) -> tuple[list[dict], list[str]]:
    """Every rank's saved position after each of its readers took ``reads - reader`` samples
    of epoch 0 (or all it had), and the keys they took."""
    saved, seen = [], []
    for rank in range(world):
        stream = shard_stream.ShardStream(urls, rank=rank, world_size=world, counts=counts, **stream_args)
        positions = []
        for reader in range(readers):
            position = 0
            for position, sample in itertools.islice(stream.read(reader, readers), max(reads - reader, 0)):
                seen.append(sample.key)
            positions.append(position)
        saved.append({"epoch": 0, "readers": positions, "first": 0})
    return saved, seen


def resumed_keys(urls, counts, saved, world: int, readers: int, **stream_args) -> list[str]:
    """The keys every rank of ``world`` × ``readers`` reads of the epoch ``saved`` was in."""
    from ldmflow.training import loop

    keys = []
    for rank in range(world):
        stream = shard_stream.ShardStream(urls, rank=rank, world_size=world, counts=counts, **stream_args)
        start = loop.rank_start(stream, saved, readers)
        assert start["epoch"] == 0 and start["readers"] == [0] * readers
        stream.rest = (0, start["units"])
        for reader in range(readers):
            keys.extend(sample.key for _, sample in stream.read(reader, readers))
    return keys


@pytest.mark.parametrize("before, after", [((2, 3), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (3, 1)), ((1, 2), (4, 3))])
@pytest.mark.parametrize("reads", [0, 4, 11, 100])
def test_a_resume_on_other_ranks_reads_each_unseen_sample_of_the_epoch_once(tmp_path, before, after, reads):
    urls, counts = uneven_shards(str(tmp_path))
    args = dict(shuffle_buffer=6, seed=2)
    saved, seen = interrupted(urls, counts, *before, reads, **args)
    rest = resumed_keys(urls, counts, saved, *after, **args)
    assert len(rest) == len(set(rest)) and not set(rest) & set(seen)
    assert sorted(seen + rest) == [image_shards.sample_key(0, i) for i in range(sum(counts))]


def test_a_remainder_resumed_again_on_other_ranks_still_reads_each_sample_once(tmp_path):
    """2 ranks → 3 (interrupted again in the remainder, its position with its units) → 1."""
    from ldmflow.training import loop

    urls, counts = uneven_shards(str(tmp_path))
    args = dict(shuffle_buffer=6, seed=2)
    saved, seen = interrupted(urls, counts, 2, 2, 9, **args)
    again = []
    for rank in range(3):
        stream = shard_stream.ShardStream(urls, rank=rank, world_size=3, counts=counts, **args)
        start = loop.rank_start(stream, saved, 1)
        stream.rest = (0, start["units"])
        position = 0
        for position, sample in itertools.islice(stream.read(0, 1), 5):
            seen.append(sample.key)
        again.append({**start, "readers": [position]})
    rest = resumed_keys(urls, counts, again, 1, 1, **args)
    assert len(rest) == len(set(rest)) and not set(rest) & set(seen)
    assert sorted(seen + rest) == [image_shards.sample_key(0, i) for i in range(sum(counts))]


def test_the_training_loop_resumes_two_ranks_on_one_through_its_loader_workers(tmp_path):
    """Through loop.batches, with two loader workers that must get the remainder's units:
    every sample of the interrupted epoch read once, its positions carrying the units, and
    a resume from one of those positions going on exactly."""
    from ldmflow.training import loop

    urls, counts = uneven_shards(str(tmp_path))
    seen, saved = [], []
    for rank in range(2):
        stream = shard_stream.ShardStream(urls, rank=rank, world_size=2, shuffle_buffer=6, seed=5, counts=counts)
        batched, loader = loop.loader(stream, 4, shard_stream.collate, workers=0, prefetch=2)
        got = list(itertools.islice(loop.batches(batched, loader, rank, None), 2 + rank))
        seen.extend(key for _, batch in got for key in keys_of(batch))
        saved.append(got[-1][0])

    def epoch_zero(start, count=None):
        stream = shard_stream.ShardStream(urls, shuffle_buffer=6, seed=5, counts=counts)
        batched, loader = loop.loader(stream, 2, shard_stream.collate, workers=2, prefetch=2)
        got = []
        for position, batch in loop.batches(batched, loader, 0, start):
            if position["epoch"] > 0 or len(got) == count:
                return got
            got.append((position, keys_of(batch)))

    start = loop.rank_start(shard_stream.ShardStream(urls, shuffle_buffer=6, seed=5, counts=counts), saved, 2)
    rest = epoch_zero(start)
    keys = [key for _, batch in rest for key in batch]
    assert all("units" in position for position, _ in rest)
    assert len(keys) == len(set(keys)) and not set(keys) & set(seen)
    dropped = sum(counts) - len(seen) - len(keys)  # each reader's last partial batch (drop_last)
    assert 0 <= dropped <= 2
    again = epoch_zero(rest[2][0])
    assert [batch for _, batch in again] == [batch for _, batch in rest[3:]]


def counting_decoder():
    """A list of the keys decoded, and the decoder that fills it."""
    decoded = []

    def counting(sample):
        decoded.append(sample["__key__"])
        return image_shards.decode_sample(sample)

    return decoded, counting


def test_passed_over_samples_are_not_decoded(tmp_path):
    urls = make_shards(str(tmp_path), 2, 10)
    decoded, counting = counting_decoder()

    stream = shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5, decode=counting)
    everything = [sample.key for _, sample in stream.read(0, 1)]
    decoded.clear()
    rest = [sample.key for _, sample in stream.read(0, 1, skip=15)]
    assert rest == everything[15:] and decoded == everything[15:]


def test_a_reader_fills_the_next_epochs_buffer_before_it_is_asked(tmp_path):
    urls = make_shards(str(tmp_path), 4, 10)
    decoded, counting = counting_decoder()

    def epoch_batches(batched, epoch):
        batched.set_epoch(epoch)
        return [keys_of(batch.data) for batch in batched if batch.data is not None]

    batched = shard_stream.BatchStream(shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5, decode=counting), 4,
                                       shard_stream.collate)
    epoch_batches(batched, 0)
    fresh = shard_stream.BatchStream(shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5), 4, shard_stream.collate)
    expected = epoch_batches(fresh, 1)
    assert decoded[-1] == expected[0][0]  # epoch 1 had begun when epoch 0 ended
    assert epoch_batches(batched, 1) == expected
    assert epoch_batches(batched, 3) == epoch_batches(fresh, 3)  # not the epoch begun ahead: read as asked


def test_replaying_the_shuffle_buffer_leaves_the_shards_already_consumed_unopened(tmp_path):
    urls = make_shards(str(tmp_path), 8, 10)
    stream = shard_stream.ShardStream(urls, shuffle_buffer=8, seed=5, counts=[10] * 8)
    everything = [sample.key for _, sample in stream.read(0, 1)]
    order, _ = shard_order.assign_shards(8, seed=5)
    for index in order[:4]:  # the first half of this epoch's shards can no longer be read
        with open(urls[index], "wb") as shard:
            shard.write(b"not a tar")
    rest = [(position, sample.key) for position, sample in stream.read(0, 1, skip=60)]
    assert rest == list(enumerate(everything[60:], start=61))
    assert stream.skips.skipped == 0  # nothing unreadable was opened


def test_replay_shuffle_stands_where_the_pass_stood():
    """At every position of a pass, the buffer's last one included (where it drains)."""
    for total, size in ((100, 8), (50, 10), (7, 10), (30, 1)):
        everything = list(shard_order.shuffled(range(total), size, random.Random(3)))
        for skip in range(total + 1):
            rng = random.Random(3)
            kept, taken, draining = shard_order.replay_shuffle(total, size, rng, skip)
            continued = kept if draining else list(shard_order.shuffled(range(taken, total), size, rng, kept))
            assert continued == everything[skip:], (total, size, skip)


@pytest.mark.parametrize("held_out", [0.0, 0.2])
def test_a_resume_anywhere_in_the_epoch_opens_only_the_shards_its_buffer_needs(tmp_path, monkeypatch, held_out):
    """200 shards, one reader: at 10%, 50%, 90% and 99.9% of its epoch (with or without the
    autoencoder's held-out filter) the resumed pass opens at most 10 shards before its first
    sample, and goes on exactly as the unbroken pass."""
    urls = make_shards(str(tmp_path), 200, 5)
    keep = (lambda key: not shard_stream.is_held_out(key, held_out)) if held_out else None
    stream = shard_stream.ShardStream(urls, shuffle_buffer=16, seed=1, counts=[5] * 200, keep=keep)
    everything = [(position, sample.key) for position, sample in stream.read(0, 1)]
    opened = []
    real_open = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda url: opened.append(url) or real_open(url))
    for fraction in (0.1, 0.5, 0.9, 0.999):
        skip = int(1000 * fraction)
        opened.clear()
        rest = stream.read(0, 1, skip=skip)
        first = next(rest, None)
        assert len(opened) <= 10, (fraction, len(opened))
        got = [(position, sample.key) for position, sample in ([first] if first else []) + list(rest)]
        assert got == [(position, key) for position, key in everything if position > skip], fraction


def test_empty_epoch_names_what_the_readers_skipped(tmp_path):
    from ldmflow.training import loop

    urls = make_shards(str(tmp_path), 2, 3)
    for url in urls:
        with open(url, "r+b") as shard:
            shard.truncate(100)
    with pytest.raises(loop.EmptyEpoch, match=r"read no batch in epoch 0: [1-9]\d* samples or shards skipped \(\w+"):
        read_batches(urls, workers=2, count=1)
