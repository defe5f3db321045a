"""The diffusion stage: train a denoising UNet on latent shards across Ray Train workers.

Each worker streams its own disjoint, per-epoch reshuffled subset of latent shards, draws
a latent from the stored moments (times the autoencoder's scale factor), noises it with
diffusers' ``DDPMScheduler`` and regresses the ε or v target (``training/diffusion.py``).
DDP averages gradients; rank 0 logs to MLflow. Checkpoints (UNet and EMA weights as
safetensors, optimizer and LR-scheduler state, RNG state, data position, the config) go
through Ray Train, so a replaced worker, or the same job run again, resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from data import config as configs
from data import latents as latent_format
from data import shards, storage
from serving import model as model_format
from serving.sampler import Sampler, grid as grid_image
from training import checkpoints, diffusion, launch, registry, tracking, unet as unets


@dataclass(frozen=True)
class DiffusionConfig:
    """Configuration of the diffusion stage (section ``train:`` of a config file)."""

    preset: Literal["tiny", "base"] = "tiny"
    conditioning: Literal["class", "text", "none"] = "class"
    noise: diffusion.NoiseSchedule = field(default_factory=diffusion.NoiseSchedule)
    loss_weighting: Literal["uniform", "min_snr"] = "min_snr"
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    cond_dropout: float = 0.1  # classifier-free guidance: share of samples trained unconditionally
    steps: int = 2000
    batch_size: int = 64  # per worker, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_factor: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_storage: str = ""  # folder or s3:// prefix for Ray Train checkpoints; empty: the state folder
    log_every: int = 25
    sample_every: int = 0  # steps between sample grids in MLflow; 0: only at the end
    max_failures: int = 3  # worker failures Ray Train recovers from
    max_bad_steps: int = 5  # consecutive non-finite losses before restoring the last checkpoint
    shuffle_buffer: int = 1000
    autoencoder: str = ""  # model URI; empty: the one named in the latent manifest
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    sample_steps: int = 25
    guidance: float = 3.0
    experiment: str = "ldmflow-diffusion"
    model_name: str = "ldmflow-diffusion"  # registered model; each run adds a version with alias "candidate"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "workers", "checkpoint_every", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError("cond_dropout must be in [0, 1)")


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: the run goes back to its last checkpoint."""


@dataclass
class LatentBatch:
    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor | None
    labels: torch.Tensor  # (B,), -1 where unknown
    captions: list[str]


def collate_latents(samples: list[latent_format.LatentSample]) -> LatentBatch:
    logvar = None
    if samples[0].logvar is not None:
        logvar = torch.from_numpy(np.stack([s.logvar for s in samples]))
    return LatentBatch(
        torch.from_numpy(np.stack([s.mean for s in samples])),
        logvar,
        torch.tensor([s.label for s in samples], dtype=torch.long),
        [s.caption for s in samples],
    )


def draw_latents(batch: LatentBatch, scale_factor: float, generator: torch.Generator) -> torch.Tensor:
    """z = (μ + σ·ε) · scale_factor from the stored moments (μ alone when no log-variance)."""
    z = batch.mean
    if batch.logvar is not None:
        z = z + torch.exp(0.5 * batch.logvar) * torch.randn(z.shape, generator=generator)
    return z * scale_factor


