"""Latent precompute: encode every image shard once, in a Ray Data streaming pipeline.

Three stages, one row per image shard, streamed so that each stage works while the others do:

1. **decode** (CPU tasks): read the shard, check its sha256 against the image manifest,
   decode every image to uint8 pixels;
2. **encode** (a fixed pool of :class:`~ldmflow.data.encode_stages.LatentEncoder` actors, a callable class): the
   autoencoder loaded once per actor (a GPU each, in bf16 autocast, where the cluster has
   them; torch's CPU threads otherwise) encodes the pixels in batches, and the offline text
   encoder embeds the captions;
3. **write** (CPU tasks): the latent shard, written atomically under the image shard's name,
   then its part record.

Ray Data's backpressure keeps a few decoded shards queued ahead of each encoder, so an
accelerator never waits on a JPEG decoder, and bounds what is in flight. A stage that
raises for a shard (corrupt input, an undecodable image, a store that went away) returns
the error as that shard's row instead, so one shard never stops the others; such shards
run again in another round, up to ``max_attempts`` rounds, and are then listed in the
manifest's ``failed_shards``. An encoder actor that dies (its node lost, killed) is
restarted by Ray and its shard retried (``max_attempts - 1`` times).

Resumable: a shard's part record is named by its digest (input shard sha256, autoencoder
weights sha256, the config's identity, format): ``_parts/shard-i.DIGEST.json``. One listing
of the output finds every shard that is done, with no request per shard; their figures come
from the previous manifest when it was written with the same identity (an unchanged rerun),
else from their records (a run killed before its manifest). The manifest is written last,
so a killed and rerun job ends with the manifest of an unbroken one.

The stages are in :mod:`ldmflow.data.encode_stages`; this module holds the config and the
driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs, console, state
from ldmflow.console import Progress
from ldmflow.data import cluster, image_shards, latent_shards, storage
from ldmflow.data.encode_stages import EncodeTask, LatentEncoder, decode_shard, write_latent_shard
from ldmflow.model import autoencoders, precision, text_encoder


@configs.stage_config
class PrecomputeConfig:
    """Latent precompute: encode every image shard once, in a Ray Data pipeline."""

    actors: Annotated[int, Field(
        ge=0, description="encoder actors; 0: one per GPU, or on CPU one per CPU less a quarter of them kept for "
                          "decoding and writing, at most one per core on a local instance; at most one per shard")] = configs.execution(0)
    threads: Annotated[int, Field(
        ge=0, description="torch threads per CPU encoder actor; 0: the machine's cores shared by the actors")] = \
        configs.execution(0)
    batch_size: Annotated[int, Field(ge=1, description="images per encoder call")] = configs.execution(64)
    moments: Annotated[Literal["mean_logvar", "mean"], Field(
        description="store `mean_logvar` or `mean` alone")] = "mean_logvar"
    caption_embeddings: Annotated[bool, Field(
        description="also store each caption's embedding by the offline text encoder, so text-conditioned "
                    "training never runs it")] = True
    max_attempts: Annotated[int, Field(
        ge=1, description="tries per shard before it is reported as failed")] = configs.execution(3)
    use_gpu: Annotated[Literal["auto", "true", "false"], Field(
        description="`auto`, `true` or `false`")] = configs.execution("auto")
    mixed_precision: Annotated[precision.MixedPrecision, Field(
        description="`auto` (the encoder in bf16 autocast on GPU, fp32 on CPU), `bf16` or `no`")] = "auto"


def encoding_precision(config: PrecomputeConfig) -> str:
    """What the encoder computes in on this cluster, ``bf16`` or ``fp32``. It changes the
    latents by more than rounding, so it is part of each shard's digest and of the pipeline's
    dataset key, although ``use_gpu``, which decides it under ``mixed_precision: auto``, is
    an execution field."""
    if config.mixed_precision != "auto":
        return "bf16" if config.mixed_precision == "bf16" else "fp32"
    return "bf16" if cluster.use_gpu(config.use_gpu) else "fp32"


def task_digest(image_sha256: str, weights_sha256: str, config: PrecomputeConfig, encoding: str) -> str:
    """Identifies one latent shard: its image shard, the autoencoder's weights, the config's
    identity and the encoder's precision (:func:`encoding_precision`)."""
    return configs.key(config, image=image_sha256, weights=weights_sha256, encoding=encoding,
                       format=[latent_shards.FORMAT_NAME, latent_shards.FORMAT_VERSION])


