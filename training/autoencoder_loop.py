"""The autoencoder stage's Ray Train worker loop: DDP over the image shards, with the LDM
first-stage objective (Rombach et al. 2022, section 3 and appendix G)::

    loss = rec(x, x̂) + kl_weight · KL(q(z|x) ‖ N(0, I)) / pixels  [+ disc_weight · (−D(x̂))]

and an optional PatchGAN discriminator trained with the hinge loss after ``disc_start``
steps. Checkpoints (weights as safetensors, optimizer state, data position, the config) go
through Ray Train, so a replaced worker or a rerun of the same job resumes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow.data import shard_stream
from ldmflow.model import autoencoders, precision
from ldmflow.registry import runs
from ldmflow.training import checkpoints, loop, parallel


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, pix2pix), as in the LDM/taming autoencoders.

    GroupNorm instead of BatchNorm, so it needs no synchronised statistics under DDP.
    Output: (B, 1, h, w) real/fake logits, one per overlapping patch.
    """

    def __init__(self, channels: int = 64, layers: int = 2) -> None:
        super().__init__()
        blocks: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [torch.nn.Conv2d(width, out, 4, stride, 1), torch.nn.GroupNorm(8, out), torch.nn.LeakyReLU(0.2)]
            width = out
        blocks.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------
# Loss terms and schedule: plain functions


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(x_hat, x) if kind == "l1" else F.mse_loss(x_hat, x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): E[relu(1 − D(x))] + E[relu(1 + D(x̂))]."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's linear warm-up from ``lr / warmup_steps`` to ``lr`` at step ``warmup_steps − 1``,
    then constant: ``lr · min(1, (step + 1) / warmup_steps)``."""
    warmup = max(warmup_steps, 1)
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)


# ---------------------------------------------------------------------------------------
# The loop


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP over the image shards, checkpoints to Ray Train."""
    import ray.train.torch

    from ldmflow.training.stage_configs import AutoencoderConfig

    worker = loop.start(AutoencoderConfig, loop_config)
    config, rank, world, device = worker.config, worker.rank, worker.world, worker.device
    run = config.ray_train
    autocast = precision.autocast(run.mixed_precision, device)
    torch.manual_seed(config.seed)

    vae = autoencoders.build(config.preset, loop_config["resolution"])
    disc = PatchDiscriminator() if config.disc_weight > 0 else None
    opt_g = torch.optim.AdamW(vae.parameters(), lr=config.lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.lr, betas=(0.5, 0.9)) if disc else None
    schedule = lr_schedule(opt_g, config.warmup_steps)
    modules = {"vae": vae} | ({"disc": disc} if disc else {})
    optimizers = {"vae": opt_g, "lr_schedule": schedule} | ({"disc": opt_d} if opt_d else {})

    step = 0
    torch.manual_seed(config.seed * 1000 + rank)  # posterior-sampling noise differs by rank
    state = loop.restore(lambda folder: checkpoints.load(folder, modules=modules, optimizers=optimizers))
    if state is not None:
        step = state["step"]

    # DDP syncs the autoencoder's gradients through forward; the discriminator is stepped
    # on its own, so its gradients are averaged by hand (it starts identical on every rank).
    model = ray.train.torch.prepare_model(_EncodeDecode(vae))
    if disc is not None:
        disc = disc.to(device)

    stream = shard_stream.ShardStream(
        loop_config["shard_urls"],
        rank=rank,
        world_size=world,
        shuffle_buffer=run.shuffle_buffer,
        seed=config.seed,
        keep=lambda key: not shard_stream.is_held_out(key, config.held_out),
        counts=loop_config.get("shard_counts"),
    )
    batched, loader = loop.loader(stream, config.batch_size, shard_stream.collate, workers=run.loader_workers,
                                  prefetch=run.prefetch_batches)
    data_start = loop.rank_start(stream, state["data"], max(1, run.loader_workers)) if state is not None else None
    tracker = runs.RankZeroTracker(loop_config.get("run_id"), loop_config.get("tracking_uri"), rank)
    pixels = 3 * loop_config["resolution"] ** 2
    window: list[float] = []
    started, seen = time.perf_counter(), 0
    wait = loop.DataWait()
    for read, batch in loop.batches(batched, loader, rank, data_start, wait):
        if step >= config.steps:
            break
        x = batch["image"].to(device)
        use_disc = disc is not None and step >= config.disc_start
        loss, rec, x_hat = autoencoder_loss(model, disc if use_disc else None, x, config, pixels, autocast)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        lr = schedule.get_last_lr()[0]
        schedule.step()
        d_loss = discriminator_step(disc, opt_d, x, x_hat, autocast, world) if use_disc else None
        step += 1
        seen += x.shape[0]
        window.append(rec.item())
        metrics = {"step": step, "rec_loss": float(np.mean(window))}
        if step % run.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - started
            tracker.log(step, rec_loss=metrics["rec_loss"], loss=loss.item(), lr=lr,
                        images_per_s=seen * world / max(elapsed, 1e-9), data_wait_fraction=wait.fraction(),
                        **({"d_loss": d_loss.item()} if d_loss is not None else {}))
            window.clear()
            started, seen = time.perf_counter(), 0
            wait.restart()
        if step % run.checkpoint_every == 0 or step == config.steps:
            state = {"step": step, "data": _gather(read, world), "config": loop_config["config"]}
            loop.report(metrics, rank, lambda folder: checkpoints.save(folder, modules=modules, optimizers=optimizers,
                                                                       state=state))
            tracker.log(step, checkpoint=step)


def autoencoder_loss(model: torch.nn.Module, disc: PatchDiscriminator | None, x: torch.Tensor, config,
                     pixels: int, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The autoencoder's loss on a batch, ``rec + kl_weight · KL / pixels`` (less
    ``disc_weight · D(x̂)`` with a discriminator), its reconstruction term and x̂."""
    with autocast:  # the losses below are fp32
        x_hat, kl = model(x)
    x_hat, kl = x_hat.float(), kl.float()
    rec = reconstruction_loss(x, x_hat, config.recon_loss)
    loss = rec + config.kl_weight * kl.mean() / pixels
    if disc is not None:
        disc.requires_grad_(False)  # the generator's step does not train the discriminator
        with autocast:
            fooled = disc(x_hat).float().mean()
        loss = loss - config.disc_weight * fooled
        disc.requires_grad_(True)
    return loss, rec, x_hat


def discriminator_step(disc: PatchDiscriminator, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       x_hat: torch.Tensor, autocast, world: int) -> torch.Tensor:
    """One hinge-loss step of the discriminator on the real images and the (detached)
    reconstructions, its gradients averaged over the ranks; returns its loss."""
    with autocast:
        logits_real, logits_fake = disc(x), disc(x_hat.detach())
    d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
    optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    _average_gradients(disc, world)
    optimizer.step()
    return d_loss


def _gather(read: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's data position (each reads its own shards), for rank 0's checkpoint."""
    if world == 1 or not torch.distributed.is_initialized():
        return [read]
    positions: list[Any] = [None] * world
    torch.distributed.all_gather_object(positions, read)
    return positions


class _EncodeDecode(torch.nn.Module):
    """One forward for DDP: x → (x̂ from a posterior sample, per-image KL)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


def _average_gradients(module: torch.nn.Module, world: int) -> None:
    """All-reduce the gradients of a module that is not wrapped in DDP."""
    if world == 1 or not torch.distributed.is_initialized():
        return
    grads = [p.grad for p in parallel.unwrap(module).parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
