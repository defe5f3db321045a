"""Starting a Ray Train job the way every ldmflow training stage does."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from ldmflow.data import cluster
from ldmflow.registry import tracking
from ldmflow.state import state_dir
from ldmflow.training import runs
from ldmflow.training.progress import TrainingProgress


def fit(worker: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, workers: int, use_gpu: str,
        max_failures: int, storage_url: str | None, run_id: str, label: str, progress: bool = True):
    """Run ``worker`` on ``workers`` Ray Train workers (DDP) and return Ray Train's result.

    The run is named ``name`` under ``storage_url`` (default: the state folder), so the same
    job run again resumes from its last checkpoint; ``max_failures`` worker failures are
    recovered from that checkpoint. A failure marks the MLflow run FAILED and propagates.
    With ``progress``, a line ``LABEL: step …`` follows the run (:mod:`.progress`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster.ensure_ray()
    path, filesystem = cluster.checkpoint_storage(storage_url or str(state_dir() / "ray_results"))
    trainer = TorchTrainer(
        functools.partial(_flushing_metrics, worker),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cluster.use_gpu(use_gpu)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env=cluster.storage_runtime_env(),
        ),
    )
    try:
        with TrainingProgress(run_id, loop_config["config"]["steps"], label, enabled=progress):
            return trainer.fit()
    except Exception:
        tracking.client().set_terminated(run_id, status="FAILED")
        raise


def _flushing_metrics(worker: Callable[[dict], None], loop_config: dict[str, Any]) -> None:
    """``worker(loop_config)``, then the metrics it queued written, however it ends (a
    failure to write them never hides the worker's own error)."""
    try:
        worker(loop_config)
    except BaseException:
        with contextlib.suppress(Exception):
            runs.flush()
        raise
    runs.flush()