def _read_part(url: str, task: EncodeTask) -> latent_shards.LatentShardInfo | None:
    try:
        body = json.loads(storage.read_text(url))
    except (storage.NotFound, json.JSONDecodeError):
        return None
    return latent_shards.LatentShardInfo(**body["shard"]) if body.get("digest") == task.digest else None


def _previous_shards(dest: str, weights_sha256: str, config: PrecomputeConfig) -> dict[str, latent_shards.LatentShardInfo]:
    """The shards of the manifest already at ``dest`` when it was written by this job's
    identity (autoencoder weights, config), by name; else none."""
    try:
        previous = latent_shards.read_manifest(dest)
        same = (previous.autoencoder.weights_sha256 == weights_sha256 and configs.identity(
            configs.from_dict(PrecomputeConfig, previous.config)) == configs.identity(config))
    except (image_shards.ManifestError, configs.ConfigError, storage.StorageError, TypeError, ValueError):
        return {}
    return {info.source_shard: info for info in previous.shards} if same else {}


def _find_done(dest: str, tasks: list[EncodeTask], weights_sha256: str,
               config: PrecomputeConfig) -> tuple[dict[int, latent_shards.LatentShardInfo], list[str]]:
    """The tasks whose latent shard is complete, from one listing of ``dest``: its tar and the
    part record of its digest are both there. Part records of another digest (an earlier
    config or autoencoder, or the digest-less names of older versions) are removed for the shards
    still to do, before any is written again, so a record never vouches for another run's tar.
    Also what the listing holds of image shards no longer in the input (an input that
    grew or shrank was sharded anew): removed once the new manifest is written."""
    try:
        listed = {entry.url for entry in storage.list_prefix(dest)}
    except storage.NotFound:
        return {}, []
    previous = _previous_shards(dest, weights_sha256, config) if image_shards.manifest_url(dest) in listed else {}
    parts_of: dict[str, list[str]] = {}
    for url in listed:
        if storage.dirname(url) == storage.join(dest, image_shards.PARTS):
            parts_of.setdefault(storage.basename(url).split(".", 1)[0], []).append(url)
    done = {}
    for task in tasks:
        record = image_shards.part_record_url(dest, task.shard, task.digest)
        if task.output_url in listed and record in listed:
            info = previous.get(task.shard)
            if info is None or info.source_sha256 != task.image_sha256:
                info = _read_part(record, task)  # finished by a run that was killed before its manifest
            if info is not None:
                done[task.index] = info
                continue
        for stale in parts_of.get(task.shard.removesuffix(".tar"), []):
            storage.delete(stale)
    current = {task.shard.removesuffix(".tar") for task in tasks}
    gone = [url for name, urls in parts_of.items() if name not in current for url in urls]
    gone += [url for url in listed if storage.dirname(url) == dest.rstrip("/") and storage.basename(url).startswith("shard-")
             and storage.basename(url).removesuffix(".tar") not in current]
    return done, gone


