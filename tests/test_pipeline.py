"""The end-to-end pipeline as a user runs it (the CLI, in a subprocess), with every output
on the local S3 server: killed during training, rerun to completion from the checkpoint,
rerun with only execution fields changed, which skips every stage, then with one identity
field of the evaluation changed, which reruns exactly the stages from there on."""

import json
import os
import signal
import subprocess
import sys
import time

from ldmflow import console
from ldmflow.data import storage

CLI = [sys.executable, "-m", "ldmflow.flows.cli"]

CONFIG = """\
shard: {{resolution: 16, shard_size: 100, limit: 300}}
autoencoder: {{steps: 30, batch_size: 32, ray_train: {{workers: 0, checkpoint_every: 30, log_every: 10}}, scale_samples: 64,
              model_name: pipe-autoencoder, experiment: pipe}}
precompute: {{actors: 1}}
train: {{steps: 60, batch_size: 32, sample_steps: 5, label_reader_steps: 100, experiment: pipe, model_name: pipe-model,
        ray_train: {{workers: 1, checkpoint_every: 20, log_every: 10, shuffle_buffer: 50,
                    checkpoint_storage: "{bucket}/checkpoints"}}}}
evaluate: {{num_samples: 30, reference_samples: 100, steps: 5, kid_subset_size: 20, kid_subsets: 5}}
pipeline: {{name: pipe, storage: "{bucket}/datasets"}}
"""

STAGES = ["shard", "autoencoder", "precompute", "train", "evaluate", "promote"]


def checkpoint_registered(prefix: str) -> bool:
    """Whether Ray Train has recorded a finished checkpoint under ``prefix``: its checkpoint
    manager writes this snapshot after the checkpoint's upload completes, and a restarted run
    resumes from what the snapshot lists (files of a checkpoint still uploading are not enough)."""
    try:
        return any(entry.url.endswith("/checkpoint_manager_snapshot.json") for entry in storage.list_prefix(prefix))
    except storage.NotFound:
        return False


def stage_lines(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines() if line.startswith("  ") and line.split()
            and line.split()[0] in STAGES}


