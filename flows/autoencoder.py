"""The autoencoder flow: train (Ray Train), measure, evaluate, register (MLflow)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ldmflow.training.stage_configs import AutoencoderConfig
from ldmflow.training.autoencoder import TrainedAutoencoder, train


@task(name="train-autoencoder", cache_policy=NO_CACHE)
def train_task(dataset: str, config: AutoencoderConfig, progress: bool) -> TrainedAutoencoder:
    return train(dataset, config, progress=progress)


@flow(name="train-autoencoder")
def train_autoencoder_flow(dataset: str, config: AutoencoderConfig = AutoencoderConfig(), progress: bool = True) -> TrainedAutoencoder:
    """Train the KL autoencoder on the image shards at ``dataset`` and register it."""
    trained = train_task(dataset, config, progress)
    get_run_logger().info(trained.summary())
    return trained
