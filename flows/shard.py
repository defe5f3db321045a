"""The shard flow: list, plan, write chunks concurrently as Prefect tasks, finalize.

The flow only orchestrates; the work is in :mod:`ldmflow.data.sharding`. It lists the
source once (the plan's streamed survey) and the output once; with the manifest that is
enough to know an unchanged rerun has nothing to do, and otherwise which chunks are done.
Each chunk's task lists its own span of the source when it writes it. Tasks retry storage errors
(a store that drops a connection, throttles or restarts) with backoff; any other error in
a chunk fails the run, since per-input problems are already rejects.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from ldmflow.console import Progress
from ldmflow.data import image_shards, shard_plan, shard_writer, sharding, storage
from ldmflow.data.sharding import ShardConfig
from ldmflow.data.sources import check_source
from ldmflow.errors import LdmflowError


def retry_on_storage_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry only what a store's hiccup could have caused."""
    try:
        state.result()
    except storage.StorageError as exc:
        return not isinstance(exc, storage.NotFound)
    except Exception:
        return False
    return False


STORAGE_RETRIES = dict(
    retries=4,
    retry_delay_seconds=[1, 4, 15, 30],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_storage_error,
    cache_policy=NO_CACHE,
)


@task(name="list-output", **STORAGE_RETRIES)
def list_output_task(dest: str) -> tuple[image_shards.ImageManifest | None, dict[str, int]]:
    """One listing of the output, and the manifest a previous run left there."""
    try:
        listed = {entry.url: entry.size for entry in storage.list_prefix(dest)}
    except storage.NotFound:
        listed = {}
    previous = sharding.previous_manifest(dest) if image_shards.manifest_url(dest) in listed else None
    return previous, listed


@task(name="plan-shards", **STORAGE_RETRIES)
def plan_task(source: str, config: ShardConfig, previous: image_shards.ImageManifest | None) -> sharding.Plan:
    return shard_plan.plan(source, config, previous)


@task(name="find-done-shards", **STORAGE_RETRIES)
def todo_task(plan: sharding.Plan, dest: str, config: ShardConfig, listed: dict[str, int]):
    return shard_writer.todo(plan, dest, config, listed)


@task(name="write-shard", task_run_name="write-{todo.chunk.shard}", **STORAGE_RETRIES)
def write_chunk_task(todo: shard_writer.Todo, dest: str, config: ShardConfig) -> tuple[sharding.Part | sharding.Unnamed, str]:
    """The chunk's part, and where it was written: ``host:pid``, and ``@NODE`` in a Ray worker."""
    return shard_writer.write_chunk(todo, dest, config), where()


def where() -> str:
    node = ""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            node = "@" + ray.get_runtime_context().get_node_id()
    return f"{socket.gethostname()}:{os.getpid()}{node}"


@task(name="finalize-shards", **STORAGE_RETRIES)
def finalize_task(plan: sharding.Plan, parts: list[sharding.Part], dest: str, config: ShardConfig,
                  stale: list[str]) -> image_shards.ImageManifest:
    return sharding.finalize(plan, parts, dest, config, stale)


@dataclass(frozen=True)
class ShardOutcome:
    manifest: image_shards.ImageManifest
    dest: str
    shards_written: int
    shards_skipped: int
    seconds: float
    unchanged: bool = False  # the source and config were those of the manifest already there
    processes: tuple[str, ...] = ()  # "host:pid[@ray node]" of each process that wrote or checked a chunk

    @property
    def nodes(self) -> set[str]:
        """The Ray nodes (else the hosts) the chunks ran on."""
        return {p.split("@", 1)[1] if "@" in p else p.rsplit(":", 1)[0] for p in self.processes}

    def summary(self) -> str:
        where = ""
        if len(self.processes) > 1:
            where = f" (chunks on {len(self.processes)} processes, {len(self.nodes)} nodes)"
        return sharding.summary_line(self.manifest, self.dest, self.shards_written, self.shards_skipped, self.seconds,
                                     self.unchanged) + where


