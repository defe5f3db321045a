"""The Ray Serve sampler application: replicas of :class:`~ldmflow.serving.replica.SamplerServer`
with their resources, scaling and ``user_config``, built for ``ldmflow serve`` (:func:`run`)
or for a Ray Serve config file or KubeRay ``RayService`` (:func:`build_app`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from ldmflow import configs
from ldmflow.data import cluster
from ldmflow.registry import models, tracking
from ldmflow.registry.gate import PromotionConfig
from ldmflow.serving import auth
from ldmflow.serving.config import ServeConfig
from ldmflow.serving.replica import KEY_DIGESTS, PROMOTE_KEY_DIGESTS, PROMOTION, SamplerServer


@dataclass(frozen=True)
class Keys:
    """The digests of the API keys and of the promotion keys (with who holds each)."""

    api: list[str] = field(default_factory=list)
    promote: dict[str, str] = field(default_factory=dict)


def deployment_options(config: ServeConfig, model_uri: str, keys: Keys = Keys(),
                       promotion: PromotionConfig = PromotionConfig()) -> dict:
    """Replica resources, scaling, logging and the ``user_config`` a replica is configured
    with (the keys only as their digests; the gate that ``POST /v1/promote`` applies)."""
    env = cluster.storage_runtime_env().get("env_vars", {})
    env[tracking.ENV_TRACKING_URI] = tracking.tracking_uri()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": config.max_ongoing_requests,
        "logging_config": {"enable_access_log": config.access_log},
        "user_config": {"model_uri": model_uri, KEY_DIGESTS: list(keys.api), PROMOTE_KEY_DIGESTS: dict(keys.promote),
                        PROMOTION: configs.to_dict(promotion), **configs.to_dict(config)},
    }
    if config.max_replicas > config.num_replicas:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return options


def key_digests(config: ServeConfig, host: str | None) -> Keys:
    """The digests of the configured API and promotion keys, refusing a keyless API that
    others could reach (:func:`ldmflow.serving.auth.check_exposure`)."""
    keys = Keys(auth.digests(auth.load_keys(dict(os.environ), config.api_keys_file)),
                auth.promote_key_digests(dict(os.environ), config.promote_keys_file))
    auth.check_exposure(host, [*keys.api, *keys.promote], config.allow_unauthenticated)
    return keys


def build_app(args: dict):
    """Application builder for Ray Serve config files (``import_path:
    ldmflow.serving.app:build_app``): ``args`` holds ``model_uri``, any :class:`ServeConfig`
    field, and ``promotion`` (the ``promote:`` section: the gate of ``POST /v1/promote``)."""
    fields = dict(args)
    uri = fields.pop("model_uri")
    promotion = configs.from_dict(PromotionConfig, fields.pop("promotion", {}), "promotion.")
    config = configs.from_dict(ServeConfig, fields)
    keys = key_digests(config, None)  # the Service decides who reaches it
    if config.inpainting_model:
        models.check_inpainting_model(config.inpainting_model, uri)
    return SamplerServer.options(**deployment_options(config, uri, keys, promotion)).bind()


APP_NAME = "ldmflow"


def run(model_uri: str, config: ServeConfig = ServeConfig(), *, promotion: PromotionConfig = PromotionConfig(),
        blocking: bool = False):
    """Start (or update) the sampler application on the local or ``RAY_ADDRESS`` cluster,
    promoting (``POST /v1/promote``) behind the gate of ``promotion``; returns the base URL.
    Refused on an address other than loopback without API keys, unless the config allows it,
    and with an ``inpainting_model`` that is not one (:func:`ldmflow.registry.models.check_inpainting_model`)."""
    keys = key_digests(config, config.host)
    if config.inpainting_model:
        models.check_inpainting_model(config.inpainting_model, model_uri)
    cluster.ensure_ray()
    serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    serve.run(SamplerServer.options(**deployment_options(config, model_uri, keys, promotion)).bind(), name=APP_NAME,
              route_prefix="/", blocking=blocking)
    return f"http://{config.host}:{config.port}"
