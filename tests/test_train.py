"""Diffusion training on Ray Train: DDP equivalence and exact resume after a killed worker (DDP
and FSDP) on real workers; the lineage guard, non-finite losses and an unreadable latent set
in Ray Train's local mode (the loop's logic, not its distribution)."""

import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmflow.data import image_shards, latent_shards, shard_stream
from ldmflow.data.precompute import PrecomputeConfig, precompute
from ldmflow.model import autoencoders, schedules, unets
from ldmflow.registry import tracking
from ldmflow.training.diffusion_loop import NonFiniteLoss, denoising_loss
from ldmflow.training.loop import EmptyEpoch
from ldmflow.training.stage_configs import DiffusionConfig
from ldmflow.training.train import train
from tests.helpers import training_config, with_ray_train

TINY = dict(steps=200, batch_size=16, lr=1e-3, warmup_steps=10, checkpoint_every=20, log_every=1, sample_steps=5,
            shuffle_buffer=50)


def save_tiny_autoencoder(folder: Path, seed: int) -> latent_shards.AutoencoderRef:
    torch.manual_seed(seed)
    vae = autoencoders.build("tiny", 16)
    info = autoencoders.save(vae, folder, scale_factor=0.8, resolution=16, config={}, lineage={})
    return latent_shards.AutoencoderRef(uri=str(folder), weights_sha256=info.weights_sha256, scale_factor=0.8)


@pytest.fixture(scope="module")
def digits_folder(digits16, tmp_path_factory) -> str:
    """The 16-px digits as a user's folder in the WebDataset convention, sharded like any
    folder: NAME.png with its integer label in NAME.cls and its caption in NAME.txt."""
    import tarfile

    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow

    raw = tmp_path_factory.mktemp("digits-folder")
    for url in image_shards.shard_urls(digits16):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.rsplit(".", 1)[1] in ("png", "cls", "txt"):
                    (raw / member.name).write_bytes(tar.extractfile(member).read())
    dest = str(tmp_path_factory.mktemp("digits-folder-shards"))
    manifest = shard_flow.run(str(raw), dest, ShardConfig(resolution=16, shard_size=50), progress=False).manifest
    assert manifest.class_names == tuple("0123456789")  # named by their numbers
    return dest


@pytest.fixture(scope="module")
def latent_set(ray_local, digits_folder, tmp_path_factory):
    """Latents of the digits folder: the class-conditioned trainings below train on `.cls` labels."""
    root = tmp_path_factory.mktemp("latent-set")
    ref = save_tiny_autoencoder(root / "autoencoder", seed=0)
    dest = str(root / "latents")
    precompute(digits_folder, dest, root / "autoencoder", ref, PrecomputeConfig(actors=2), progress=False)
    return dest, root


# ---------------------------------------------------------------------------------------
# One DDP step on 2 workers with batch B == one step in one process with batch 2B


