"""Starting a Ray Train job the way every ldmflow training stage does."""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from ldmflow.data import cluster
from ldmflow.registry import runs, tracking
from ldmflow.state import state_dir
from ldmflow.training import loop
from ldmflow.training.progress import TrainingProgress
from ldmflow.training.stage_configs import RayTrainConfig


@contextlib.contextmanager
def fit(worker: Callable[[dict], None], loop_config: dict[str, Any], ray_train: RayTrainConfig, *, name: str,
        storage_url: str | None, run_id: str, label: str, progress: bool = True) -> Iterator[str]:
    """Run ``worker`` on ``ray_train.workers`` Ray Train workers (DDP) and yield the local
    folder of the run's last checkpoint.

    The run is named ``name`` under ``storage_url`` (default: ``ray_train.checkpoint_storage``,
    else the state folder), so the same job run again resumes from its last checkpoint;
    ``ray_train.max_failures`` worker failures are recovered from that checkpoint. A failure
    marks the MLflow run FAILED and propagates. With ``progress``, a line ``LABEL: step …``
    follows the run (:mod:`.progress`).

    ``workers: 0`` is Ray Train's local mode: ``worker`` runs in this process as rank 0 of 1,
    with the same ``ray.train`` API but no worker actors to start (seconds saved on every
    run), no checkpoint storage and so no recovery or resumption; its checkpoints are local
    folders, each removed when the next is reported and the last once the caller is done.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster.ensure_ray()
    workers = ray_train.workers
    storage = storage_url or ray_train.checkpoint_storage or str(state_dir() / "ray_results")
    path, filesystem = cluster.checkpoint_storage(storage)
    trainer = TorchTrainer(
        functools.partial(_flushing_metrics, worker, in_process=workers == 0),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                               use_gpu=workers > 0 and cluster.use_gpu(ray_train.use_gpu)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=ray_train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env=cluster.storage_runtime_env(),
        ),
    )
    try:
        with TrainingProgress(run_id, loop_config["config"]["steps"], label, enabled=progress):
            result = trainer.fit()
    except Exception:
        tracking.client().set_terminated(run_id, status="FAILED")
        raise
    try:
        with result.checkpoint.as_directory() as folder:
            yield folder
    finally:
        if workers == 0:  # the loop's own folder: nothing else holds it
            shutil.rmtree(result.checkpoint.path, ignore_errors=True)


def _flushing_metrics(worker: Callable[[dict], None], loop_config: dict[str, Any], in_process: bool = False) -> None:
    """``worker(loop_config)``, then the metrics it queued written, however it ends (a
    failure to write them never hides the worker's own error). ``in_process``: Ray Train's
    local mode (:func:`ldmflow.training.loop.report` keeps one checkpoint folder)."""
    loop.keep_only_the_last_checkpoint(in_process)
    try:
        worker(loop_config)
    except BaseException:
        loop.keep_only_the_last_checkpoint(False, discard_last=True)
        with contextlib.suppress(Exception):
            runs.flush()
        raise
    loop.keep_only_the_last_checkpoint(False)
    runs.flush()
