"""The Ray Serve sampler application: replicas of :class:`~ldmflow.serving.replica.SamplerServer`
with their resources, scaling and ``user_config``, built for ``ldmflow serve`` (:func:`run`)
or for a Ray Serve config file or KubeRay ``RayService`` (:func:`build_app`).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from ldmflow import configs
from ldmflow.data import cluster
from ldmflow.registry import tracking
from ldmflow.serving import auth
from ldmflow.serving.config import ServeConfig
from ldmflow.serving.replica import KEY_DIGESTS, SamplerServer


def deployment_options(config: ServeConfig, model_uri: str, key_digests: list[str] | None = None) -> dict:
    """Replica resources, scaling, logging and the ``user_config`` a replica is configured
    with (the API keys only as their digests)."""
    env = cluster.storage_runtime_env().get("env_vars", {})
    env[tracking.ENV_TRACKING_URI] = tracking.tracking_uri()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": config.max_ongoing_requests,
        "logging_config": {"enable_access_log": config.access_log},
        "user_config": {"model_uri": model_uri, KEY_DIGESTS: list(key_digests or []), **configs.to_dict(config)},
    }
    if config.max_replicas > config.num_replicas:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return options


def api_key_digests(config: ServeConfig, host: str | None) -> list[str]:
    """The digests of the configured API keys, refusing a keyless API that others could
    reach (:func:`ldmflow.serving.auth.check_exposure`)."""
    key_digests = auth.digests(auth.load_keys(dict(os.environ), config.api_keys_file))
    auth.check_exposure(host, key_digests, config.allow_unauthenticated)
    return key_digests


def build_app(args: dict):
    """Application builder for Ray Serve config files (``import_path:
    ldmflow.serving.app:build_app``): ``args`` holds ``model_uri`` and any
    :class:`ServeConfig` field."""
    fields = dict(args)
    uri = fields.pop("model_uri")
    config = configs.from_dict(ServeConfig, fields)
    key_digests = api_key_digests(config, None)  # the Service decides who reaches it
    return SamplerServer.options(**deployment_options(config, uri, key_digests)).bind()


APP_NAME = "ldmflow"


def run(model_uri: str, config: ServeConfig = ServeConfig(), *, blocking: bool = False):
    """Start (or update) the sampler application on the local or ``RAY_ADDRESS`` cluster;
    returns the base URL. Refused on an address other than loopback without API keys,
    unless the config allows it."""
    key_digests = api_key_digests(config, config.host)
    cluster.ensure_ray()
    serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    serve.run(SamplerServer.options(**deployment_options(config, model_uri, key_digests)).bind(), name=APP_NAME,
              route_prefix="/", blocking=blocking)
    return f"http://{config.host}:{config.port}"
