"""Shared fixtures: real local servers, never mocks of their clients.

- ``s3``: moto in server mode on 127.0.0.1 (one per session), reached through boto3 over
  HTTP exactly like MinIO or AWS; ``bucket`` gives each test a fresh bucket.
- Prefect runs against its local API: one temporary server for the session
  (``prefect_test_harness``), whose URL subprocesses inherit.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import training_config

# Prefect reads its settings at import time: point it at a throwaway home first.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="ldmflow-tests-"))
os.environ["LDMFLOW_HOME"] = str(_SESSION_HOME / "state")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
os.environ["AWS_ACCESS_KEY_ID"] = "ldmflow-test"
os.environ["AWS_SECRET_ACCESS_KEY"] = "ldmflow-test-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

ROOT = Path(__file__).resolve().parents[1]


# The suite's time is read against the machine's speed: the 1-thread bare training loop of
# benchmarks/train.py, measured for a few seconds before the tests (LDMFLOW_SPEED_SECONDS=0: skip).
REFERENCE_SPEED = 64.0  # latents/s of the slow 2-core VM the suite's budget is set for (25 minutes)
_speed: dict[str, float] = {}


def pytest_report_header(config):
    seconds = float(os.environ.get("LDMFLOW_SPEED_SECONDS", "3"))
    if seconds <= 0 or config.option.collectonly:
        return None
    from ldmflow.training import bare_loop

    _speed["latents_per_s"] = bare_loop.machine_speed(seconds)
    _speed["started"] = time.monotonic()
    return (f"machine: {os.cpu_count()} cores, 1-thread bare training loop {_speed['latents_per_s']:.0f} latents/s "
            f"(the suite's budget, 25 min, is for {REFERENCE_SPEED:.0f})")


def pytest_terminal_summary(terminalreporter):
    if "latents_per_s" not in _speed:
        return
    elapsed = time.monotonic() - _speed["started"]
    scaled = elapsed * _speed["latents_per_s"] / REFERENCE_SPEED
    terminalreporter.write_line(f"suite: {elapsed / 60:.1f} min at {_speed['latents_per_s']:.0f} latents/s, "
                                f"{scaled / 60:.1f} min scaled to {REFERENCE_SPEED:.0f} latents/s")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """Prefect's local API for the whole session; its URL is exported for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield server
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the local S3 server, as ``s3://NAME``."""
    from ldmflow.data import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def subprocess_env(prefect_api) -> dict[str, str]:
    """The environment for an ``ldmflow`` subprocess: same Prefect API, same S3 endpoint. The
    package comes from the installation, never from the checkout's folders on a path."""
    return dict(os.environ)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (starting Ray takes seconds)."""
    import ray

    from ldmflow.data import cluster

    cluster.ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits16(tmp_path_factory) -> str:
    """400 real digits at 16 px in 8 shards of 50: small enough for seconds-long training."""
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.flows import shard as shard_flow

    dest = str(tmp_path_factory.mktemp("digits16"))
    shard_flow.run("builtin:digits", dest, ShardConfig(resolution=16, shard_size=50, limit=400), progress=False)
    return dest


@pytest.fixture(scope="session")
def digits_model(ray_local, digits16, tmp_path_factory):
    """A small but trained model of the 16-px digits, registered as ``test-digits`` version 1:
    autoencoder → latents (Ray Data's encoder actors) → diffusion UNet and its label reader, both
    trainings in Ray Train's local mode (``workers=0``: the loops' logic, not their distribution, which
    test_train and test_cluster test). Shared by the registry, evaluation, serving, CLI,
    fine-tuning and text-model tests."""
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.training import autoencoder, stage_configs
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    ae = autoencoder.train(digits16, training_config(stage_configs.AutoencoderConfig, 
        steps=80, batch_size=32, workers=0, lr=2e-3, warmup_steps=5, checkpoint_every=80, log_every=20,
        scale_samples=128, model_name="test-digits-autoencoder", experiment="test-digits"), progress=False)
    latents = str(tmp_path_factory.mktemp("digits-model") / "latents")
    precompute_flow(digits16, latents, ae.model_uri, PrecomputeConfig(actors=1), progress=False)
    return train(latents, training_config(DiffusionConfig, 
        steps=300, batch_size=32, workers=0, lr=2e-3, warmup_steps=20, checkpoint_every=300, log_every=50,
        sample_steps=10, shuffle_buffer=100, label_reader_steps=300, experiment="test-digits",
        model_name="test-digits"), progress=False)


@pytest.fixture(scope="session")
def inpainting_model(digits_model, tmp_path_factory):
    """The digits model's inpainting version, registered as ``test-inpainting``: its weights,
    the extra input channels (``inpainting: true``), 20 steps on its own latents, in Ray
    Train's local mode. Served for /v1/inpaint by test_serving; tested in test_finetune."""
    from ldmflow.model import model_format
    from ldmflow.training.stage_configs import DiffusionConfig
    from ldmflow.training.train import train

    latents = model_format.read_info(digits_model.folder).lineage["latents"]
    return train(latents, training_config(
        DiffusionConfig, batch_size=32, workers=0, lr=5e-4, warmup_steps=5, log_every=5, sample_steps=10,
        shuffle_buffer=100, steps=20, checkpoint_every=20, inpainting=True, init_from=digits_model.model_uri,
        experiment="test-finetune", model_name="test-inpainting"),
        storage_path=str(tmp_path_factory.mktemp("inpainting")), progress=False)
