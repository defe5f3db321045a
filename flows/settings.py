"""The whole pipeline's configuration: every stage's config from one YAML file, and the
service endpoints.

Kept free of Prefect imports: endpoints (``PREFECT_API_URL`` among them) must be in the
environment before Prefect is imported, because Prefect reads its settings at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from ldmflow import configs


@configs.stage_config
class Endpoints:
    """Where the services are. Empty: the standard environment variable, and with that unset
    too, the embedded default (local folder, in-process Ray, Prefect's local API, MLflow on
    SQLite under the state folder). Credentials never go here: S3 keys come from the usual
    AWS credential chain (environment, profile, instance role)."""

    s3: Annotated[str, Field(description="`AWS_ENDPOINT_URL`: an S3-compatible store; unset: AWS S3 "
                                         "(or only local folders)")] = configs.execution("")
    ray: Annotated[str, Field(description="`RAY_ADDRESS`: a Ray cluster; unset: a local Ray instance "
                                          "started in-process")] = configs.execution("")
    prefect: Annotated[str, Field(description="`PREFECT_API_URL`: a Prefect server; unset: Prefect's local API "
                                              "under the state folder, kept running between commands")] = configs.execution("")
    mlflow: Annotated[str, Field(description="`MLFLOW_TRACKING_URI`: an MLflow server; unset: SQLite and "
                                             "artifacts under the state folder")] = configs.execution("")

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


@configs.stage_config
class PipelineConfig:
    """The end-to-end flow: where the raw images come from, where everything goes, which
    stages run."""

    source: Annotated[str, Field(
        description="raw images: folder, `s3://` prefix, tar, `builtin:digits`, `builtin:mnist`")] = "builtin:digits"
    name: Annotated[str, Field(description="dataset name: outputs go under `storage/name/`")] = "digits"
    storage: Annotated[str, Field(description="folder or `s3://` prefix for shards, latents and stage records; "
                                              "empty: `$LDMFLOW_HOME/datasets`")] = ""
    autoencoder: Annotated[str, Field(description="reuse this autoencoder (model URI) instead of training one")] = ""
    stages: Annotated[tuple[str, ...], Field(
        description="stages to run; add `serve` to deploy the production model at the end")] = configs.execution(
        STAGES[:-1])
    endpoints: Annotated[Endpoints, Field(description="service endpoints")] = field(default_factory=Endpoints)

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


def stage_sections() -> dict[str, type]:
    """Every stage's section name and config class, in pipeline order (imported on demand:
    some of them pull in torch)."""
    from ldmflow.data.precompute import PrecomputeConfig
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.serving.config import ServeConfig
    from ldmflow.training.stage_configs import AutoencoderConfig
    from ldmflow.training.evaluation import EvaluationConfig
    from ldmflow.registry.gate import PromotionConfig
    from ldmflow.training.stage_configs import DiffusionConfig

    return {"shard": ShardConfig, "autoencoder": AutoencoderConfig, "precompute": PrecomputeConfig,
            "train": DiffusionConfig, "evaluate": EvaluationConfig, "promote": PromotionConfig, "serve": ServeConfig}


def load_spec(path: str | None, overrides: dict | None = None) -> Spec:
    """Read every section of ``path`` (absent sections take defaults); ``overrides`` apply to
    ``pipeline:``. This is how the command line reads a config file."""
    loaded = {name: configs.load(cls, path, section=name) for name, cls in stage_sections().items()}
    pipeline = configs.load(PipelineConfig, path, section="pipeline", overrides=overrides)
    return Spec(pipeline=pipeline, **loaded)


def load_endpoints(path: str | None) -> Endpoints:
    """Only ``pipeline.endpoints`` (without importing anything heavy)."""
    return configs.load(PipelineConfig, path, section="pipeline").endpoints
