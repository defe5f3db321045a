"""The precompute flow: resolve the autoencoder, encode every image shard on Ray actors.

Runs on its own (``ldmflow precompute``), on a schedule for new data, or inside the
pipeline. Resolving the model URI (MLflow registry, run, or local folder) happens here, so
``data/`` stays free of registry code.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ldmflow.data import latent_shards
from ldmflow.data.precompute import PrecomputeConfig, PrecomputeOutcome, precompute
from ldmflow.flows.shard import STORAGE_RETRIES
from ldmflow.model import autoencoders
from ldmflow.registry import models


@task(name="resolve-autoencoder", cache_policy=NO_CACHE)
def resolve_task(uri: str) -> tuple[Path, latent_shards.AutoencoderRef]:
    folder, registered = models.resolve(uri)
    info = autoencoders.read_info(folder)
    ref = latent_shards.AutoencoderRef(
        uri=registered.uri if registered else uri,  # a concrete version, never "latest" or an alias
        weights_sha256=info.weights_sha256,
        scale_factor=info.scale_factor,
        name=registered.name if registered else None,
        version=registered.version if registered else None,
    )
    return folder, ref


@task(name="encode-latents", **STORAGE_RETRIES)
def precompute_task(dataset: str, dest: str, folder: Path, ref: latent_shards.AutoencoderRef, config: PrecomputeConfig,
                    progress: bool) -> PrecomputeOutcome:
    return precompute(dataset, dest, folder, ref, config, progress)


@flow(name="precompute")
def precompute_flow(dataset: str, dest: str, autoencoder: str, config: PrecomputeConfig = PrecomputeConfig(),
                    progress: bool = True) -> PrecomputeOutcome:
    """Encode the image shards at ``dataset`` into latent shards at ``dest``."""
    folder, ref = resolve_task(autoencoder)
    outcome = precompute_task(dataset, dest, folder, ref, config, progress)
    get_run_logger().info(outcome.summary())
    return outcome
