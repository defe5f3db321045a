"""The autoencoder stage: train diffusers' ``AutoencoderKL`` on image shards under Ray Train.

The objective is the LDM paper's first stage (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", section 3 and appendix G):

    loss = rec(x, x̂) + kl_weight · KL(q(z|x) ‖ N(0, I)) / pixels  [+ disc_weight · (−D(x̂))]

with rec the per-pixel L1 or L2 error, the KL summed over the latent and divided by the
pixels per image (the paper's weighting, where its reconstruction term is a sum over
pixels), and an optional PatchGAN discriminator D trained with the hinge loss once
``disc_start`` steps have passed. After training, the latent scale factor is measured as
1 / std of sampled latents over training images and stored in the model's config.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from data import autoencoder as autoencoder_format
from data import config as configs
from data import shards, storage
from training import checkpoints, launch, tracking

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: f=4, 4-channel latents (32 px → 8×8×4).
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                 mid_block_add_attention=False),
    # Stable Diffusion's geometry: f=8, 4-channel latents (256 px → 32×32×4).
    "base": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32),
}


@dataclass(frozen=True)
class AutoencoderConfig:
    """Configuration of the autoencoder stage (section ``autoencoder:`` of a config file)."""

    preset: Literal["tiny", "base"] = "tiny"
    steps: int = 400
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    warmup_steps: int = 20
    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # 0 disables the discriminator
    disc_start: int = 200
    workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    seed: int = 0
    held_out: float = 0.05  # fraction of samples (by key) kept out of training for evaluation
    checkpoint_every: int = 100
    log_every: int = 10
    max_failures: int = 2  # worker failures Ray Train recovers from
    scale_samples: int = 512  # images used to measure the latent scale factor
    shuffle_buffer: int = 500
    experiment: str = "ldmflow-autoencoder"
    model_name: str = "ldmflow-autoencoder"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "workers", "checkpoint_every", "log_every", "scale_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.held_out < 1:
            raise ValueError("held_out must be in [0, 1)")


def build_autoencoder(config: AutoencoderConfig, resolution: int):
    from diffusers import AutoencoderKL

    preset = PRESETS[config.preset]
    depth = len(preset["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        sample_size=resolution,
        **preset,
    )


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
# Loss terms: plain functions


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    return F.l1_loss(x_hat, x) if kind == "l1" else F.mse_loss(x_hat, x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): E[relu(1 − D(x))] + E[relu(1 + D(x̂))]."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(x.clamp(-1, 1), y.clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def bilinear_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample to the latent grid with bilinear filtering, then upsample back."""
    small = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def lr_at(step: int, config: AutoencoderConfig) -> float:
    """Linear warm-up, then constant."""
    return config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))


