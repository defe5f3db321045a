"""Latent precompute: encode every image shard once, on a pool of Ray actors.

Each actor is a callable class (:class:`LatentEncoder`): it loads the autoencoder once in
``__init__`` (GPU when it has one, CPU otherwise) and encodes one whole image shard per
call into one latent shard, written atomically. The driver hands out one shard per task.

Why a hand-rolled pool over ``ray.util.ActorPool`` or Ray Data: the unit of work is a
whole shard with an atomic output and a resumable record, not a stream of rows, so Ray
Data's batch-level ``map_batches`` would need the shard boundaries rebuilt afterwards;
and ``ActorPool`` neither replaces an actor that died nor retries its task. Here a dead
actor is replaced and its shard requeued, a shard whose encoding raises is retried up to
``max_attempts`` and then reported as failed in the manifest and the summary.

Resumable: a shard whose part record (``_parts/shard-i.json``) matches its digest (input
shard sha256, autoencoder weights sha256, moments, format) is skipped; the manifest is
written last, from the records, so a killed and rerun job ends with the manifest of an
unbroken one.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from ldmflow import configs
from ldmflow.console import Progress
from ldmflow.data import cluster, image_shards, latent_shards, shard_stream, storage
from ldmflow.model import autoencoders, precision, unets

PARTS = "_parts"


@configs.stage_config
class PrecomputeConfig:
    """Latent precompute: encode every image shard once, on a pool of Ray actors."""

    actors: Annotated[int, Field(
        ge=0, description="encoder actors; 0: one per CPU (or GPU), at most one per shard")] = configs.execution(0)
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


@dataclass(frozen=True)
class EncodeTask:
    index: int
    image_url: str
    image_sha256: str
    output_url: str
    digest: str

    @property
    def shard(self) -> str:
        return storage.basename(self.image_url)


class LatentEncoder:
    """A Ray actor: the autoencoder loaded once, one image shard → one latent shard per call."""

    def __init__(self, files: dict[str, bytes], batch_size: int, moments: str, use_gpu: bool = False, threads: int = 1,
                 caption_embeddings: bool = False, mixed_precision: precision.MixedPrecision = "no") -> None:
        import os

        import torch

        self.torch = torch
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vae, self.info = autoencoders.load_files(files, self.device)
        self.batch_size = batch_size
        self.moments = moments
        self.caption_embeddings = caption_embeddings
        self.mixed_precision = mixed_precision
        self.text_encoder = None  # loaded at the first caption

    def __call__(self, task: EncodeTask) -> latent_shards.LatentShardInfo:
        data = storage.read_bytes(task.image_url)
        if hashlib.sha256(data).hexdigest() != task.image_sha256:
            raise ValueError(f"{task.image_url}: corrupt image shard (sha256 differs from its manifest)")

        def fail(exc: Exception) -> bool:
            raise ValueError(f"{task.image_url}: corrupt image shard: {exc}") from exc

        raws = list(shard_stream.samples_from_streams([{"url": task.image_url, "stream": io.BytesIO(data)}], fail))
        out = []
        for start in range(0, len(raws), self.batch_size):
            batch = raws[start : start + self.batch_size]
            images = np.stack([image_shards.decode_sample(raw).image for raw in batch])
            mean, logvar = self.encode(images)
            texts = self.embed_captions(batch)
            for i, raw in enumerate(batch):
                members = {"__key__": raw["__key__"]}
                members |= latent_shards.latent_sample(mean[i], logvar[i] if self.moments == "mean_logvar" else None)
                if texts.get(i) is not None:
                    members[latent_shards.KEY_TEXT] = latent_shards.encode_array(texts[i])
                for key in (image_shards.KEY_CAPTION, image_shards.KEY_LABEL, image_shards.KEY_META):
                    if key in raw:
                        members[key] = raw[key]
                out.append(members)
        written = image_shards.write_shard(task.output_url, out)
        return latent_shards.LatentShardInfo(task.shard, written.num_samples, written.bytes, written.sha256, task.shard, task.image_sha256)

    def embed_captions(self, batch: list[dict[str, Any]]) -> dict[int, np.ndarray]:
        """The embedding of each captioned sample of ``batch``, by its index (none without
        ``caption_embeddings``)."""
        if not self.caption_embeddings:
            return {}
        captions = {i: raw[image_shards.KEY_CAPTION].decode("utf-8") for i, raw in enumerate(batch)
                    if raw.get(image_shards.KEY_CAPTION)}
        if not captions:
            return {}
        if self.text_encoder is None:
            self.text_encoder = unets.TextEncoder(self.device)
        vectors = self.text_encoder(list(captions.values()))[:, 0].numpy().astype(np.float32)
        return dict(zip(captions, vectors))

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] → posterior mean and log-variance, (B, C, h, w) float32
        (the encoder run in bf16 under ``mixed_precision``)."""
        with self.torch.no_grad(), precision.autocast(self.mixed_precision, self.device):
            x = self.torch.from_numpy(images).to(self.device)
            posterior = self.vae.encode(x).latent_dist
            return posterior.mean.float().cpu().numpy(), posterior.logvar.float().cpu().numpy()