@dataclass(frozen=True)
class Placement:
    """How the pipeline sits on the cluster: encoder actors and the resources each stage asks."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    tasks: int  # decode tasks at a time, and as many write tasks
    task_cpus: float  # each decode or write task
    threads: int  # torch intra-op threads per CPU encoder


def placement(requested: int, shards: int, cpus: float, gpus: float, cores: int, gpu: bool,
              threads: int = 0, local: bool = False, node_cpus: float = 0.0) -> Placement:
    """GPU: one actor per GPU (or ``requested``), two decode tasks per actor (a guess, not yet
    measured on a GPU: a GPU encoder outruns one decoding core), a CPU each. CPU: a quarter
    of the CPUs (at most one) is kept for decoding and writing, so that the actors can never
    starve them, and the rest shared by the actors, on a ``local`` instance (where Ray
    advertises more logical CPUs than the machine has ``cores``) one per core at most; a CPU
    encoder is some thirty times slower than a decoder (measured: 64-px digits, 7.5 s against
    0.22 s a shard), so one decode task per four actors keeps them fed. The CPUs kept are the
    cluster's, and nodes are not shared: an actor asks at most its smallest node's CPUs
    (``node_cpus``) less a decode task's, so a decode task fits beside it on any node (three
    1-CPU nodes: three quarters of a CPU per actor left a quarter on each, and no room for a
    task asking three eighths).

    Every concurrent task is a worker process that imports torch (webdataset does) before
    its first shard, a few CPU-seconds each: more tasks than the encoders need would take
    those seconds from the encoders."""
    if gpu:
        count = max(1, min(requested or int(gpus) or 1, shards))
        return Placement(count, 1.0, 1.0, 2 * count, 1.0, 1)
    reserve = min(1.0, cpus / 4)
    # One actor per core at most: a local Ray advertises more logical CPUs than the machine
    # has cores, and each extra actor is an extra autoencoder import and load (about 11
    # CPU-seconds on the development VM) competing with the others for the same cores.
    count = max(1, min(requested or math.floor(min(cpus - reserve, cores) if local else cpus - reserve), shards))
    decode_cpus = reserve / 2
    actor_cpus = min(1.0, (cpus - reserve) / count)
    if node_cpus:
        actor_cpus = min(actor_cpus, node_cpus - decode_cpus)
    # Intra-op threads: the machine's cores shared by the actors.
    return Placement(count, actor_cpus, 0.0, math.ceil(count / 4), decode_cpus,
                     threads or max(1, int(min(cpus, cores)) // count))


@dataclass(frozen=True)
class PrecomputeOutcome:
    manifest: latent_shards.LatentManifest
    dest: str
    written: int
    skipped: int
    seconds: float

    def summary(self) -> str:
        line = (
            f"precompute: {self.manifest.summary()} -> {self.dest} "
            f"[{self.written} shards encoded, {self.skipped} already complete, {self.seconds:.1f}s]"
        )
        for failed in self.manifest.failed_shards:
            line += f"\n  FAILED {failed['source_shard']}: {failed['error']}"
        return line


def precompute(
    image_dataset: str,
    dest: str,
    autoencoder_dir: str | Path,
    ref: latent_shards.AutoencoderRef,
    config: PrecomputeConfig,
    progress: bool = True,
) -> PrecomputeOutcome:
    """Encode every shard of ``image_dataset`` into latent shards at ``dest``."""
    started = time.perf_counter()
    image_dataset, dest = storage.absolute(image_dataset), storage.absolute(dest)
    manifest_text = storage.read_text(image_shards.manifest_url(image_dataset))
    image_manifest = image_shards.ImageManifest.from_json(manifest_text, where=image_dataset)
    info = autoencoders.read_info(autoencoder_dir)
    if info.weights_sha256 != ref.weights_sha256:
        raise latent_shards.LineageError(f"{autoencoder_dir} does not hold the autoencoder {ref.uri} names")
    resolution = int(image_manifest.config["resolution"])
    if resolution != info.resolution:
        raise latent_shards.LineageError(
            f"{image_dataset}: its images are {resolution} px, and the autoencoder {ref.uri} was trained at "
            f"{info.resolution} px: shard at {info.resolution} px (shard.resolution) or train an autoencoder on "
            f"these shards")
    storage.remove_stale_temporaries(dest)

    encoding = encoding_precision(config)
    tasks = [
        EncodeTask(i, url, shard.sha256, storage.join(dest, shard.url),
                   task_digest(shard.sha256, info.weights_sha256, config, encoding))
        for i, (url, shard) in enumerate(zip(image_shards.shard_urls(image_dataset, image_manifest), image_manifest.shards))
    ]
    results, gone = _find_done(dest, tasks, info.weights_sha256, config)
    skipped = len(results)
    todo = [task for task in tasks if task.index not in results]
    failures: dict[int, str] = {}
    if todo:
        with Progress("precompute", len(todo), "shard", enabled=progress) as bar:
            for _ in range(config.max_attempts):
                failures = _encode_round(todo, autoencoder_dir, config, results, bar)
                todo = [task for task in todo if task.index in failures]
                if not todo:
                    break
            bar.advance(len(failures))

    infos = tuple(results[i] for i in sorted(results))
    manifest = latent_shards.LatentManifest(
        image_dataset=image_dataset,
        image_manifest_sha256=hashlib.sha256(manifest_text.encode()).hexdigest(),
        autoencoder=ref,
        latent_shape=info.latent_shape(resolution),
        moments=config.moments,
        num_samples=sum(s.num_samples for s in infos),
        shards=infos,
        failed_shards=tuple({"source_shard": tasks[i].shard, "error": failures[i]} for i in sorted(failures)),
        class_names=image_manifest.class_names,
        config=configs.to_dict(config),
        text_encoder=text_encoder.TEXT_ENCODER if config.caption_embeddings else None,
    )
    storage.write_text(image_shards.manifest_url(dest), manifest.to_json())
    for url in gone:
        storage.delete(url)
    return PrecomputeOutcome(manifest, dest, len(tasks) - skipped - len(failures), skipped, time.perf_counter() - started)


def _encode_round(tasks: list[EncodeTask], autoencoder_dir: str | Path, config: PrecomputeConfig,
                  results: dict[int, latent_shards.LatentShardInfo], bar: Progress) -> dict[int, str]:
    """One pass of the pipeline over ``tasks``: each shard written goes into ``results``; the
    error of each that was not, by index."""
    import ray

    cluster.ensure_ray()
    gpu = cluster.use_gpu(config.use_gpu)
    resources = ray.cluster_resources()
    smallest = min((node["Resources"]["CPU"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")),
                   default=0.0)
    place = placement(config.actors, len(tasks), resources.get("CPU", 1.0), resources.get("GPU", 0.0),
                      os.cpu_count() or 1, gpu, config.threads, local=not os.environ.get("RAY_ADDRESS"),
                      node_cpus=smallest)
    files = {path.name: path.read_bytes() for path in Path(autoencoder_dir).iterdir() if path.is_file()}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the stage's own bar counts shards
    # Ray Data logs a warning, once per process, that its bars are off: that is intended.
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    context.print_on_execution_start = False
    if console.quiet():  # its INFO lines ("execution finished in …") stay in its log file
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)

    rows = ray.data.from_items([{"task": task.to_json()} for task in tasks], override_num_blocks=len(tasks))
    with warnings.catch_warnings():
        # Ray Data has no named parameter for an actor's task retries yet: max_task_retries
        # travels in ray_remote_args, which it marks as deprecated.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        reach = cluster.storage_runtime_env()  # the driver's S3 endpoint, whatever the nodes were started with
        dataset = (
            rows.map(decode_shard, compute=ray.data.TaskPoolStrategy(size=place.tasks), num_cpus=place.task_cpus,
                     **reach and {"runtime_env": reach})
            .map(LatentEncoder, compute=ray.data.ActorPoolStrategy(size=place.actors), num_cpus=place.actor_cpus,
                 num_gpus=place.actor_gpus, max_task_retries=config.max_attempts - 1, **reach and {"runtime_env": reach},
                 fn_constructor_kwargs=dict(files=ray.put(files), batch_size=config.batch_size, moments=config.moments,
                                            use_gpu=gpu, threads=place.threads,
                                            caption_embeddings=config.caption_embeddings,
                                            mixed_precision=config.mixed_precision))
            .map(write_latent_shard, compute=ray.data.TaskPoolStrategy(size=place.tasks), num_cpus=place.task_cpus,
                 **reach and {"runtime_env": reach})
        )
    errors: dict[int, str] = {}
    try:
        with console.native_lines_to(state.state_dir() / "logs" / "ray-driver.log"):
            for row in dataset.iter_rows():
                index = EncodeTask.from_json(row["task"]).index
                if row["error"]:
                    errors[index] = row["error"]
                else:
                    results[index] = latent_shards.LatentShardInfo(**json.loads(row["info"]))
                    bar.advance()
    except Exception as exc:  # the pipeline itself failed: an actor out of restarts, the cluster lost
        cause = f"precompute pipeline failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        errors |= {task.index: cause for task in tasks if task.index not in results and task.index not in errors}
    return errors