def denoising_loss(model, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   cond: dict[str, torch.Tensor], config: DiffusionConfig, autocast: bool) -> torch.Tensor:
    """One batch's loss: noise x0 to ``timesteps``, predict, weight (the model is an argument)."""
    x_t = scheduler.add_noise(x0, noise, timesteps)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
        prediction = model(x_t, timesteps, **cond, return_dict=False)[0]
    return diffusion.diffusion_loss(
        prediction,
        diffusion.target(scheduler, x0, noise, timesteps, config.noise.prediction_type),
        timesteps,
        scheduler.alphas_cumprod,
        weighting=config.loss_weighting,
        gamma=config.snr_gamma,
        prediction_type=config.noise.prediction_type,
    )


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether every rank's loss is finite (all ranks must agree to skip a step together)."""
    flag = torch.tensor([1.0 if torch.isfinite(loss).all() else 0.0], device=loss.device)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = configs.from_dict(DiffusionConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    autocast = device.type == "cuda" and config.mixed_precision in ("auto", "bf16")
    latent_shape = tuple(loop_config["latent_shape"])
    num_classes = len(loop_config["class_names"] or ())
    scale_factor = float(loop_config["scale_factor"])

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = unets.build_unet(config.preset, config.conditioning, latent_shape, num_classes)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: diffusion.lr_factor(s, config.warmup_steps, config.steps, config.min_lr_factor))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    position = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "bad_steps": 0, "skipped": 0}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = checkpoints.load(folder, modules={"unet": model, "ema": ema},
                                     optimizers={"optimizer": optimizer, "lr_schedule": lr_schedule})
            if (Path(folder) / f"rng-{rank}.safetensors").exists():
                generator.set_state(checkpoints.load_tensor(folder, f"rng-{rank}"))
        positions = saved["position"]
        if rank < len(positions) and len(positions) == world:
            position.update(positions[rank])
        else:  # resumed with another number of workers: same step, the epoch starts afresh
            position.update(step=saved["step"], epoch=positions[0]["epoch"] + 1, batches_in_epoch=0)

    ddp_model = ray.train.torch.prepare_model(model)
    ema.to(device)
    scheduler = diffusion.training_scheduler(config.noise)
    text_encoder = unets.TextEncoder(str(device)) if config.conditioning == "text" else None
    stream = shards.ShardStream(loop_config["shard_urls"], rank=rank, world_size=world, shuffle_buffer=config.shuffle_buffer,
                                seed=config.seed, decode=latent_format.decode_latent)
    loader = torch.utils.data.DataLoader(stream, batch_size=config.batch_size, collate_fn=collate_latents, drop_last=True)
    tracker = _RankZeroTracker(loop_config.get("run_id"), loop_config.get("tracking_uri"), rank)
    if checkpoint and position["step"]:
        tracker.log(position["step"], resumed_from_step=position["step"])  # a restart, visible in MLflow

    step, epoch, batches_done = position["step"], position["epoch"], position["batches_in_epoch"]
    bad_steps, skipped, micro = position["bad_steps"], position["skipped"], 0
    window_started, window_samples, grad_norm = time.perf_counter(), 0, torch.tensor(0.0)
    while step < config.steps:
        stream.set_epoch(epoch)
        index = -1
        for index, batch in enumerate(loader):
            if index < batches_done:  # resuming inside an epoch: skip what was already trained on
                continue
            x0 = draw_latents(batch, scale_factor, generator).to(device)
            noise = diffusion.offset_noise(torch.randn(x0.shape, generator=generator), config.noise_offset, generator).to(device)
            timesteps = torch.randint(0, config.noise.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
            known = torch.where(batch.labels >= 0, batch.labels, torch.full_like(batch.labels, num_classes))  # unlabelled: null
            labels = diffusion.drop_labels(known, config.cond_dropout, num_classes, generator).to(device)
            text = None
            if text_encoder is not None:
                text = diffusion.drop_embeddings(text_encoder(batch.captions), config.cond_dropout, generator).to(device)
            cond = unets.conditioning_kwargs(config.conditioning, labels, text)
            accumulating = micro + 1 < config.grad_accum and world > 1  # sync gradients on the last micro-batch only
            with ddp_model.no_sync() if accumulating else contextlib.nullcontext():
                loss = denoising_loss(ddp_model, scheduler, x0, noise, timesteps, cond, config, autocast)
                batches_done = index + 1
                finite = _all_finite(loss, world)
                if finite:
                    (loss / config.grad_accum).backward()
            micro += 1
            if finite and micro == config.grad_accum:
                grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), config.grad_clip)
                finite = bool(torch.isfinite(grad_norm))  # gradients are synchronised: every rank agrees
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                bad_steps += 1
                skipped += 1
                tracker.log(step, skipped_nonfinite_steps=skipped)
                if bad_steps >= config.max_bad_steps:
                    raise NonFiniteLoss(f"{bad_steps} consecutive non-finite losses at step {step}")
                continue
            bad_steps = 0
            window_samples += x0.shape[0] * world
            if micro < config.grad_accum:
                continue
            micro = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_schedule.step()
            diffusion.ema_update(ema.parameters(), model.parameters(),
                                 diffusion.ema_decay(step, config.ema_decay, config.ema_warmup))
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_started
                tracker.log(step, loss=loss.item(), lr=lr_schedule.get_last_lr()[0], grad_norm=float(grad_norm),
                            latents_per_s=window_samples / max(elapsed, 1e-9))
                window_started, window_samples = time.perf_counter(), 0
            if config.sample_every and step % config.sample_every == 0 and rank == 0:
                tracker.log_grid(step, ema, config, loop_config, scale_factor)
            if step % config.checkpoint_every == 0 or step == config.steps:
                _report_checkpoint(step, epoch, batches_done, skipped, loss.item(), rank, world, model, ema, optimizer,
                                   lr_schedule, generator, loop_config["config"])
            if step >= config.steps:
                break
        else:
            if index < 0:  # an epoch without a single batch would spin for ever
                raise RuntimeError(f"rank {rank} read no batch in epoch {epoch}: {stream.skips.skipped} samples or "
                                   f"shards skipped ({'; '.join(stream.skips.errors[:3])})")
            epoch, batches_done = epoch + 1, 0