def _one_step_worker(loop_config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a 1-CPU Ray worker: the same order of summation everywhere
    try:
        _one_step(loop_config)
    finally:
        torch.set_num_threads(threads)


def _one_step(loop_config):
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    config = training_config(DiffusionConfig, **loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    model = unets.build("tiny", "class", (4, 4, 4), 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ddp = ray.train.torch.prepare_model(model)
    scheduler = schedules.training_scheduler(config.noise)
    generator = torch.Generator().manual_seed(7)  # the same global batch on every worker
    total = loop_config["global_batch"]
    x0 = torch.randn(total, 4, 4, 4, generator=generator)
    noise = torch.randn(total, 4, 4, 4, generator=generator)
    timesteps = torch.randint(0, 1000, (total,), generator=generator)
    labels = torch.randint(0, 11, (total,), generator=generator)
    part = slice(rank * total // world, (rank + 1) * total // world)
    loss = denoising_loss(ddp, scheduler, x0[part], noise[part], timesteps[part], {"class_labels": labels[part]}, config, False)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), config.grad_clip)
    optimizer.step()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, loop_config["out"])
    ray.train.report({"loss": loss.item()})


def test_ddp_step_equals_single_worker_double_batch(ray_local, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = {"loss_weighting": "min_snr", "grad_clip": 0.5}
    weights = {}
    for workers in (0, 2):  # 0: Ray Train's local mode, the reference in this process
        out = str(tmp_path / f"weights-{workers}.safetensors")
        TorchTrainer(
            _one_step_worker,
            train_loop_config={"config": config, "global_batch": 8, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=workers),
            run_config=ray.train.RunConfig(name=f"ddp-{workers}", storage_path=str(tmp_path / "ray")),
        ).fit()
        weights[workers] = load_file(out)
    torch.manual_seed(0)
    initial = unets.build("tiny", "class", (4, 4, 4), 10).state_dict()
    moved = sum(not torch.equal(initial[k], weights[0][k]) for k in initial)
    assert moved > len(initial) // 2
    for key in weights[0]:
        torch.testing.assert_close(weights[2][key], weights[0][key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# A worker killed mid-run: replaced, resumed from the checkpoint, same losses as unbroken


def loss_by_step(run_id: str) -> dict[int, float]:
    history = tracking.client().get_metric_history(run_id, "loss")
    by_step = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        by_step[metric.step] = metric.value  # a replayed step keeps its last value
    return by_step


def kill_one_worker_after_first_checkpoint(storage_root: Path, done: threading.Event, killed: list) -> None:
    import os
    import signal

    from ray.util.state import list_actors

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not done.is_set():
        # Ray Train resumes from the checkpoints its controller has recorded (it writes this
        # snapshot once it has); a kill between a checkpoint's files and that record restarts at 0.
        if list(storage_root.glob("*/checkpoint_manager_snapshot.json")):
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                os.kill(workers[-1]["pid"], signal.SIGKILL)
                killed.append(workers[-1]["pid"])
                return
        time.sleep(0.05)


KILL_RUN = {**TINY, "steps": 60}


def train_killing_a_worker(dest: str, config: DiffusionConfig, storage_root: Path):
    """``train`` with one worker SIGKILLed once Ray Train has recorded a checkpoint."""
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, args=(storage_root, done, killed))
    killer.start()
    try:
        recovered = train(dest, config, storage_path=str(storage_root), progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "the run finished before a worker could be killed"
    return recovered


def assert_resumed_exactly(recovered, unbroken, rel: float = 1e-5, abs: float = 1e-7) -> None:
    """Every step's loss as the unbroken run's, the group restored from a recorded checkpoint,
    and the model it registered the unbroken run's."""
    expected, got = loss_by_step(unbroken.run_id), loss_by_step(recovered.run_id)
    steps = KILL_RUN["steps"]
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=rel, abs=abs), step
    # Steps past the checkpoint may or may not have been logged before the kill, so the count
    # of replayed losses proves nothing either way.
    resumed = tracking.client().get_metric_history(recovered.run_id, "resumed_from_step")
    assert resumed and all(0 < m.value < steps and m.value % TINY["checkpoint_every"] == 0 for m in resumed)
    from safetensors.torch import load_file

    weights = "unet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(recovered.folder / weights)), load_file(str(unbroken.folder / weights))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=100 * rel, atol=100 * abs)
    assert recovered.metrics["class_accuracy"] == pytest.approx(unbroken.metrics["class_accuracy"], abs=0.05)


@pytest.fixture(scope="module")
def unbroken_ddp(latent_set, tmp_path_factory):
    dest, _ = latent_set
    return train(dest, training_config(DiffusionConfig, **KILL_RUN, experiment="unbroken"),
                 storage_path=str(tmp_path_factory.mktemp("unbroken-ddp")), progress=False)


def test_killed_worker_is_replaced_and_resumes_exactly(latent_set, unbroken_ddp, tmp_path):
    dest, _ = latent_set
    recovered = train_killing_a_worker(dest, training_config(DiffusionConfig, **KILL_RUN, experiment="killed"), tmp_path / "b")
    assert_resumed_exactly(recovered, unbroken_ddp)


def test_fsdp_trains_as_ddp_and_resumes_exactly_from_sharded_checkpoints(latent_set, unbroken_ddp, tmp_path):
    """FSDP with a worker killed: every rank wrote its own part of each checkpoint, the group
    resumed from them, and every step's loss is the unbroken DDP run's (the same sums,
    reduced in another order: a resume that lost the data position, an RNG state or the
    optimizer's state would be off by far more)."""
    dest, _ = latent_set
    recovered = train_killing_a_worker(dest, training_config(DiffusionConfig, **KILL_RUN, parallel="fsdp", experiment="fsdp-killed"),
                                       tmp_path / "b")
    assert_resumed_exactly(recovered, unbroken_ddp, rel=1e-3, abs=1e-5)
    saved = [folder for folder in (tmp_path / "b").glob("*/checkpoint_*") if folder.is_dir()]
    assert len(saved) == 2  # the newest two are kept
    for checkpoint in saved:  # each rank wrote its own part
        assert len(list((checkpoint / "sharded").glob("*.safetensors"))) == 2
        assert not (checkpoint / "unet.safetensors").exists()


def test_a_run_checkpointed_on_two_ranks_resumes_on_one_at_its_step(latent_set, tmp_path):
    """Elastic: a 2-worker run stopped after a checkpoint (a worker killed, no failure
    allowed) is the same job on 1 worker: found by its name, resumed at its step, the
    interrupted epoch's unread latents dealt to the one rank (each read once: test_loader)."""
    dest, _ = latent_set
    config = training_config(DiffusionConfig, **KILL_RUN, max_failures=0, experiment="elastic")
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        train_killing_a_worker(dest, config, tmp_path / "b")
    resumed = train(dest, with_ray_train(config, workers=1), storage_path=str(tmp_path / "b"), progress=False)
    client = tracking.client()
    runs = client.search_runs([client.get_run(resumed.run_id).info.experiment_id])
    assert {run.info.run_name for run in runs} == {client.get_run(resumed.run_id).info.run_name}  # one job
    restarts = [m.value for m in client.get_metric_history(resumed.run_id, "resumed_from_step")]
    assert len(restarts) == 1 and restarts[0] % TINY["checkpoint_every"] == 0 and 0 < restarts[0] < KILL_RUN["steps"]
    assert sorted(loss_by_step(resumed.run_id)) == list(range(int(restarts[0]) + 1, KILL_RUN["steps"] + 1))
    assert (resumed.folder / "unet/diffusion_pytorch_model.safetensors").exists()


def test_lineage_guard_refuses_another_autoencoder(latent_set, tmp_path):
    dest, _ = latent_set
    save_tiny_autoencoder(tmp_path / "other", seed=1)
    with pytest.raises(latent_shards.LineageError, match="not by the configured one"):
        train(dest, training_config(DiffusionConfig, **TINY, autoencoder=str(tmp_path / "other")), progress=False)


def poisoned_copy(dest: str, target: Path, names: list[str]) -> Path:
    """A copy of a latent set whose named shards hold NaN latents."""
    shutil.copytree(dest, target)
    for name in names:
        samples = list(shard_stream.iter_raw_samples([str(target / name)], shard_stream.SkipCounter()))
        for raw in samples:
            raw[latent_shards.KEY_MEAN] = latent_shards.encode_array(np.full_like(latent_shards.decode_array(raw[latent_shards.KEY_MEAN]), np.nan))
            raw.pop("__url__", None)
        image_shards.write_shard(str(target / name), samples)
    return target


def local_checkpoints() -> set[Path]:
    """The checkpoint folders a loop in this process has written and not removed."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("ldmflow-checkpoint-*"))


def test_non_finite_losses_are_skipped_and_counted(latent_set, tmp_path):
    dest, _ = latent_set
    poisoned = poisoned_copy(dest, tmp_path / "poisoned", ["shard-000000.tar"])
    config = training_config(DiffusionConfig, **{**TINY, "steps": 20}, workers=0, grad_accum=2, max_bad_steps=50, sample_every=10,
                             experiment="nan")
    before = local_checkpoints()
    trained = train(str(poisoned), config, storage_path=str(tmp_path / "ray"), progress=False)
    assert local_checkpoints() <= before  # local mode: each checkpoint folder removed once superseded or read
    skipped = tracking.client().get_metric_history(trained.run_id, "skipped_nonfinite_steps")
    assert skipped and max(m.value for m in skipped) >= 1
    grids = [a.path for a in tracking.client().list_artifacts(trained.run_id, "samples")]
    assert grids == ["samples/step-0000010.png", "samples/step-0000020.png"]
    from safetensors.torch import load_file

    state = load_file(str(trained.folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_many_non_finite_losses_stop_instead_of_corrupting(latent_set, tmp_path):
    """Every latent NaN: after max_bad_steps the loop fails and the run fails clearly, marked
    FAILED, instead of training on. (On workers a restart would restore the last checkpoint:
    test_killed_worker_is_replaced_and_resumes_exactly.)"""
    dest, _ = latent_set
    poisoned = poisoned_copy(dest, tmp_path / "all-nan", [f"shard-{i:06d}.tar" for i in range(8)])
    config = training_config(DiffusionConfig, **{**TINY, "steps": 10}, workers=0, max_bad_steps=2, experiment="all-nan")
    before = local_checkpoints()
    with pytest.raises(NonFiniteLoss, match="2 consecutive non-finite losses at step 0"):
        train(str(poisoned), config, progress=False)
    assert local_checkpoints() <= before
    runs = tracking.client().search_runs([tracking.experiment_id("all-nan")])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_unreadable_latent_set_fails_instead_of_spinning(latent_set, tmp_path):
    dest, _ = latent_set
    broken = tmp_path / "gone"
    shutil.copytree(dest, broken)
    for shard in broken.glob("shard-*.tar"):
        shard.unlink()
    config = training_config(DiffusionConfig, **{**TINY, "steps": 5}, workers=0, experiment="gone")
    with pytest.raises(EmptyEpoch, match="read no batch in epoch 0"):
        train(str(broken), config, progress=False)
