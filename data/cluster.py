"""Ray: join the cluster in ``RAY_ADDRESS``, or start a local instance in-process."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start (once) a local Ray instance.

    A local instance advertises at least 4 logical CPUs so that 2 training workers and
    their controller, or a pool of encoder actors, fit on a 2-core machine: the work is
    time-shared, not refused.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def use_gpu(requested: str) -> bool:
    """``auto`` uses GPUs when the cluster has them; ``true``/``false`` force it."""
    if requested in ("true", "false"):
        return requested == "true"
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))
