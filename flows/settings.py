"""The whole pipeline's configuration: every stage's config from one YAML file, and the
service endpoints.

Kept free of Prefect imports: endpoints (``PREFECT_API_URL`` among them) must be in the
environment before Prefect is imported, because Prefect reads its settings at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data import config as configs


@dataclass(frozen=True)
class Endpoints:
    """Where the services are. Empty: the standard environment variable, and with that unset
    too, the embedded default (local folder, in-process Ray, Prefect's local API, MLflow on
    SQLite under the state folder)."""

    s3: str = ""  # AWS_ENDPOINT_URL: an S3-compatible store (MinIO, Ceph, R2, ...)
    ray: str = ""  # RAY_ADDRESS
    prefect: str = ""  # PREFECT_API_URL
    mlflow: str = ""  # MLFLOW_TRACKING_URI

    ENVIRONMENT = {"s3": "AWS_ENDPOINT_URL", "ray": "RAY_ADDRESS", "prefect": "PREFECT_API_URL",
                   "mlflow": "MLFLOW_TRACKING_URI"}

    def apply(self) -> dict[str, str]:
        """Export the configured endpoints; returns every endpoint in effect (never credentials)."""
        for key, variable in self.ENVIRONMENT.items():
            value = getattr(self, key)
            if value:
                os.environ[variable] = value
        return {key: os.environ.get(variable, "") for key, variable in self.ENVIRONMENT.items()}


STAGES = ("shard", "autoencoder", "precompute", "train", "evaluate", "promote", "serve")


@dataclass(frozen=True)
class PipelineConfig:
    """Configuration of ``ldmflow pipeline`` (section ``pipeline:`` of a config file)."""

    source: str = "builtin:digits"  # raw images: folder, s3:// prefix, tar, builtin:digits, builtin:mnist
    name: str = "digits"  # dataset name: outputs go under STORAGE/NAME/
    storage: str = ""  # folder or s3:// prefix for shards, latents and stage records; empty: $LDMFLOW_HOME/datasets
    autoencoder: str = ""  # reuse this autoencoder (model URI) instead of training one
    stages: tuple[str, ...] = ("shard", "autoencoder", "precompute", "train", "evaluate", "promote")
    endpoints: Endpoints = field(default_factory=Endpoints)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")


@dataclass(frozen=True)
class Spec:
    """Every stage's config, as read from one file."""

    pipeline: PipelineConfig
    shard: object
    autoencoder: object
    precompute: object
    train: object
    evaluate: object
    promote: object
    serve: object

    def to_dict(self) -> dict:
        return {name: configs.to_dict(getattr(self, name)) for name in self.__dataclass_fields__}


def load_spec(path: str | None, overrides: dict | None = None) -> Spec:
    """Read every section of ``path`` (absent sections take defaults); ``overrides`` apply to
    ``pipeline:``."""
    from data.precompute import PrecomputeConfig
    from data.sharding import ShardConfig
    from serving.app import ServeConfig
    from training.autoencoder import AutoencoderConfig
    from training.evaluation import EvaluationConfig
    from training.registry import PromotionConfig
    from training.train import DiffusionConfig

    sections = {"shard": ShardConfig, "autoencoder": AutoencoderConfig, "precompute": PrecomputeConfig,
                "train": DiffusionConfig, "evaluate": EvaluationConfig, "promote": PromotionConfig,
                "serve": ServeConfig}
    loaded = {name: configs.load(cls, path, section=name) for name, cls in sections.items()}
    pipeline = configs.load(PipelineConfig, path, section="pipeline", overrides=overrides)
    return Spec(pipeline=pipeline, **loaded)


def load_endpoints(path: str | None) -> Endpoints:
    """Only ``pipeline.endpoints`` (without importing anything heavy)."""
    return configs.load(PipelineConfig, path, section="pipeline").endpoints