def _report_checkpoint(step, epoch, batches_done, skipped, loss, rank, world, model, ema, optimizer, lr_schedule,
                       generator, config):
    """Every rank saves its RNG state and data position; rank 0 adds weights and optimizer."""
    import ray.train

    position = {"step": step, "epoch": epoch, "batches_in_epoch": batches_done, "bad_steps": 0, "skipped": skipped}
    positions = [None] * world
    states = [None] * world
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(positions, position)
        torch.distributed.all_gather_object(states, generator.get_state())
    else:
        positions, states = [position], [generator.get_state()]
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if rank == 0:
            checkpoints.save(folder, modules={"unet": model, "ema": ema},
                             optimizers={"optimizer": optimizer, "lr_schedule": lr_schedule},
                             state={"position": positions, "config": config, "step": step})
            for r, state in enumerate(states):
                checkpoints.save_tensor(folder, f"rng-{r}", state)
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"step": step, "loss": loss}, checkpoint=saved)


class _RankZeroTracker(tracking.RankZeroTracker):
    """Rank 0's MLflow logging, plus periodic sample grids."""

    def log_grid(self, step: int, ema, config: DiffusionConfig, loop_config: dict, scale_factor: float) -> None:
        """A grid of EMA samples decoded with the autoencoder (its files come by object store)."""
        if self.client is None or loop_config.get("autoencoder_files") is None:
            return
        if not hasattr(self, "vae"):
            import ray

            from data import autoencoder as autoencoder_format

            folder = Path(tempfile.mkdtemp(prefix="ldmflow-vae-"))
            for name, data in ray.get(loop_config["autoencoder_files"]).items():
                (folder / name).write_bytes(data)
            self.vae, _ = autoencoder_format.load(folder)
        device = next(ema.parameters()).device
        info = model_info(config, loop_config["latent_shape"], loop_config["class_names"], scale_factor,
                          self.vae, autoencoder={}, lineage={})
        grid, _ = sample_grid(Sampler(ema.to("cpu"), self.vae, info), loop_config.get("prompts"))
        ema.to(device)
        self.client.log_image(self.run_id, grid, f"samples/step-{step:07d}.png")


