"""The diffusion stage's Ray Train worker loop: latents in, a denoising UNet (and its EMA) out.

Each worker streams its own disjoint, per-epoch reshuffled subset of latent shards, draws
a latent from the stored moments (times the autoencoder's scale factor), noises it with
diffusers' ``DDPMScheduler`` and regresses the ε or v target (:mod:`ldmflow.training.diffusion`).
DDP averages the gradients, or FSDP shards the model (:mod:`ldmflow.training.parallel`);
rank 0 logs to MLflow. Checkpoints (UNet and EMA weights as safetensors, whole or sharded,
optimizer and LR-scheduler state, every rank's RNG state and data position, the config)
go through Ray Train, so a replaced worker, or the same job run again, resumes exactly.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ldmflow.data import latent_shards, shard_stream
from ldmflow.errors import LdmflowError
from ldmflow.model import inpainting, precision, schedules, text_encoder, unets
from ldmflow.registry import runs
from ldmflow.training import checkpoints, diffusion, loop, parallel

if TYPE_CHECKING:
    from ldmflow.training.stage_configs import DiffusionConfig


class NonFiniteLoss(LdmflowError, RuntimeError):
    """Too many consecutive non-finite losses: the run goes back to its last checkpoint."""


@dataclass
class LatentBatch:
    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor | None
    labels: torch.Tensor  # (B,), -1 where unknown
    captions: list[str]
    text: torch.Tensor  # (B, 1, D) stored caption embeddings, zeros where none is stored


def collate_latents(samples: list[latent_shards.LatentSample]) -> LatentBatch:
    logvar = None
    if samples[0].logvar is not None:
        logvar = torch.from_numpy(np.stack([s.logvar for s in samples]))
    text = torch.zeros(len(samples), 1, text_encoder.TEXT_DIM)
    for i, sample in enumerate(samples):
        if sample.text is not None:
            text[i, 0] = torch.from_numpy(sample.text)
    return LatentBatch(
        torch.from_numpy(np.stack([s.mean for s in samples])),
        logvar,
        torch.tensor([s.label for s in samples], dtype=torch.long),
        [s.caption for s in samples],
        text,
    )


def caption_embeddings(config: DiffusionConfig, stored: bool, device) -> Callable[[LatentBatch], torch.Tensor] | None:
    """How a batch's captions become the UNet's text input: the embeddings precompute stored
    (``stored``: made by the same encoder), else the text encoder run here; None without text
    conditioning."""
    if config.conditioning != "text":
        return None
    if stored:
        return lambda batch: batch.text
    encoder = text_encoder.SentenceEncoder(str(device))
    return lambda batch: encoder(batch.captions)


def draw_latents(batch: LatentBatch, scale_factor: float, generator: torch.Generator) -> torch.Tensor:
    """z = (μ + σ·ε) · scale_factor from the stored moments (μ alone when no log-variance)."""
    z = batch.mean
    if batch.logvar is not None:
        z = z + torch.exp(0.5 * batch.logvar) * torch.randn(z.shape, generator=generator)
    return z * scale_factor


def denoising_loss(model, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   cond: dict[str, torch.Tensor], config: DiffusionConfig, autocast: bool,
                   extra: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's loss: noise x0 to ``timesteps``, predict (with an inpainting model's
    ``extra`` input channels after the noisy latent's), weight (the model is an argument)."""
    x_t = scheduler.add_noise(x0, noise, timesteps)
    if extra is not None:
        x_t = torch.cat([x_t, extra], dim=1)
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


@dataclass
class Training:
    """A worker's training state: the UNet being trained (DDP-wrapped or FSDP-sharded), its
    EMA, the optimizer and LR schedule, and the RNG of the rank's noise and timesteps."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    build: Callable[[], torch.nn.Module]  # a fresh whole UNet of the same shape (a CPU copy of a sharded EMA)

    def checkpointed(self) -> dict[str, Any]:
        """What a checkpoint holds, as :func:`ldmflow.training.checkpoints.load_training` takes it."""
        return dict(modules={"unet": self.model, "ema": self.ema}, optimizers={"optimizer": (self.model, self.optimizer)},
                    schedules={"lr_schedule": self.lr_schedule})

    def averaged(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The EMA's tensors and the trained ones they follow. A frozen one (LoRA's base) is
        left out: its EMA stays bit-equal to its source, which rounding would not keep."""
        pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        return [e for e, _ in pairs], [p for _, p in pairs]


def build_training(config: DiffusionConfig, loop_config: dict[str, Any], rank: int, world: int, device) -> Training:
    """The UNet, built once (with the parent's weights when fine-tuning, and LoRA adapters),
    identical on every rank; its EMA; prepared for ``config.parallel``; AdamW and the warm-up
    then cosine schedule (torch's ``LambdaLR`` of :func:`ldmflow.training.diffusion.lr_factor`)."""
    shape = tuple(loop_config["latent_shape"])
    num_classes = len(loop_config["class_names"] or ())

    def build(weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        return unets.build(config.preset, config.conditioning, shape, num_classes, lora_rank=config.lora_rank,
                           weights=weights, inpainting=config.inpainting)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build(_parent_weights(loop_config))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    trained = parallel.prepare(model, ema, config.parallel, device, world)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: diffusion.lr_factor(s, config.warmup_steps, config.steps, config.min_lr_factor))
    return Training(trained, ema, optimizer, lr_schedule, torch.Generator().manual_seed(config.seed * 1000 + rank), build)


def _parent_weights(loop_config: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Fine-tuning: the parent model's EMA weights, from Ray's object store."""
    if loop_config.get("init_weights") is None:
        return None
    import ray
    from safetensors.torch import load as load_safetensors

    return load_safetensors(ray.get(loop_config["init_weights"]))


def restore_training(training: Training, rank: int, world: int) -> tuple[dict[str, Any], list[dict] | None]:
    """This rank's counters and every rank's data position from the run's last checkpoint
    (fresh ones, and None, on a fresh start). On another world size than the checkpoint's,
    the counters restart at its step (:func:`ldmflow.training.loop.rank_start` deals the data)."""
    position: dict[str, Any] = {"step": 0, "bad_steps": 0, "skipped": 0}

    def load(folder: str) -> dict[str, Any]:
        saved = checkpoints.load_training(folder, **training.checkpointed())
        if (Path(folder) / f"rng-{rank}.safetensors").exists():  # a rank the checkpoint's world had
            training.generator.set_state(checkpoints.load_tensor(folder, f"rng-{rank}"))
        return saved

    saved = loop.restore(load)
    if saved is None:
        return position, None
    positions = saved["position"]
    position.update(positions[rank] if len(positions) == world else {"step": saved["step"]})
    return position, [p["data"] for p in positions]


def noised_inputs(batch: LatentBatch, config: DiffusionConfig, scale_factor: float, num_classes: int,
                  embed: Callable[[LatentBatch], torch.Tensor] | None, generator: torch.Generator, device):
    """A batch's clean latents, noise, timesteps, conditioning (labels dropped to the null
    class, or embeddings to zero, at ``cond_dropout`` for classifier-free guidance), and an
    inpainting model's extra input channels under random masks (None for a plain model)."""
    x0 = draw_latents(batch, scale_factor, generator).to(device)
    noise = diffusion.offset_noise(torch.randn(x0.shape, generator=generator), config.noise_offset, generator).to(device)
    timesteps = torch.randint(0, config.noise.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
    known = torch.where(batch.labels >= 0, batch.labels, torch.full_like(batch.labels, num_classes))  # unlabelled: null
    labels = diffusion.drop_labels(known, config.cond_dropout, num_classes, generator).to(device)
    text = None
    if embed is not None:
        text = diffusion.drop_embeddings(embed(batch), config.cond_dropout, generator).to(device)
    extra = None
    if config.inpainting:
        cells = inpainting.training_masks(x0.shape[0], tuple(x0.shape[2:]), generator).to(device)
        extra = inpainting.conditioning_channels(x0, cells)
    return x0, noise, timesteps, unets.conditioning_kwargs(config.conditioning, labels, text), extra


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    from ldmflow.training.stage_configs import DiffusionConfig

    worker = loop.start(DiffusionConfig, loop_config)
    config, rank, world, device = worker.config, worker.rank, worker.world, worker.device
    run = config.ray_train
    autocast = precision.enabled(run.mixed_precision, device)
    num_classes = len(loop_config["class_names"] or ())
    scale_factor = float(loop_config["scale_factor"])
    training = build_training(config, loop_config, rank, world, device)
    position, saved_data = restore_training(training, rank, world)

    scheduler = schedules.training_scheduler(config.noise)
    embed = caption_embeddings(config, loop_config.get("stored_text", False), device)
    stream = shard_stream.ShardStream(loop_config["shard_urls"], rank=rank, world_size=world,
                                      shuffle_buffer=run.shuffle_buffer, seed=config.seed,
                                      decode=latent_shards.decode_latent, counts=loop_config.get("shard_counts"))
    batched, loader = loop.loader(stream, config.batch_size, collate_latents, workers=run.loader_workers,
                                  prefetch=run.prefetch_batches)
    data_start = loop.rank_start(stream, saved_data, max(1, run.loader_workers)) if saved_data else None
    tracker = GridTracker(loop_config, rank)
    if saved_data is not None and position["step"]:
        tracker.log(position["step"], resumed_from_step=position["step"])  # a restart, visible in MLflow

    model, optimizer, generator = training.model, training.optimizer, training.generator
    ema_targets, ema_sources = training.averaged()  # chosen once: the loop's hot path
    step, bad_steps, skipped, micro = position["step"], position["bad_steps"], position["skipped"], 0
    window_started, window_samples, grad_norm = time.perf_counter(), 0, torch.tensor(0.0)
    wait = loop.DataWait()
    for read, batch in loop.batches(batched, loader, rank, data_start, wait):
        if step >= config.steps:
            break
        x0, noise, timesteps, cond, extra = noised_inputs(batch, config, scale_factor, num_classes, embed, generator,
                                                          device)
        accumulating = micro + 1 < config.grad_accum and world > 1  # sync gradients on the last micro-batch only
        with parallel.no_sync(model, accumulating):
            loss = denoising_loss(model, scheduler, x0, noise, timesteps, cond, config, autocast, extra)
            finite = _all_finite(loss, world)
            if finite:
                (loss / config.grad_accum).backward()
        micro += 1
        if finite and micro == config.grad_accum:
            grad_norm = parallel.whole(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            finite = bool(torch.isfinite(grad_norm))  # gradients are synchronised: every rank agrees
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            micro, bad_steps, skipped = 0, bad_steps + 1, skipped + 1
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
        training.lr_schedule.step()
        diffusion.ema_update(ema_targets, ema_sources, step, config.ema_decay, config.ema_warmup)
        step += 1
        if step % run.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_started
            tracker.log(step, loss=loss.item(), lr=training.lr_schedule.get_last_lr()[0], grad_norm=float(grad_norm),
                        latents_per_s=window_samples / max(elapsed, 1e-9), data_wait_fraction=wait.fraction())
            window_started, window_samples = time.perf_counter(), 0
            wait.restart()
        if config.sample_every and step % config.sample_every == 0:
            tracker.log_grid(step, parallel.cpu_copy(training.ema, rank, training.build), config, scale_factor)
        if step % run.checkpoint_every == 0 or step == config.steps:
            _report_checkpoint(step, read, skipped, loss.item(), rank, world, training, loop_config["config"])
            tracker.log(step, checkpoint=step)
    tracker.wait()  # the last grid is in MLflow when the run ends


def _report_checkpoint(step: int, read: dict[str, Any], skipped: int, loss: float, rank: int, world: int,
                       training: Training, config: dict[str, Any]) -> None:
    """Every rank's RNG state and data position, with the weights, optimizer and LR state:
    written whole by rank 0, or sharded by every rank (a model sharded by FSDP)."""
    position = {"step": step, "data": read, "bad_steps": 0, "skipped": skipped}
    positions = [None] * world
    states = [None] * world
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(positions, position)
        torch.distributed.all_gather_object(states, training.generator.get_state())
    else:
        positions, states = [position], [training.generator.get_state()]
    state = {"position": positions, "config": config, "step": step}
    sharded = parallel.is_sharded(training.model)
    training_state = training.checkpointed()

    def write(folder: str) -> None:
        if sharded:
            checkpoints.save_sharded(folder, rank, **training_state, state=state)
        else:
            optimizers = {name: opt for name, (_, opt) in training_state["optimizers"].items()}
            checkpoints.save(folder, modules=training_state["modules"],
                             optimizers=optimizers | training_state["schedules"], state=state)
        if rank == 0:
            for r, rng in enumerate(states):
                checkpoints.save_tensor(folder, f"rng-{r}", rng)

    loop.report({"step": step, "loss": loss}, rank, write, every_rank=sharded)


class GridTracker(runs.RankZeroTracker):
    """Rank 0's MLflow logging, plus sample grids of the EMA model every ``sample_every`` steps.

    A grid is drawn from a CPU copy of the EMA weights on a thread of its own, so the steps
    go on meanwhile (at most one grid in flight: the next waits for it, as does the end of
    the run); an error in it is raised in the training loop."""

    def __init__(self, loop_config: dict[str, Any], rank: int) -> None:
        super().__init__(loop_config.get("run_id"), loop_config.get("tracking_uri"), rank)
        self.loop_config = loop_config
        self.vae = None
        self._drawing: threading.Thread | None = None
        self._error: BaseException | None = None

    def log_grid(self, step: int, snapshot, config: DiffusionConfig, scale_factor: float) -> None:
        """Start drawing the grid of ``snapshot``, a CPU copy of the EMA model as it is now
        (None on ranks other than 0); the autoencoder's files come by object store."""
        if self.client is None or snapshot is None or self.loop_config.get("autoencoder_files") is None:
            return
        self.wait()
        if self.vae is None:
            import ray

            from ldmflow.model import autoencoders

            self.vae, _ = autoencoders.load_files(ray.get(self.loop_config["autoencoder_files"]))
        self._drawing = threading.Thread(target=self._draw, args=(step, snapshot, config, scale_factor),
                                         name=f"grid-{step}", daemon=True)
        self._drawing.start()

    def wait(self) -> None:
        """Wait for the grid being drawn; raise its error, if it failed."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _draw(self, step: int, ema, config: DiffusionConfig, scale_factor: float) -> None:
        from ldmflow.model import grids
        from ldmflow.model.sampler import Sampler
        from ldmflow.training.stage_configs import model_info

        try:
            info = model_info(config, self.loop_config["latent_shape"], self.loop_config["class_names"], scale_factor,
                              self.vae, autoencoder={}, lineage={})
            grid, _ = grids.sample_grid(Sampler(ema, self.vae, info), self.loop_config.get("prompts"))
            self.log_image(grid, f"samples/step-{step:07d}.png")
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop by wait()
            self._error = exc
