"""Configuration of ``ldmflow serve`` (section ``serve:`` of a config file): where it listens,
replica resources and autoscaling, batching, and the limits every request is held to."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs


@configs.stage_config
class ServeConfig:
    """Serving: where the HTTP API listens, replica resources and autoscaling, batching, and
    the limits every request is held to."""

    host: Annotated[str, Field(description="address to bind")] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535, description="HTTP port")] = 8000
    proxy_location: Annotated[Literal["EveryNode", "HeadOnly"], Field(
        description="HTTP proxies on every node (a cluster) or on the head only (several nodes sharing one "
                    "machine, and so one port)")] = "EveryNode"
    num_replicas: Annotated[int, Field(ge=1, description="replicas (the minimum when autoscaling)")] = 1
    max_replicas: Annotated[int, Field(ge=0, description="above `num_replicas`: autoscale between the two")] = 0
    target_ongoing_requests: Annotated[float, Field(gt=0, description="autoscaling target per replica")] = 4.0
    num_cpus: Annotated[float, Field(ge=0, description="CPUs per replica")] = 1.0
    num_gpus: Annotated[float, Field(ge=0, description="GPUs per replica; a fraction shares a GPU")] = 0.0
    max_ongoing_requests: Annotated[int, Field(ge=1, description="requests a replica accepts at once")] = 32
    max_batch_size: Annotated[int, Field(ge=1, description="requests per batch; 1 turns batching off")] = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0, description=(
        "how long a batch that is not full waits for more requests, once the model is free (what a lone request "
        "pays at most)"))] = 0.02
    max_steps: Annotated[int, Field(ge=1, description="largest `steps` accepted")] = 100
    max_images: Annotated[int, Field(ge=1, description="largest `n` accepted")] = 16
    max_image_bytes: Annotated[int, Field(ge=1, description="largest upload (image or mask), decoded")] = 4_000_000
    max_image_pixels: Annotated[int, Field(
        ge=1, description="largest upload in pixels (decompression bombs)")] = 4_194_304
    inpainting_model: Annotated[str, Field(
        description="a model trained for inpainting (`train: inpainting: true`), made with the served model's "
                    "autoencoder: `/v1/inpaint` requests that name no `version` use it (loaded when the server "
                    "starts or is reconfigured); empty: the served model inpaints zero-shot")] = ""
    follow_seconds: Annotated[float, Field(ge=0, description="how often an alias is checked; 0: never")] = 10.0
    api_keys_file: Annotated[str, Field(
        description="a file of API keys, one a line (keys never go in a config file; `LDMFLOW_API_KEYS` "
                    "adds more); with keys, every route but /healthz needs `Authorization: Bearer KEY`")] = ""
    promote_keys_file: Annotated[str, Field(
        description="a file of promotion keys, one a line, `who:KEY` or `KEY` (`LDMFLOW_PROMOTE_KEYS` adds "
                    "more): only they may promote or reject a version over HTTP; they may also draw")] = ""
    allow_unauthenticated: Annotated[bool, Field(
        description="serve without API keys on an address other than loopback (something in front "
                    "checks who calls)")] = False
    access_log: Annotated[bool, Field(description="log a line per request (Ray Serve's access log)")] = False

    def __post_init__(self) -> None:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size, or batches stop short")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            raise ValueError("max_replicas must be 0 or at least num_replicas")
