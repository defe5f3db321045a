"""The autoencoder stage's driver: train diffusers' ``AutoencoderKL`` on image shards with the
worker loop of :mod:`ldmflow.training.autoencoder_loop` under Ray Train, then measure the
latent scale factor (1 / std of sampled latents over training images, LDM section 4.3.2),
score held-out reconstructions against a bilinear baseline, save the autoencoder folder
(:mod:`ldmflow.model.autoencoders`) and register it in MLflow.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmflow import configs
from ldmflow.data import image_shards, shard_stream, storage
from ldmflow.model import autoencoders, grids
from ldmflow.registry import models, runs, tracking
from ldmflow.state import state_dir
from ldmflow.training import checkpoints, launch
from ldmflow.training.stage_configs import AutoencoderConfig


# ---------------------------------------------------------------------------------------
# Quality measures: plain functions


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(x.clamp(-1, 1), y.clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def bilinear_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample to the latent grid with bilinear filtering, then upsample back."""
    small = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class TrainedAutoencoder:
    folder: Path
    info: autoencoders.AutoencoderInfo
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


def train(dataset: str, config: AutoencoderConfig, *, storage_path: str | None = None, progress: bool = True) -> TrainedAutoencoder:
    """Train on the image shards at ``dataset``, then measure, evaluate, save and register."""
    from ldmflow.training.autoencoder_loop import train_worker

    dataset = storage.absolute(dataset)
    manifest_text = storage.read_text(image_shards.manifest_url(dataset))
    manifest = image_shards.ImageManifest.from_json(manifest_text, where=dataset)
    manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
    resolution = int(manifest.config["resolution"])
    urls = image_shards.shard_urls(dataset, manifest)
    name = configs.run_name("autoencoder", config, data=manifest_sha)
    run_id = runs.start(config.experiment, name, config, tags={
        "ldmflow.stage": "autoencoder", "ldmflow.dataset": dataset, "ldmflow.dataset_manifest_sha256": manifest_sha})
    client = tracking.client()
    client.log_param(run_id, "resolution", resolution)

    loop_config = {"config": configs.to_dict(config), "shard_urls": urls, "resolution": resolution,
                   "shard_counts": [shard.num_samples for shard in manifest.shards],
                   "run_id": run_id, "tracking_uri": tracking.tracking_uri()}
    with launch.fit(train_worker, loop_config, config.ray_train, name=name, storage_url=storage_path, run_id=run_id,
                    label="autoencoder", progress=progress) as checkpoint:
        vae = autoencoders.build(config.preset, resolution)
        checkpoints.load_weights(checkpoint, "vae", vae)
    vae.eval()
    factor = autoencoders.downsample_factor(vae)
    scale = measure_scale_factor(vae, urls, config)
    metrics = evaluate(vae, urls, config, factor)
    metrics["scale_factor"] = scale

    out = state_dir() / "runs" / f"{name}-{run_id[:8]}"  # the model and picture, also in MLflow
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "autoencoder"
    info = autoencoders.save(
        vae, folder, scale_factor=scale, resolution=resolution, config=configs.to_dict(config),
        lineage={"dataset": dataset, "dataset_manifest_sha256": manifest_sha, "run_id": run_id},
    )
    picture = reconstruction_grid(vae, urls, config)
    picture.save(out / "reconstructions.png")
    client.log_artifact(run_id, str(out / "reconstructions.png"))
    registered = models.register_folder(
        config.model_name, run_id, folder, autoencoders.KIND,
        tags={"ldmflow.weights_sha256": info.weights_sha256, "ldmflow.scale_factor": f"{scale:.6g}",
              "ldmflow.dataset_manifest_sha256": manifest_sha},
    )
    for key, value in metrics.items():  # metrics of the run and of the logged model itself
        client.log_metric(run_id, key, value, model_id=registered.model_id)
    client.set_terminated(run_id)
    return TrainedAutoencoder(folder, info, run_id, registered.uri, metrics)


def _held_out_images(urls: list[str], config: AutoencoderConfig, limit: int) -> torch.Tensor:
    stream = shard_stream.ShardStream(urls, shuffle_buffer=0, keep=lambda key: shard_stream.is_held_out(key, config.held_out))
    images = [torch.from_numpy(sample.image) for _, sample in zip(range(limit), stream)]
    if not images:  # no held-out fraction configured: evaluate on the first samples
        stream = shard_stream.ShardStream(urls, shuffle_buffer=0)
        images = [torch.from_numpy(sample.image) for _, sample in zip(range(limit), stream)]
    return torch.stack(images)


@torch.no_grad()
def measure_scale_factor(vae, urls: list[str], config: AutoencoderConfig) -> float:
    """1 / std of posterior samples over training images (LDM's rescaling, section 4.3.2)."""
    stream = shard_stream.ShardStream(urls, shuffle_buffer=0, keep=lambda key: not shard_stream.is_held_out(key, config.held_out))
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
    x = _held_out_images(urls, config, count)
    return grids.grid([x, vae.decode(vae.encode(x).latent_dist.mean).sample])
