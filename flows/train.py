"""The diffusion training flow: lineage-checked training on Ray Train, logged to MLflow."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ldmflow.training.stage_configs import DiffusionConfig
from ldmflow.training.train import TrainedDiffusion, train


@task(name="train-diffusion", cache_policy=NO_CACHE)
def train_task(latents: str, config: DiffusionConfig, progress: bool) -> TrainedDiffusion:
    return train(latents, config, progress=progress)


@flow(name="train-diffusion")
def train_flow(latents: str, config: DiffusionConfig = DiffusionConfig(), progress: bool = True) -> TrainedDiffusion:
    """Train the denoising UNet on the latent shards at ``latents``."""
    trained = train_task(latents, config, progress)
    get_run_logger().info(trained.summary())
    return trained