def test_pipeline_on_s3_resumes_training_after_a_kill_then_skips_every_stage(bucket, subprocess_env, tmp_path):
    from mlflow.tracking import MlflowClient

    state = tmp_path / "state"
    env = {**subprocess_env, "LDMFLOW_HOME": str(state)}
    config = tmp_path / "pipe.yaml"
    config.write_text(CONFIG.format(bucket=bucket))
    command = [*CLI, "pipeline", "--config", str(config), "--no-progress"]

    # 1. Killed (the whole process group, SIGKILL) once training has recorded a checkpoint.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first.poll() is None and not checkpoint_registered(f"{bucket}/checkpoints"):
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert checkpoint_registered(f"{bucket}/checkpoints"), "no training checkpoint in time"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The command line's own lines only: none of Ray's core worker (its log lines in the state folder).
    assert not any(console.NATIVE_LINE.match(line) for line in (tmp_path / "first.log").read_bytes().splitlines())
    records = [entry.url.rsplit("/", 1)[1].split("-")[0] for entry in storage.list_prefix(f"{bucket}/datasets/pipe/_stages")]
    assert sorted(records) == ["autoencoder", "precompute", "shard"]

    # 2. Rerun: the finished stages are skipped, training resumes from its checkpoint.
    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    lines = stage_lines(second.stdout)
    assert all("skipped" in lines[s] for s in ("shard", "autoencoder", "precompute")), second.stdout
    assert all("ran in" in lines[s] for s in ("train", "evaluate", "promote")), second.stdout
    assert "models:/pipe-model@production" in second.stdout and "samples.png" in second.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pipe").experiment_id],
                              "tags.`ldmflow.stage` = 'diffusion'")
    by_status = {run.info.status: run for run in runs}
    assert set(by_status) == {"KILLED", "FINISHED"}  # the killed driver's run is closed, not left RUNNING
    resumed = client.get_metric_history(by_status["FINISHED"].info.run_id, "resumed_from_step")
    assert resumed and resumed[0].value >= 20  # not started over

    # Lineage: the version links back to its training run, latents, autoencoder and images.
    version = client.get_model_version_by_alias("pipe-model", "production")
    tags = version.tags
    assert tags["ldmflow.run_id"] == by_status["FINISHED"].info.run_id
    assert tags["ldmflow.latents"].startswith(f"{bucket}/datasets/pipe/latents-")
    assert tags["ldmflow.image_dataset"].startswith(f"{bucket}/datasets/pipe/images-")
    assert tags["ldmflow.autoencoder"] == "models:/pipe-autoencoder/1" and len(tags["ldmflow.latent_manifest_sha256"]) == 64
    shard_runs = client.search_runs([client.get_experiment_by_name("pipe").experiment_id], "tags.`ldmflow.stage` = 'shard'")
    assert shard_runs[0].data.tags["ldmflow.output.images"] == tags["ldmflow.image_dataset"]
    assert by_status["FINISHED"].data.tags["ldmflow.input.latents"] == tags["ldmflow.latents"]

    # 3. Only execution fields changed (parallelism, logging, checkpoint cadence, the
    #    evaluation's batching): every stage is skipped, nothing restarts.
    executed = CONFIG.replace("limit: 300}", "limit: 300, workers: 1}").replace("log_every: 10,", "log_every: 5,") \
        .replace("precompute: {{actors: 1}}", "precompute: {{actors: 2, batch_size: 16}}") \
        .replace("checkpoint_every: 20,", "checkpoint_every: 50,").replace("kid_subsets: 5}", "kid_subsets: 5, batch_size: 7}") \
        .replace("{{workers: 1,", "{{workers: 2, loader_workers: 0,")
    assert executed != CONFIG
    config.write_text(executed.format(bucket=bucket))
    third = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    lines = stage_lines(third.stdout)
    assert set(lines) == set(STAGES) and all("skipped" in line for line in lines.values()), third.stdout
    record = json.loads(storage.read_text(f"{bucket}/datasets/pipe/_stages/" + next(
        e.url.rsplit("/", 1)[1] for e in storage.list_prefix(f"{bucket}/datasets/pipe/_stages") if "/train-" in e.url)))
    assert record["outputs"]["model_uri"] == f"models:/pipe-model/{version.version}"

    # 4. An identity field of the evaluation changed: exactly evaluate and what follows it rerun.
    #    The shard record is made one of format version 0: it is not used, so the shard stage
    #    records its (unchanged) outputs again, and nothing after it reruns for that.
    config.write_text(executed.replace("num_samples: 30,", "num_samples: 20,").format(bucket=bucket))
    shard_record = next(e.url for e in storage.list_prefix(f"{bucket}/datasets/pipe/_stages") if "/shard-" in e.url)
    old = json.loads(storage.read_text(shard_record))
    storage.write_text(shard_record, json.dumps({k: v for k, v in old.items() if k != "version"}))
    fourth = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    lines = stage_lines(fourth.stdout)
    assert all("skipped" in lines[s] for s in ("autoencoder", "precompute", "train")), fourth.stdout
    assert all("ran in" in lines[s] for s in ("shard", "evaluate", "promote")), fourth.stdout
    rewritten = json.loads(storage.read_text(shard_record))
    assert rewritten["version"] == 1 and rewritten["outputs"]["images"] == old["outputs"]["images"]


def test_the_summary_fetches_a_grid_trained_on_another_machine(tmp_path, monkeypatch):
    """A train stage record names its grid by MLflow artifact URI; a machine that did not
    train it (a fresh state folder) gets the picture from the tracking store."""
    from PIL import Image

    from ldmflow.flows.stage_runner import local_grid
    from ldmflow.registry import tracking

    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("grid-elsewhere")).info.run_id
    picture = tmp_path / "trainer" / "samples.png"
    picture.parent.mkdir()
    Image.new("RGB", (24, 16), (200, 10, 10)).save(picture)
    client.log_artifact(run_id, str(picture))

    # Another machine: the same tracking store, a state folder with nothing of the trainer's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri())
    monkeypatch.setenv("LDMFLOW_HOME", str(tmp_path / "elsewhere"))
    path = local_grid({"grid": f"runs:/{run_id}/samples.png", "run_id": run_id})
    assert path.startswith(str(tmp_path / "elsewhere")) and Image.open(path).size == (24, 16)
