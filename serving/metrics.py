"""Prometheus metrics of the HTTP API, recorded through Ray Serve's metrics (``ray.serve.metrics``).

Every replica records its own; Ray adds the replica's ``deployment``, ``replica`` and
``application`` tags and exports them, prefixed ``ray_``, on each node's metrics port (``ray
start --metrics-export-port``; KubeRay's pods name it ``metrics``, 8080). What a scrape sees:

=====================================  =========================================================
``ray_ldmflow_requests_total``         requests answered, by ``route`` and ``status`` (401s,
                                       422s and 500s included)
``ray_ldmflow_request_seconds``        latency histogram by ``route``, from the first byte
                                       read to the response
``ray_ldmflow_batch_size``             histogram of requests sampled together in one UNet batch
``ray_ldmflow_images_total``           images drawn, by ``mode`` (generate, edit, inpaint)
``ray_ldmflow_model_version``          the registered version a replica serves, by ``model``
                                       (0 for a model folder)
=====================================  =========================================================

``route`` is the API's path for its own routes and ``other`` for anything else, so that a
scan of random paths cannot blow up the number of series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Collection

LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64]
OTHER_ROUTE = "other"
GAUGE_REFRESH_SECONDS = 5.0  # Ray drops a gauge not set again within two report intervals (20 s)


class ServingMetrics:
    """One replica's metrics; create it inside the replica (Ray Serve tags it there)."""

    def __init__(self, routes: Callable[[], Collection[str]]) -> None:
        """``routes()``: the API's paths, asked at the first request (Ray Serve mounts a
        deployment's routes after it is built)."""
        from ray.serve import metrics

        self._routes, self.routes = routes, frozenset()
        self.requests = metrics.Counter("ldmflow_requests", description="HTTP requests answered, by route and status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("ldmflow_request_seconds", description="HTTP request latency in seconds",
                                         boundaries=LATENCY_BOUNDS, tag_keys=("route",))
        self.batch_size = metrics.Histogram("ldmflow_batch_size", description="requests sampled together in one batch",
                                            boundaries=BATCH_BOUNDS)
        self.images = metrics.Counter("ldmflow_images", description="images drawn, by mode", tag_keys=("mode",))
        self.model_version = metrics.Gauge("ldmflow_model_version", description="the registered version served",
                                           tag_keys=("model",))
        self._served: tuple[float, dict[str, str]] | None = None
        self._refresher: threading.Thread | None = None

    def route(self, path: str) -> str:
        if not self.routes:
            self.routes = frozenset(self._routes())
        return path if path in self.routes else OTHER_ROUTE

    async def measure(self, path: str, answer: Callable[[], Awaitable]):
        """Await ``answer()`` (the rest of the HTTP stack) and record its status and latency;
        an exception counts as a 500 and goes on up."""
        route, status, start = self.route(path), 500, time.perf_counter()
        try:
            response = await answer()
            status = response.status_code
            return response
        finally:
            self.requests.inc(1, {"route": route, "status": str(status)})
            self.latency.observe(time.perf_counter() - start, {"route": route})

    def sampled(self, mode: str, requests: int, images: int) -> None:
        """One batch of ``requests`` requests drawing ``images`` images."""
        self.batch_size.observe(requests)
        self.images.inc(images, {"mode": mode})

    def serving(self, name: str | None, version: str | None) -> None:
        """The model now served; reported again every few seconds for as long as it is."""
        self._served = (float(version) if version and version.isdigit() else 0.0, {"model": name or "folder"})
        self.model_version.set(*self._served)
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh, name="model-version-gauge", daemon=True)
            self._refresher.start()

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_SECONDS)
            self.model_version.set(*self._served)