def run_name(latent_manifest_sha: str, config: DiffusionConfig) -> str:
    """Deterministic per (latent set, config): the same job run again resumes its checkpoints."""
    body = json.dumps({"latents": latent_manifest_sha, "config": configs.to_dict(config)}, sort_keys=True)
    return "diffusion-" + hashlib.sha256(body.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# The driver: lineage guard, fit, EMA model folder, samples, MLflow


@dataclass(frozen=True)
class TrainedDiffusion:
    folder: Path  # the model folder (serving/model.py format)
    run_id: str
    model_uri: str  # models:/NAME/VERSION, also aliased "candidate"
    metrics: dict[str, float]
    grid: Path

    def summary(self) -> str:
        accuracy = self.metrics.get("class_accuracy")
        quality = f", samples recognised as their class {accuracy:.0%} of the time" if accuracy is not None else ""
        return (f"train: registered {self.model_uri} (alias {registry.CANDIDATE}) from MLflow run {self.run_id}{quality}; "
                f"sample grid {self.grid}")


def resolve_autoencoder(manifest: latent_format.LatentManifest, uri: str = ""):
    """The autoencoder for a latent set (model, info, local folder), refused unless it is the
    one that made the latents."""
    from data import autoencoder as autoencoder_format

    uri = uri or manifest.autoencoder.uri
    folder, _ = tracking.resolve(uri)
    vae, info = autoencoder_format.load(folder)
    latent_format.check_lineage(manifest, info.weights_sha256, expected_uri=uri)
    return vae, info, folder


def train(latents_url: str, config: DiffusionConfig, *, storage_path: str | None = None, progress: bool = True) -> TrainedDiffusion:
    """Train on the latent shards at ``latents_url``; log the EMA model and samples to MLflow."""
    from data import cluster

    latents_url = storage.absolute(latents_url)
    manifest_text = storage.read_text(shards.manifest_url(latents_url))
    manifest = latent_format.LatentManifest.from_json(manifest_text, where=latents_url)
    manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
    vae, vae_info, vae_folder = resolve_autoencoder(manifest, config.autoencoder)
    if config.conditioning == "class" and not manifest.class_names:
        raise ValueError(f"{latents_url}: class conditioning needs labelled data (the manifest has no class names)")
    name = run_name(manifest_sha, config)

    client = tracking.client()
    experiment = tracking.experiment_id(config.experiment)
    for stale in client.search_runs([experiment], f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'"):
        client.set_terminated(stale.info.run_id, status="KILLED")  # its driver died; this run resumes the job
    run = client.create_run(experiment, run_name=name, tags={
        "ldmflow.stage": "diffusion", "ldmflow.latents": latents_url, "ldmflow.latent_manifest_sha256": manifest_sha,
        "ldmflow.autoencoder": manifest.autoencoder.uri, "ldmflow.autoencoder_sha256": vae_info.weights_sha256})
    run_id = run.info.run_id
    for key, value in _flatten(configs.to_dict(config)).items():
        client.log_param(run_id, key, value)

    cluster.ensure_ray()
    autoencoder_files = None
    if config.sample_every:
        import ray

        autoencoder_files = ray.put({p.name: p.read_bytes() for p in Path(vae_folder).iterdir() if p.is_file()})
    urls = latent_format.shard_urls(latents_url, manifest)
    workers = config.workers
    if len(urls) < workers:
        print(f"train: {len(urls)} latent shards for {workers} workers: splitting by sample instead of by shard")
    loop_config = {
        "config": configs.to_dict(config), "shard_urls": urls, "latent_shape": list(manifest.latent_shape),
        "class_names": list(manifest.class_names or ()), "scale_factor": vae_info.scale_factor,
        "run_id": run_id, "tracking_uri": tracking.tracking_uri(), "autoencoder_files": autoencoder_files,
        "prompts": grid_prompts(urls) if config.conditioning == "text" else None,
    }
    result = launch.fit(train_worker, loop_config, name=name, workers=workers, use_gpu=config.use_gpu,
                        max_failures=config.max_failures, storage_url=storage_path or config.checkpoint_storage or None,
                        run_id=run_id)

    num_classes = len(manifest.class_names or ())
    ema = unets.build_unet(config.preset, config.conditioning, tuple(manifest.latent_shape), num_classes)
    with result.checkpoint.as_directory() as folder:
        checkpoints.load_weights(folder, "ema", ema)
    ema.eval()

    out = tracking.state_dir() / "runs" / f"{name}-{run_id[:8]}"  # the grid and model, also in MLflow
    lineage = {"run_id": run_id, "latents": latents_url, "latent_manifest_sha256": manifest_sha,
               "image_dataset": manifest.image_dataset, "image_manifest_sha256": manifest.image_manifest_sha256}
    info = model_info(config, manifest.latent_shape, manifest.class_names, vae_info.scale_factor, vae,
                      autoencoder=vars(manifest.autoencoder), lineage=lineage)
    model_folder = out / "model"
    model_format.save(model_folder, ema, vae_folder, info)
    prompts = grid_prompts(urls) if config.conditioning == "text" else None
    grid, images = sample_grid(Sampler(ema, vae, info), prompts)
    grid_path = out / "samples.png"
    grid.save(grid_path)
    metrics: dict[str, float] = {}
    if config.conditioning == "class":
        from training import evaluation

        classifier = evaluation.classifier_for(manifest.image_dataset)
        metrics["class_accuracy"] = evaluation.class_accuracy(classifier, images)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(grid_path))
    registered = registry.register(model_folder, config.model_name, run_id)
    client.set_terminated(run_id)
    return TrainedDiffusion(model_folder, run_id, registered.uri, metrics, grid_path)


def model_info(config: DiffusionConfig, latent_shape, class_names, scale_factor: float, vae, *,
               autoencoder: dict, lineage: dict) -> model_format.ModelInfo:
    """What ``ldmflow.json`` says of a model trained with ``config``."""
    from data import autoencoder as autoencoder_format

    latent_shape = [int(x) for x in latent_shape]
    return model_format.ModelInfo(
        conditioning=config.conditioning,
        noise=configs.to_dict(config.noise),
        latent_shape=latent_shape,
        resolution=latent_shape[1] * autoencoder_format.downsample_factor(vae),
        scale_factor=float(scale_factor),
        class_names=list(class_names) if class_names else None,
        text_encoder=model_format.TEXT_ENCODER if config.conditioning == "text" else None,
        defaults=model_format.SamplerDefaults(config.sampler, config.sample_steps, config.guidance),
        autoencoder=autoencoder,
        lineage=lineage,
        config=configs.to_dict(config),
    )


def sample_grid(sampler: Sampler, prompts: list[str] | None = None, per_row: int = 8, seed: int = 1234):
    """Fixed-seed samples with the model's sampler defaults, a row per class (``class``), per
    prompt (``text``) or one row (``none``): (PIL grid, {row key: images (B, 3, H, W)})."""
    conditioning = sampler.info.conditioning
    if conditioning == "class":
        keys: list = list(range(len(sampler.info.class_names or ())))
        jobs = [sampler.job(label=k, n=per_row, seed=seed + row * per_row) for row, k in enumerate(keys)]
    elif conditioning == "text":
        keys = list(prompts or [""])
        jobs = [sampler.job(prompt=k, n=per_row, seed=seed + row * per_row) for row, k in enumerate(keys)]
    else:
        keys = [None]
        jobs = [sampler.job(n=per_row, seed=seed)]
    rows = sampler.run(jobs)
    return grid_image(rows), dict(zip(keys, rows))


def grid_prompts(urls: list[str], limit: int = 10) -> list[str]:
    """Distinct captions of the first latent shard, sorted: the prompts of text-model grids."""
    stream = shards.ShardStream(urls[:1], shuffle_buffer=0, decode=latent_format.decode_latent)
    return sorted({sample.caption for sample in stream if sample.caption})[:limit]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat
