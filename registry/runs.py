"""MLflow runs of the stages: the driver creates the run (the stage config as params,
lineage as tags) and closes it; in a training stage rank 0 of the Ray Train worker group
logs to it (:class:`RankZeroTracker`).

A run is named after its job (:func:`ldmflow.configs.run_name`): the same job run again
resumes the same Ray Train checkpoints under a new MLflow run, and the run its dead driver
left RUNNING is marked KILLED, so the experiment never shows two live runs of one job.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ldmflow import configs
from ldmflow.registry import tracking


def start(experiment: str, name: str, config: Any, tags: dict[str, str]) -> str:
    """A new run ``name`` in ``experiment`` with ``config``'s fields as params; returns its id."""
    from mlflow.entities import Param

    client = tracking.client()
    experiment_id = tracking.experiment_id(experiment)
    stale = client.search_runs([experiment_id], f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_terminated(run.info.run_id, status="KILLED")  # its driver died; this run resumes the job
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = [Param(key, str(value)) for key, value in flatten(configs.to_dict(config)).items()]
    for start in range(0, len(params), 100):  # a request per 100 params (MLflow's batch limit), not per field
        client.log_batch(run_id, params=params[start : start + 100])
    return run_id


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as dotted param names (``noise.schedule``); lists as JSON."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, list) else value
    return flat


class RankZeroTracker:
    """Logs metrics (and pictures) to an MLflow run from rank 0 of a worker group only.

    Metrics are queued and written by MLflow's background thread, so the training step never
    waits for the tracking server; :func:`flush` writes what is queued (before a checkpoint
    and when the worker's function ends, see :func:`ldmflow.training.launch.fit`)."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, rank: int) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri) if rank == 0 and run_id else None

    def log(self, step: int, **values: float) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        queued = self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()],
                                       synchronous=False)
        with _queued_lock:
            _queued.append(queued)

    def log_image(self, image, path: str) -> None:
        if self.client is not None:
            self.client.log_image(self.run_id, image, path)


_queued: list = []  # MLflow's RunOperations of the metrics this process queued, not yet waited for
_queued_lock = threading.Lock()


def flush() -> None:
    """Wait until every metric this process has queued is written (a no-op for a process
    that logged nothing: no store is opened)."""
    with _queued_lock:
        operations, _queued[:] = list(_queued), []
    for operations_of_one_call in operations:
        operations_of_one_call.wait()
