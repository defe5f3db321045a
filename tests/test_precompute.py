"""Latent precompute on Ray Data: exactness, lineage, failures, a killed encoder, kill-and-rerun."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from ldmflow.data import image_shards, latent_shards, shard_stream
from ldmflow.data.precompute import Placement, PrecomputeConfig, placement, precompute
from ldmflow.model import autoencoders, text_encoder
from tests import helpers


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory):
    """A tiny AutoencoderKL (untrained: exactness does not need a good one), saved as a folder."""
    torch.manual_seed(0)
    vae = autoencoders.build("tiny", 16)
    folder = tmp_path_factory.mktemp("ae") / "autoencoder"
    info = autoencoders.save(vae, folder, scale_factor=0.5, resolution=16, config={}, lineage={})
    ref = latent_shards.AutoencoderRef(uri=str(folder), weights_sha256=info.weights_sha256, scale_factor=0.5)
    return folder, ref


@pytest.fixture(scope="module")
def unbroken(ray_local, digits16, tiny_autoencoder, tmp_path_factory):
    """One plain precompute (1 actor, batches of 8): what the killed runs below must equal."""
    folder, ref = tiny_autoencoder
    dest = tmp_path_factory.mktemp("unbroken") / "latents"
    return precompute(digits16, str(dest), folder, ref, PrecomputeConfig(actors=1, batch_size=8), progress=False), dest


def read_latents(dest):
    manifest = latent_shards.read_manifest(dest)
    stream = shard_stream.ShardStream(latent_shards.shard_urls(dest, manifest), shuffle_buffer=0, decode=latent_shards.decode_latent)
    return {s.key: s for s in stream}, stream


def test_latents_equal_inline_encoding(ray_local, digits16, tiny_autoencoder, tmp_path):
    folder, ref = tiny_autoencoder
    outcome = precompute(digits16, str(tmp_path / "lat"), folder, ref, PrecomputeConfig(actors=2, batch_size=16), progress=False)
    manifest = outcome.manifest
    assert (manifest.num_samples, len(manifest.shards), manifest.failed_shards) == (400, 8, ())
    assert manifest.latent_shape == (4, 4, 4) and manifest.autoencoder == ref
    assert manifest.class_names == tuple("0123456789")

    got, stream = read_latents(str(tmp_path / "lat"))
    assert stream.skips.skipped == 0 and len(got) == 400
    vae, _ = autoencoders.load(folder)
    images = list(shard_stream.ShardStream(image_shards.shard_urls(digits16), shuffle_buffer=0))
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(np.stack([s.image for s in images]))).latent_dist
    for i, image in enumerate(images):
        sample = got[image.key]
        assert sample.mean.shape == (4, 4, 4) and sample.logvar.shape == (4, 4, 4)
        np.testing.assert_allclose(sample.mean, posterior.mean[i].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(sample.logvar, posterior.logvar[i].numpy(), rtol=1e-3, atol=2e-3)
        assert (sample.label, sample.caption, sample.meta["source"]) == (image.label, image.caption, image.meta["source"])

    # Each caption's embedding is stored beside its latents, as the text encoder gives it.
    assert manifest.text_encoder == text_encoder.TEXT_ENCODER
    expected = text_encoder.SentenceEncoder()([image.caption for image in images])[:, 0].numpy()
    for i, image in enumerate(images):
        assert image.caption and got[image.key].text.shape == (text_encoder.TEXT_DIM,)
        np.testing.assert_allclose(got[image.key].text, expected[i], atol=1e-6)

    latent_shards.check_lineage(manifest, ref.weights_sha256)
    with pytest.raises(latent_shards.LineageError, match="not by the configured one"):
        latent_shards.check_lineage(manifest, "0" * 64, expected_uri="models:/other/1")

    rerun = precompute(digits16, str(tmp_path / "lat"), folder, ref, PrecomputeConfig(actors=2), progress=False)
    assert (rerun.written, rerun.skipped) == (0, 8)


def test_shards_of_another_resolution_than_the_autoencoders_are_refused(digits16, tmp_path):
    vae = autoencoders.build("tiny", 8)
    folder = tmp_path / "autoencoder-8px"
    info = autoencoders.save(vae, folder, scale_factor=0.5, resolution=8, config={}, lineage={})
    ref = latent_shards.AutoencoderRef(uri=str(folder), weights_sha256=info.weights_sha256, scale_factor=0.5)
    with pytest.raises(latent_shards.LineageError, match="images are 16 px, and the autoencoder .* trained at 8 px"):
        precompute(digits16, str(tmp_path / "lat"), folder, ref, PrecomputeConfig(actors=1), progress=False)
    assert not (tmp_path / "lat").exists()  # refused before anything was written


def test_corrupt_input_shard_is_retried_then_reported(ray_local, digits16, tiny_autoencoder, tmp_path):
    import shutil

    folder, ref = tiny_autoencoder
    copy = tmp_path / "images"
    shutil.copytree(digits16, copy)
    target = copy / "shard-000003.tar"
    target.write_bytes(target.read_bytes()[:5000])  # damaged after the manifest was written
    outcome = precompute(str(copy), str(tmp_path / "lat"), folder, ref, PrecomputeConfig(actors=2, max_attempts=2), progress=False)
    assert outcome.manifest.num_samples == 350 and len(outcome.manifest.shards) == 7
    assert outcome.manifest.failed_shards == ({"source_shard": "shard-000003.tar",
                                               "error": f"ValueError: {target}: corrupt image shard (sha256 differs from its manifest)"},)
    assert "FAILED shard-000003.tar" in outcome.summary()


def test_a_killed_encoder_is_replaced_and_its_shard_encoded_again(ray_local, digits16, tiny_autoencoder, unbroken,
                                                                  tmp_path):
    folder, ref = tiny_autoencoder
    config = PrecomputeConfig(actors=1, batch_size=8)
    killed = []

    def kill_the_first_encoder():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if (pid := helpers.encoder_at_work()) is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_encoder)
    killer.start()
    outcome = precompute(digits16, str(tmp_path / "killed"), folder, ref, config, progress=False)
    killer.join()
    assert killed, "no encoder was seen at work"
    expected, expected_dest = unbroken
    assert outcome.manifest == expected.manifest and not outcome.manifest.failed_shards
    written = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert written == sorted(p.name for p in expected_dest.iterdir())  # no half-written leftovers


def test_placement_keeps_cpus_for_decoding_and_writing():
    # The local default: 4 logical CPUs on 2 cores, one CPU kept for the decode and write tasks.
    assert placement(0, 8, cpus=4, gpus=0, cores=2, gpu=False, local=True) == Placement(2, 1.0, 0.0, 1, 0.5, 1)
    # On a cluster the CPUs Ray advertises are its nodes' (the driver's cores are not a bound).
    assert placement(0, 8, cpus=4, gpus=0, cores=2, gpu=False) == Placement(3, 1.0, 0.0, 1, 0.5, 1)
    # Two 1-CPU nodes, two actors: three quarters of a CPU each, so one sits on each node
    # beside a decode task.
    assert placement(2, 8, cpus=2, gpus=0, cores=2, gpu=False) == Placement(2, 0.75, 0.0, 1, 0.25, 1)
    # Three: the quarter kept is the cluster's, so each actor leaves its node room for a
    # decode task (3 × 0.75 would leave a quarter on each node and the task asks 0.375).
    assert placement(3, 8, cpus=3, gpus=0, cores=2, gpu=False, node_cpus=1) == Placement(3, 0.625, 0.0, 1, 0.375, 1)
    assert placement(0, 8, cpus=4, gpus=0, cores=2, gpu=False, local=True, node_cpus=4).actor_cpus == 1.0
    assert placement(0, 8, cpus=1, gpus=0, cores=1, gpu=False) == Placement(1, 0.75, 0.0, 1, 0.125, 1)
    assert placement(0, 2, cpus=32, gpus=0, cores=32, gpu=False).actors == 2  # at most one per shard
    assert placement(0, 8, cpus=32, gpus=4, cores=32, gpu=True) == Placement(4, 1.0, 1.0, 8, 1.0, 1)


def test_corrupt_latent_shard_and_manifest_are_clear(digits16, tiny_autoencoder, unbroken, tmp_path):
    import shutil

    folder, _ = tiny_autoencoder
    dest = tmp_path / "lat"
    shutil.copytree(unbroken[1], dest)
    victim = dest / "shard-000001.tar"
    import tarfile

    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(latent_shards.KEY_MEAN))
    data = bytearray(victim.read_bytes())
    data[member.offset_data : member.offset_data + 16] = b"\x00" * 16  # break the .npy header
    victim.write_bytes(bytes(data))
    got, stream = read_latents(str(dest))
    assert stream.skips.skipped == 1 and len(got) == 399
    assert any("corrupt array" in e for e in stream.skips.errors)

    (dest / "manifest.json").write_text("{ truncated")
    with pytest.raises(image_shards.ManifestError, match="not JSON"):
        latent_shards.read_manifest(str(dest))
    with pytest.raises(latent_shards.LineageError):
        precompute(digits16, str(dest), folder, latent_shards.AutoencoderRef("x", "1" * 64, 1.0), PrecomputeConfig(), progress=False)


def test_kill_and_rerun_gives_the_unbroken_manifest(ray_local, digits16, tiny_autoencoder, unbroken, tmp_path,
                                                   subprocess_env):
    folder, _ = tiny_autoencoder
    dest = tmp_path / "killed"
    # Join the session's Ray instead of starting one that the kill would orphan.
    env = subprocess_env | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cli = [sys.executable, "-m", "ldmflow.flows.cli", "precompute", digits16, str(dest), "--autoencoder", str(folder),
           "--actors", "1", "--batch-size", "8", "--no-progress"]
    process = subprocess.Popen(cli, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((dest / "_parts").glob("*.json"))) < 2:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (dest / "manifest.json").exists()

    result = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "already complete" in result.stdout
    assert latent_shards.read_manifest(str(dest)) == unbroken[0].manifest


def test_a_rerun_finds_what_is_done_in_one_listing(ray_local, digits16, tiny_autoencoder, bucket):
    """On S3: an unchanged rerun lists the output once and reads only the previous manifest
    (no request per shard); after a run killed before its manifest, the part records are
    read; another identity (here the stored moments) encodes every shard again and leaves
    no record of the old one beside the new."""
    from ldmflow.data import storage

    folder, ref = tiny_autoencoder
    dest = f"{bucket}/latents"
    first = precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1), progress=False)

    def requests_of(run) -> tuple[object, list[str]]:
        sent = []

        def count(event_name: str, **_) -> None:
            sent.append(event_name.rsplit(".", 1)[1])

        events = storage.s3_client().meta.events  # this thread's client: the driver's requests
        events.register("before-send.s3", count)
        try:
            return run(), sent
        finally:
            events.unregister("before-send.s3", count)

    rerun, sent = requests_of(lambda: precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1, batch_size=7),
                                                 progress=False))
    assert (rerun.written, rerun.skipped) == (0, 8) and rerun.manifest.shards == first.manifest.shards, rerun.summary()
    assert sorted(sent) == ["GetObject", "ListObjectsV2", "PutObject"], sent  # the old manifest, the listing, the new

    storage.delete(f"{dest}/manifest.json")  # as a run killed before writing it leaves the folder
    resumed, sent = requests_of(lambda: precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1),
                                                   progress=False))
    assert (resumed.written, resumed.skipped) == (0, 8) and resumed.manifest == first.manifest
    assert sent.count("GetObject") == 8 and "HeadObject" not in sent  # each part record, once

    def records() -> set[str]:
        return {entry.url.rsplit("/", 1)[1] for entry in storage.list_prefix(f"{dest}/_parts")}

    before = records()
    other = precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1, moments="mean"), progress=False)
    assert (other.written, other.skipped) == (8, 0)
    after = records()
    assert len(after) == 8 and len({name.split(".")[0] for name in after}) == 8 and not after & before, after


def test_relative_paths_reach_the_actors(ray_local, digits16, tiny_autoencoder, tmp_path, monkeypatch):
    """Ray actors run in another working directory: relative local paths are made absolute."""
    import os
    import shutil

    folder, ref = tiny_autoencoder
    shutil.copytree(digits16, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    outcome = precompute("images", "latents", folder, ref, PrecomputeConfig(actors=1), progress=False)
    assert outcome.manifest.num_samples == 400 and not outcome.manifest.failed_shards
    assert outcome.manifest.image_dataset == os.path.join(str(tmp_path), "images")


def test_a_batch_takes_stored_embeddings_and_zeros_where_none_is_stored():
    from ldmflow.training.diffusion_loop import caption_embeddings, collate_latents
    from ldmflow.training.stage_configs import DiffusionConfig

    vector = np.linspace(-1, 1, text_encoder.TEXT_DIM, dtype=np.float32)
    samples = [latent_shards.LatentSample(key, np.zeros((4, 2, 2), np.float32), None, -1, caption, {}, text)
               for key, caption, text in (("a", "a caption", vector), ("b", "", None))]
    batch = collate_latents(samples)
    assert batch.text.shape == (2, 1, text_encoder.TEXT_DIM)
    assert torch.equal(batch.text[0, 0], torch.from_numpy(vector)) and not batch.text[1].any()
    assert caption_embeddings(DiffusionConfig(conditioning="text"), True, "cpu")(batch) is batch.text
    assert caption_embeddings(DiffusionConfig(conditioning="class"), True, "cpu") is None



def test_bf16_encoding_stays_close_to_fp32(digits16, tiny_autoencoder):
    from ldmflow.data.encode_stages import LatentEncoder
    from ldmflow.model import precision

    folder, _ = tiny_autoencoder
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    images = np.stack([s.image for s in shard_stream.ShardStream(image_shards.shard_urls(digits16)[:1], shuffle_buffer=0)])
    full = LatentEncoder(files, 16, "mean_logvar", mixed_precision="no").encode(images)
    half = LatentEncoder(files, 16, "mean_logvar", mixed_precision="bf16").encode(images)
    for exact, rounded in zip(full, half):
        assert rounded.dtype == np.float32 and not np.array_equal(exact, rounded)  # bf16 ran, fp32 comes out
        np.testing.assert_allclose(rounded, exact, atol=0.05 * np.abs(exact).max())
    # `auto` is bf16 on a GPU only.
    assert precision.enabled("auto", "cuda") and not precision.enabled("auto", "cpu")
    assert precision.enabled("bf16", "cpu") and not precision.enabled("no", "cuda")


def test_an_image_added_to_the_source_is_one_shard_to_encode(ray_local, tiny_autoencoder, tmp_path):
    """The source grows by one image: the shard rerun rewrites one image shard and precompute,
    into the same folder, encodes that one; a range emptied drops its shard, and its latents."""
    from ldmflow.data import builtin
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow

    digits = builtin.load("builtin:digits")
    raw, images, latents = tmp_path / "raw", str(tmp_path / "images"), tmp_path / "latents"
    raw.mkdir()
    for i in range(40):
        (raw / f"{i:03d}.png").write_bytes(digits.png(i))
    config = ShardConfig(resolution=16, shard_size=10)
    folder, ref = tiny_autoencoder

    def both():
        sharded = shard_flow.run(str(raw), images, config, progress=False)
        encoded = precompute(images, str(latents), folder, ref, PrecomputeConfig(actors=1), progress=False)
        return sharded.shards_written, encoded.written, encoded.skipped

    assert both() == (4, 4, 0)
    (raw / "040.png").write_bytes(digits.png(40))
    assert both() == (1, 1, 3)
    got, _ = read_latents(str(latents))
    assert len(got) == 41 and set(got) == {s.key for s in shard_stream.ShardStream(image_shards.shard_urls(images),
                                                                                  shuffle_buffer=0)}
    for i in range(10):
        (raw / f"{i:03d}.png").unlink()
    assert both() == (0, 0, 3)
    assert sorted(p.name for p in latents.glob("shard-*.tar")) == ["shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    assert not list((latents / "_parts").glob("shard-000000.*"))


def test_the_encoders_precision_is_part_of_the_dataset(ray_local, digits16, tiny_autoencoder, tmp_path):
    """fp32 latents, then the same config asking bf16 (what `auto` resolves to on a GPU): every
    shard is encoded again, into other latents; `auto` on this CPU cluster is fp32's dataset."""
    from ldmflow.data.precompute import encoding_precision

    folder, ref = tiny_autoencoder
    dest = str(tmp_path / "lat")
    fp32 = precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1, mixed_precision="no"), progress=False)
    before, _ = read_latents(dest)
    bf16 = precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1, mixed_precision="bf16"), progress=False)
    after, _ = read_latents(dest)
    assert (fp32.written, bf16.written, bf16.skipped) == (8, 8, 0)
    assert any(not np.array_equal(before[key].mean, after[key].mean) for key in before)
    assert encoding_precision(PrecomputeConfig(mixed_precision="auto")) == "fp32"
    back = precompute(digits16, dest, folder, ref, PrecomputeConfig(actors=1), progress=False)
    assert back.written == 8  # fp32 again: the bf16 records do not vouch for it
