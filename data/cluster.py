"""Ray: join the cluster in ``RAY_ADDRESS``, or start a local instance in-process."""

from __future__ import annotations

import os

from ldmflow import console


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start (once) a local Ray instance.

    A local instance advertises at least 4 logical CPUs so that 2 training workers and
    their controller, or a pool of encoder actors, fit on a 2-core machine: the work is
    time-shared, not refused.
    """
    import ray

    if ray.is_initialized():
        return
    # Quiet (the command line without -v): workers' output stays in Ray's log folder.
    shown = dict(log_to_driver=not console.quiet(), logging_level="ERROR" if console.quiet() else "WARNING")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **shown)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, configure_logging=True, **shown)


def use_gpu(requested: str) -> bool:
    """``auto`` uses GPUs when the cluster has them; ``true``/``false`` force it."""
    if requested in ("true", "false"):
        return requested == "true"
    return has_gpus()


def has_gpus() -> bool:
    """Whether the cluster the stages run on has GPUs: asked of Ray where it runs or
    ``RAY_ADDRESS`` names a cluster, else of torch (a local instance has this machine's), so
    that nothing starts Ray only to ask."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray()
        return bool(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.is_available()


def storage_runtime_env() -> dict:
    """Worker environment for reaching the same S3-compatible store as the driver.

    Only the endpoint travels (it is not a secret); credentials come from each node's own
    credential chain, never through Ray, where they could be logged.
    """
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
    values = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"env_vars": values} if values else {}


def checkpoint_storage(url: str):
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    For ``s3://`` with ``AWS_ENDPOINT_URL`` set (MinIO, Ceph, R2, a local test server), an
    explicit pyarrow filesystem carries the endpoint to Ray Train's controller and workers,
    whatever environment their nodes were started with. Credentials stay out of it: each
    process resolves them from its own chain.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url.startswith("s3://") or not endpoint:
        return url, None
    from urllib.parse import urlparse

    import pyarrow.fs

    parsed = urlparse(endpoint)
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc or parsed.path,
        scheme=parsed.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return url[len("s3://") :], filesystem