# ---------------------------------------------------------------------------------------
# The Ray Train worker loop


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP over the image shards, checkpoints to Ray Train."""
    import ray.train
    import ray.train.torch

    config = configs.from_dict(AutoencoderConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)

    vae = build_autoencoder(config, loop_config["resolution"])
    disc = PatchDiscriminator() if config.disc_weight > 0 else None
    opt_g = torch.optim.AdamW(vae.parameters(), lr=config.lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.lr, betas=(0.5, 0.9)) if disc else None
    modules = {"vae": vae} | ({"disc": disc} if disc else {})
    optimizers = {"vae": opt_g} | ({"disc": opt_d} if opt_d else {})

    step, epoch, batches_done = 0, 0, 0
    torch.manual_seed(config.seed * 1000 + rank)  # posterior-sampling noise differs by rank
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = checkpoints.load(folder, modules=modules, optimizers=optimizers)
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]

    # DDP syncs the autoencoder's gradients through forward; the discriminator is stepped
    # on its own, so its gradients are averaged by hand (it starts identical on every rank).
    model = ray.train.torch.prepare_model(_EncodeDecode(vae))
    if disc is not None:
        disc = disc.to(device)

    stream = shards.ShardStream(
        loop_config["shard_urls"],
        rank=rank,
        world_size=world,
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
        keep=lambda key: not shards.is_held_out(key, config.held_out),
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=config.batch_size, collate_fn=shards.collate, drop_last=True)
    tracker = tracking.RankZeroTracker(loop_config.get("run_id"), loop_config.get("tracking_uri"), rank)
    pixels = 3 * loop_config["resolution"] ** 2
    window: list[float] = []
    started, seen = time.perf_counter(), 0
    while step < config.steps:
        stream.set_epoch(epoch)
        index = -1
        for index, batch in enumerate(loader):
            if index < batches_done:  # resuming inside an epoch: skip what was trained on
                continue
            x = batch["image"].to(device)
            for group in opt_g.param_groups:
                group["lr"] = lr_at(step, config)
            x_hat, kl = model(x)
            rec = reconstruction_loss(x, x_hat, config.recon_loss)
            loss = rec + config.kl_weight * kl.mean() / pixels
            use_disc = disc is not None and step >= config.disc_start
            if use_disc:
                disc.requires_grad_(False)
                loss = loss - config.disc_weight * disc(x_hat).mean()
                disc.requires_grad_(True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            d_loss = None
            if use_disc:
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                _average_gradients(disc, world)
                opt_d.step()
            step += 1
            batches_done = index + 1
            seen += x.shape[0]
            window.append(rec.item())
            metrics = {"step": step, "rec_loss": float(np.mean(window))}
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - started
                tracker.log(step, rec_loss=metrics["rec_loss"], loss=loss.item(), lr=lr_at(step - 1, config),
                            images_per_s=seen * world / max(elapsed, 1e-9), **({"d_loss": d_loss.item()} if d_loss is not None else {}))
                window.clear()
                started, seen = time.perf_counter(), 0
            if step % config.checkpoint_every == 0 or step == config.steps:
                state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_done,
                         "config": loop_config["config"]}
                with tempfile.TemporaryDirectory() as folder:
                    saved = None
                    if rank == 0:
                        checkpoints.save(folder, modules=modules, optimizers=optimizers, state=state)
                        saved = ray.train.Checkpoint.from_directory(folder)
                    ray.train.report(metrics, checkpoint=saved)
            if step >= config.steps:
                break
        else:
            if index < 0:
                raise RuntimeError(f"rank {rank} read no batch in epoch {epoch}: {stream.skips.skipped} samples or "
                                   f"shards skipped ({'; '.join(stream.skips.errors[:3])})")
            epoch, batches_done = epoch + 1, 0


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
    grads = [p.grad for p in checkpoints.unwrap(module).parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ---------------------------------------------------------------------------------------
# The driver: fit, measure, evaluate, save, register


@dataclass(frozen=True)
class TrainedAutoencoder:
    folder: Path
    info: autoencoder_format.AutoencoderInfo
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    metrics: dict[str, float]

    def summary(self) -> str:
        m = self.metrics
        return (
            f"train-autoencoder: {self.model_uri} scale factor {self.info.scale_factor:.4f}, "
            f"held-out PSNR {m['psnr']:.2f} dB vs {m['baseline_psnr']:.2f} dB for bilinear at the same grid "
            f"(MLflow run {self.run_id})"
        )


def run_name(manifest_sha: str, config: AutoencoderConfig) -> str:
    """Deterministic per (dataset, config): rerunning the same job resumes its checkpoints."""
    body = json.dumps({"data": manifest_sha, "config": configs.to_dict(config) | {"workers": None}}, sort_keys=True)
    return "autoencoder-" + hashlib.sha256(body.encode()).hexdigest()[:12]


def train(dataset: str, config: AutoencoderConfig, *, storage_path: str | None = None, progress: bool = True) -> TrainedAutoencoder:
    """Train on the image shards at ``dataset``, then measure, evaluate, save and register."""
    dataset = storage.absolute(dataset)
    manifest_text = storage.read_text(shards.manifest_url(dataset))
    manifest = shards.ImageManifest.from_json(manifest_text, where=dataset)
    manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
    resolution = int(manifest.config["resolution"])
    urls = shards.shard_urls(dataset, manifest)
    name = run_name(manifest_sha, config)

    client = tracking.client()
    run = client.create_run(tracking.experiment_id(config.experiment), run_name=name,
                            tags={"ldmflow.stage": "autoencoder", "ldmflow.dataset": dataset,
                                  "ldmflow.dataset_manifest_sha256": manifest_sha})
    run_id = run.info.run_id
    for key, value in configs.to_dict(config).items():
        client.log_param(run_id, key, value)
    client.log_param(run_id, "resolution", resolution)

    loop_config = {"config": configs.to_dict(config), "shard_urls": urls, "resolution": resolution,
                   "run_id": run_id, "tracking_uri": tracking.tracking_uri()}
    result = launch.fit(train_worker, loop_config, name=name, workers=config.workers, use_gpu=config.use_gpu,
                        max_failures=config.max_failures, storage_url=storage_path, run_id=run_id)

    vae = build_autoencoder(config, resolution)
    with result.checkpoint.as_directory() as folder:
        checkpoints.load_weights(folder, "vae", vae)
    vae.eval()
    factor = autoencoder_format.downsample_factor(vae)
    scale = measure_scale_factor(vae, urls, config)
    metrics = evaluate(vae, urls, config, factor)
    metrics["scale_factor"] = scale
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)

    out = tracking.state_dir() / "runs" / f"{name}-{run_id[:8]}"  # the model and picture, also in MLflow
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "autoencoder"
    info = autoencoder_format.save(
        vae, folder, scale_factor=scale, resolution=resolution, config=configs.to_dict(config),
        lineage={"dataset": dataset, "dataset_manifest_sha256": manifest_sha, "run_id": run_id},
    )
    picture = reconstruction_grid(vae, urls, config)
    picture.save(out / "reconstructions.png")
    client.log_artifacts(run_id, str(folder), "autoencoder")
    client.log_artifact(run_id, str(out / "reconstructions.png"))
    registered = tracking.register_folder(
        config.model_name, run_id, "autoencoder",
        tags={"ldmflow.weights_sha256": info.weights_sha256, "ldmflow.scale_factor": f"{scale:.6g}",
              "ldmflow.dataset_manifest_sha256": manifest_sha},
    )
    client.set_terminated(run_id)
    return TrainedAutoencoder(folder, info, run_id, registered.uri, metrics)


def _held_out_images(urls: list[str], config: AutoencoderConfig, limit: int) -> torch.Tensor:
    stream = shards.ShardStream(urls, shuffle_buffer=0, keep=lambda key: shards.is_held_out(key, config.held_out))
    images = [torch.from_numpy(sample.image) for _, sample in zip(range(limit), stream)]
    if not images:  # no held-out fraction configured: evaluate on the first samples
        stream = shards.ShardStream(urls, shuffle_buffer=0)
        images = [torch.from_numpy(sample.image) for _, sample in zip(range(limit), stream)]
    return torch.stack(images)


@torch.no_grad()
def measure_scale_factor(vae, urls: list[str], config: AutoencoderConfig) -> float:
    """1 / std of posterior samples over training images (LDM's rescaling, section 4.3.2)."""
    stream = shards.ShardStream(urls, shuffle_buffer=0, keep=lambda key: not shards.is_held_out(key, config.held_out))
    generator = torch.Generator().manual_seed(config.seed)
    latents, batch = [], []
    for _, sample in zip(range(config.scale_samples), stream):
        batch.append(torch.from_numpy(sample.image))
        if len(batch) == 64:
            latents.append(vae.encode(torch.stack(batch)).latent_dist.sample(generator))
            batch = []
    if batch:
        latents.append(vae.encode(torch.stack(batch)).latent_dist.sample(generator))
    return float(1.0 / torch.cat(latents).flatten().std().clamp_min(1e-8))


@torch.no_grad()
def evaluate(vae, urls: list[str], config: AutoencoderConfig, factor: int, limit: int = 256) -> dict[str, float]:
    """Held-out reconstruction PSNR (posterior mean), and the bilinear baseline's at the same grid."""
    x = _held_out_images(urls, config, limit)
    x_hat = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(64)])
    return {
        "psnr": psnr(x, x_hat),
        "baseline_psnr": psnr(x, bilinear_baseline(x, factor)),
        "rec_l1_held_out": float(F.l1_loss(x_hat.clamp(-1, 1), x).item()),
        "held_out_samples": float(x.shape[0]),
    }


@torch.no_grad()
def reconstruction_grid(vae, urls: list[str], config: AutoencoderConfig, count: int = 8):
    """Originals (top row) above their reconstructions (bottom row), as a PIL image."""
    from PIL import Image

    x = _held_out_images(urls, config, count)
    x_hat = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rows = [torch.cat(list(t), dim=-1) for t in (x, x_hat)]  # (3, H, W·count)
    grid = ((torch.cat(rows, dim=-2) + 1) * 127.5).round().clamp(0, 255).byte()
    return Image.fromarray(grid.permute(1, 2, 0).numpy())