@flow(name="shard")
def shard_flow(source: str, dest: str, config: ShardConfig = ShardConfig(), progress: bool = True) -> ShardOutcome:
    """Turn the raw dataset at ``source`` into WebDataset shards at ``dest``: chunks in the
    flow's process, or (``config.on_ray()``, with :func:`run`'s task runner) as Ray tasks."""
    started = time.perf_counter()
    storage.remove_stale_temporaries(dest)
    previous, listed = list_output_task(dest)
    plan = plan_task(source, config, previous)
    if sharding.unchanged(previous, plan.input_key, dest, listed):
        outcome = ShardOutcome(previous, dest, 0, len(previous.ranges), time.perf_counter() - started, unchanged=True)
        get_run_logger().info(outcome.summary())
        return outcome
    todos, stale = todo_task(plan, dest, config, listed)
    parts, processes = write_chunks(todos, dest, config, progress)
    if any(isinstance(part, sharding.Unnamed) for part in parts):
        # A span found labels that are names: deal again, every span numbering by all of them.
        written = [image_shards.part_record_url(dest, part.shard, part.digest)
                   for part in parts if isinstance(part, sharding.Part) and not part.skipped]
        plan = replace(plan, class_names=sharding.gathered_names(parts))
        todos, stale = todo_task(plan, dest, config, listed)
        kept = {todo_.record for todo_ in todos}
        stale += [url for url in written if url not in kept]
        parts, more = write_chunks(todos, dest, config, progress)
        processes |= more
        if any(isinstance(part, sharding.Unnamed) for part in parts):
            raise RuntimeError(f"{source} changed its labels while it was being sharded; run again")
    manifest = finalize_task(plan, parts, dest, config, stale)
    skipped = sum(part.skipped for part in parts)
    outcome = ShardOutcome(manifest, dest, len(parts) - skipped, skipped, time.perf_counter() - started,
                           processes=tuple(sorted(processes)))
    get_run_logger().info(outcome.summary())
    if manifest.num_samples == 0:
        raise NothingUsable(manifest, dest)
    return outcome


def write_chunks(todos: list[shard_writer.Todo], dest: str, config: ShardConfig, progress: bool
                 ) -> tuple[list[sharding.Part | sharding.Unnamed], set[str]]:
    """Each chunk written (or found done) by a task: their parts, and the processes they ran in."""
    with ray_options(config) if config.on_ray() else nullcontext():
        futures = [write_chunk_task.submit(todo, dest, config) for todo in todos]
    parts, processes = [], set()
    with Progress("shard", len(futures), "shard", enabled=progress) as bar:
        for future in as_completed(futures):
            part, where = future.result()
            parts.append(part)
            processes.add(where)
            bar.advance()
    return parts, processes


class NothingUsable(LdmflowError):
    """A source none of whose inputs could be used: its report is written, the dataset refused."""

    def __init__(self, manifest: image_shards.ImageManifest, dest: str) -> None:
        rejects = storage.join(dest, image_shards.REJECTS)
        reasons = Counter(r["reason"].split(":")[0] for r in image_shards.read_jsonl(rejects)) if manifest.num_rejected else {}
        counts = [f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda item: -item[1])]
        if manifest.num_duplicates:
            counts.append(f"{manifest.num_duplicates} duplicates")
        super().__init__(f"{dest}: no usable image among {manifest.num_inputs} inputs ({', '.join(counts) or 'none'}); "
                         f"each reject and its reason is in {rejects}")


def ray_options(config: ShardConfig):
    """Each chunk's Ray task: as many CPUs as its ``workers`` image threads (at most a node's
    CPUs, or it would never be placed), spread over the nodes, with what the task needs to
    reach Prefect's API and the store (no credentials: each node has its own chain)."""
    import ray
    from prefect.settings import PREFECT_API_URL
    from prefect_ray.context import remote_options

    from ldmflow.data import cluster

    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    env = cluster.storage_runtime_env().get("env_vars", {})
    env |= {name: value for name, value in os.environ.items()
            if name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL")}
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return remote_options(num_cpus=max(min(config.workers, largest), 1), scheduling_strategy="SPREAD",
                          runtime_env={"env_vars": env})


def run(source: str, dest: str, config: ShardConfig, progress: bool = True) -> ShardOutcome:
    """Run :func:`shard_flow`: with ``config.workers`` chunks in flight in this process, or
    with each chunk a Ray task on the cluster (``config.runner``).

    A missing or empty source is refused before the flow starts.
    """
    check_source(source)
    if config.on_ray():
        from prefect_ray import RayTaskRunner

        from ldmflow.data import cluster

        cluster.ensure_ray()
        runner = RayTaskRunner()
    else:
        runner = ThreadPoolTaskRunner(max_workers=config.workers)
    return shard_flow.with_options(task_runner=runner)(source, dest, config, progress)
