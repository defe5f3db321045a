"""The Ray Serve sampler application: replicas of :class:`~ldmflow.serving.replica.SamplerServer`
with their resources, scaling and ``user_config``, built for ``ldmflow serve`` (:func:`run`)
or for a Ray Serve config file or KubeRay ``RayService`` (:func:`build_app`).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ldmflow import configs
from ldmflow.data import cluster
from ldmflow.registry import tracking
from ldmflow.serving.config import ServeConfig
from ldmflow.serving.replica import SamplerServer


def deployment_options(config: ServeConfig, model_uri: str) -> dict:
    """Replica resources, scaling and the ``user_config`` a replica is configured with."""
    env = cluster.storage_runtime_env().get("env_vars", {})
    env[tracking.ENV_TRACKING_URI] = tracking.tracking_uri()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": config.max_ongoing_requests,
        "user_config": {"model_uri": model_uri, **configs.to_dict(config)},
    }
    if config.max_replicas > config.num_replicas:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(args: dict):
    """Application builder for Ray Serve config files (``import_path:
    ldmflow.serving.app:build_app``): ``args`` holds ``model_uri`` and any
    :class:`ServeConfig` field."""
    fields = dict(args)
    uri = fields.pop("model_uri")
    config = configs.from_dict(ServeConfig, fields)
    return SamplerServer.options(**deployment_options(config, uri)).bind()


APP_NAME = "ldmflow"


def run(model_uri: str, config: ServeConfig = ServeConfig(), *, blocking: bool = False):
    """Start (or update) the sampler application on the local or ``RAY_ADDRESS`` cluster;
    returns the base URL."""
    cluster.ensure_ray()
    serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    serve.run(SamplerServer.options(**deployment_options(config, model_uri)).bind(), name=APP_NAME,
              route_prefix="/", blocking=blocking)
    return f"http://{config.host}:{config.port}"