def task_digest(image_sha256: str, weights_sha256: str, config: PrecomputeConfig) -> str:
    """Identifies one latent shard: its image shard, the autoencoder's weights, the config's identity."""
    return configs.key(config, image=image_sha256, weights=weights_sha256,
                       format=[latent_shards.FORMAT_NAME, latent_shards.FORMAT_VERSION])


def part_url(dest: str, shard: str) -> str:
    return storage.join(dest, PARTS, shard.replace(".tar", ".json"))


def _completed(dest: str, task: EncodeTask) -> latent_shards.LatentShardInfo | None:
    try:
        body = json.loads(storage.read_text(part_url(dest, task.shard)))
    except (storage.NotFound, json.JSONDecodeError):
        return None
    if body.get("digest") != task.digest or not storage.exists(task.output_url):
        return None
    return latent_shards.LatentShardInfo(**body["shard"])


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
    import ray

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

    tasks = [
        EncodeTask(i, url, shard.sha256, storage.join(dest, shard.url), task_digest(shard.sha256, info.weights_sha256, config))
        for i, (url, shard) in enumerate(zip(image_shards.shard_urls(image_dataset, image_manifest), image_manifest.shards))
    ]
    results: dict[int, latent_shards.LatentShardInfo] = {}
    for task in tasks:
        done = _completed(dest, task)
        if done is not None:
            results[task.index] = done
    skipped = len(results)
    todo = deque(task for task in tasks if task.index not in results)
    failures: dict[int, str] = {}

    if todo:
        cluster.ensure_ray()
        gpu = cluster.use_gpu(config.use_gpu)
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        count = config.actors or max(1, int(resources.get("GPU", 1)) if gpu else cpus)
        count = min(count, len(todo))
        # Intra-op threads per actor: the cores not taken by the other actors (a local Ray
        # advertises more logical CPUs than cores, so count real cores where known).
        import os

        threads = max(1, min(cpus, os.cpu_count() or cpus) // count)
        files = {path.name: path.read_bytes() for path in Path(autoencoder_dir).iterdir() if path.is_file()}
        files_ref = ray.put(files)
        actor_class = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=0)(LatentEncoder)

        def new_actor():
            return actor_class.remote(files_ref, config.batch_size, config.moments, gpu, threads,
                                      config.caption_embeddings, config.mixed_precision)

        attempts: dict[int, int] = {}
        errors: dict[int, str] = {}
        pending: dict[Any, tuple[Any, EncodeTask]] = {}
        idle = [new_actor() for _ in range(count)]
        with Progress("precompute", len(todo), "shard", enabled=progress) as bar:
            while todo or pending:
                while todo and idle:
                    actor, task = idle.pop(), todo.popleft()
                    attempts[task.index] = attempts.get(task.index, 0) + 1
                    pending[actor.__call__.remote(task)] = (actor, task)
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor, task = pending.pop(ready[0])
                try:
                    shard_info = ray.get(ready[0])
                except ray.exceptions.RayActorError as exc:
                    ray.kill(actor)
                    idle.append(new_actor())
                    errors[task.index] = f"encoder actor died: {exc.__class__.__name__}"
                except ray.exceptions.RayTaskError as exc:
                    idle.append(actor)
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    errors[task.index] = f"{type(cause).__name__}: {cause}"
                else:
                    idle.append(actor)
                    results[task.index] = shard_info
                    part = {"digest": task.digest, "shard": asdict(shard_info)}
                    storage.write_text(part_url(dest, task.shard), json.dumps(part, sort_keys=True) + "\n")
                    bar.advance()
                    continue
                if attempts[task.index] < config.max_attempts:
                    todo.append(task)
                else:
                    failures[task.index] = errors[task.index]
                    bar.advance()
        for actor in idle:
            ray.kill(actor)

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
        text_encoder=unets.TEXT_ENCODER if config.caption_embeddings else None,
    )
    storage.write_text(image_shards.manifest_url(dest), manifest.to_json())
    return PrecomputeOutcome(manifest, dest, len(tasks) - skipped - len(failures), skipped, time.perf_counter() - started)
