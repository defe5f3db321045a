"""The diffusion stage's driver: check the latents' lineage, run the worker loop
(:mod:`ldmflow.training.diffusion_loop`) on Ray Train, train a class model's label reader
(:mod:`ldmflow.training.label_reader`), then write the EMA model folder, draw its sample grid,
and register it in MLflow with the alias ``candidate``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ldmflow import configs
from ldmflow.data import image_shards, latent_shards, shard_stream, storage
from ldmflow.errors import InputError
from ldmflow.model import autoencoders, grids, model_format, text_encoder, unets
from ldmflow.model.sampler import Sampler
from ldmflow.registry import models, runs, tracking
from ldmflow.state import state_dir
from ldmflow.training import checkpoints, label_reader, launch
from ldmflow.training.stage_configs import DiffusionConfig, model_info


@dataclass(frozen=True)
class TrainedDiffusion:
    folder: Path  # the model folder (ldmflow.model.model_format)
    run_id: str
    model_uri: str  # models:/NAME/VERSION, also aliased "candidate"
    metrics: dict[str, float]
    grid: Path

    def summary(self) -> str:
        accuracy = self.metrics.get("class_accuracy")
        quality = f", samples recognised as their class {accuracy:.0%} of the time" if accuracy is not None else ""
        return (f"train: registered {self.model_uri} (alias {models.CANDIDATE}) from MLflow run {self.run_id}{quality}; "
                f"sample grid {self.grid}")


def resolve_autoencoder(manifest: latent_shards.LatentManifest, uri: str = ""):
    """The autoencoder for a latent set (model, info, local folder), refused unless it is the
    one that made the latents."""
    uri = uri or manifest.autoencoder.uri
    folder, _ = models.resolve(uri)
    vae, info = autoencoders.load(folder)
    latent_shards.check_lineage(manifest, info.weights_sha256, expected_uri=uri)
    return vae, info, folder


def train(latents_url: str, config: DiffusionConfig, *, storage_path: str | None = None, progress: bool = True) -> TrainedDiffusion:
    """Train on the latent shards at ``latents_url``; log the EMA model and samples to MLflow."""
    from ldmflow.data import cluster
    from ldmflow.training.diffusion_loop import train_worker

    latents_url = storage.absolute(latents_url)
    _, manifest_text = image_shards.read_manifest_text(latents_url, "precompute")
    manifest = latent_shards.LatentManifest.from_json(manifest_text, where=latents_url)
    manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
    vae, vae_info, vae_folder = resolve_autoencoder(manifest, config.autoencoder)
    if config.conditioning == "class" and not manifest.class_names:
        raise InputError(f"{latents_url}: class conditioning needs labelled data (the manifest has no class names); "
                         "train with conditioning: none, or shard images with labels")
    check_combination(config)
    parent = parent_model(config, manifest, vae_info) if config.init_from else None
    name = configs.run_name("diffusion", config, latents=manifest_sha)
    stored_text = manifest.text_encoder == text_encoder.TEXT_ENCODER  # precompute stored the caption embeddings
    run_id = runs.start(config.experiment, name, config, tags={
        "ldmflow.stage": "diffusion", "ldmflow.latents": latents_url, "ldmflow.latent_manifest_sha256": manifest_sha,
        "ldmflow.autoencoder": manifest.autoencoder.uri, "ldmflow.autoencoder_sha256": vae_info.weights_sha256,
        **({"ldmflow.caption_embeddings": "stored" if stored_text else "encoded in training"}
           if config.conditioning == "text" else {}),
        **({"ldmflow.parent_model": parent.uri} if parent else {}),
        **({"ldmflow.inpainting": "true"} if config.inpainting else {})})

    cluster.ensure_ray()
    autoencoder_files = None
    if config.sample_every:
        import ray

        autoencoder_files = ray.put({p.name: p.read_bytes() for p in Path(vae_folder).iterdir() if p.is_file()})
    urls = latent_shards.shard_urls(latents_url, manifest)
    if len(urls) < config.ray_train.workers:
        print(f"train: {len(urls)} latent shards for {config.ray_train.workers} workers: splitting by sample instead of by shard")
    prompts = grid_prompts(urls) if config.conditioning == "text" else None
    loop_config = {
        "config": configs.to_dict(config), "shard_urls": urls, "latent_shape": list(manifest.latent_shape),
        "class_names": list(manifest.class_names or ()), "scale_factor": vae_info.scale_factor,
        "run_id": run_id, "tracking_uri": tracking.tracking_uri(), "autoencoder_files": autoencoder_files,
        "prompts": prompts, "stored_text": stored_text, "shard_counts": [shard.num_samples for shard in manifest.shards],
        "init_weights": parent.weights() if parent else None,
    }
    with launch.fit(train_worker, loop_config, config.ray_train, name=name, storage_url=storage_path, run_id=run_id,
                    label="train", progress=progress) as checkpoint:
        num_classes = len(manifest.class_names or ())
        ema = unets.build(config.preset, config.conditioning, tuple(manifest.latent_shape), num_classes,
                          lora_rank=config.lora_rank, inpainting=config.inpainting)
        checkpoints.load_weights(checkpoint, "ema", ema)
    if config.lora_rank:
        ema = unets.merge_lora(ema)
    ema.eval()

    out = state_dir() / "runs" / f"{name}-{run_id[:8]}"  # the grid and model, also in MLflow
    lineage = {"run_id": run_id, "latents": latents_url, "latent_manifest_sha256": manifest_sha,
               "image_dataset": manifest.image_dataset, "image_manifest_sha256": manifest.image_manifest_sha256,
               **({"parent_model": parent.uri} if parent else {})}
    reader = train_reader(config, urls, manifest, vae_info.scale_factor, progress)
    info = model_info(config, manifest.latent_shape, manifest.class_names, vae_info.scale_factor, vae,
                      autoencoder=vars(manifest.autoencoder), lineage=lineage, label_reader=reader is not None)
    model_folder = out / "model"
    model_format.save(model_folder, ema, vae_folder, info, reader)
    grid, images = grids.sample_grid(Sampler(ema, vae, info), prompts)
    grid_path = out / "samples.png"
    grid.save(grid_path)
    metrics: dict[str, float] = {}
    if config.conditioning == "class":
        from ldmflow.training import features

        classifier = features.classifier_for(features.Reference.read(manifest.image_dataset))
        metrics["class_accuracy"] = features.class_accuracy(classifier, images)
    client = tracking.client()
    client.log_artifact(run_id, str(grid_path))
    registered = models.register(model_folder, config.model_name, run_id)
    for key, value in metrics.items():  # metrics of the run and of the logged model itself
        client.log_metric(run_id, key, value, model_id=registered.model_id)
    client.set_terminated(run_id)
    return TrainedDiffusion(model_folder, run_id, registered.uri, metrics, grid_path)


def train_reader(config: DiffusionConfig, urls: list[str], manifest: latent_shards.LatentManifest,
                 scale_factor: float, progress: bool):
    """A class model's label reader (:mod:`ldmflow.training.label_reader`), trained here on
    the driver; None for other models or ``label_reader_steps: 0``."""
    if config.conditioning != "class" or not config.label_reader_steps:
        return None
    if progress:
        print(f"train: the label reader, {config.label_reader_steps} steps on this machine", flush=True)
    return label_reader.train_reader(urls, [shard.num_samples for shard in manifest.shards], manifest.latent_shape,
                                     len(manifest.class_names or ()), scale_factor, config.label_reader_steps,
                                     seed=config.seed, shuffle_buffer=config.ray_train.shuffle_buffer)


@dataclass(frozen=True)
class ParentModel:
    """The model a fine-tuning run starts from."""

    uri: str  # models:/NAME/VERSION (an alias resolved) or the folder
    folder: Path

    def weights(self):
        """Its EMA UNet's safetensors bytes, in Ray's object store for the workers."""
        import ray

        return ray.put((self.folder / model_format.UNET / "diffusion_pytorch_model.safetensors").read_bytes())


def check_combination(config: DiffusionConfig) -> None:
    """Refuse settings that each hold but not together."""
    if config.lora_rank and config.parallel == "fsdp":
        raise InputError("train: lora_rank trains a few adapter weights beside frozen ones, which FSDP's flat "
                         "shards do not keep apart here: use parallel: ddp (the adapters are small)")
    if config.lora_rank and config.inpainting:
        raise InputError("train: an inpainting model trains its first convolution's new input channels, which "
                         "lora_rank would freeze: train every weight (lora_rank: 0)")


def parent_model(config: DiffusionConfig, manifest: latent_shards.LatentManifest,
                 vae_info: autoencoders.AutoencoderInfo) -> ParentModel:
    """The model ``config.init_from`` names, refused unless this run can start from it: made
    with the autoencoder that made these latents (by weights), with the same conditioning,
    preset, latent shape and (class models) classes."""
    folder, registered = models.resolve(config.init_from)
    folder = model_format.model_folder(folder)
    info = model_format.read_info(folder)
    where = f"init_from {config.init_from}"
    if info.autoencoder.get("weights_sha256") != vae_info.weights_sha256:
        raise latent_shards.LineageError(
            f"{where}: the model was trained on latents of another autoencoder ({info.autoencoder.get('uri')}) than "
            f"these latents' ({manifest.autoencoder.uri}); its weights would not match them: precompute the data "
            f"with the model's autoencoder")
    problems = []
    if info.conditioning != config.conditioning:
        problems.append(f"its conditioning is {info.conditioning!r}, this run's {config.conditioning!r}")
    if info.config.get("preset") != config.preset:
        problems.append(f"its preset is {info.config.get('preset')!r}, this run's {config.preset!r}")
    if list(info.latent_shape) != list(manifest.latent_shape):
        problems.append(f"its latents are {tuple(info.latent_shape)}, these {tuple(manifest.latent_shape)}")
    if info.inpainting and not config.inpainting:
        problems.append("it is trained for inpainting (extra input channels), this run is not (inpainting: true)")
    if config.conditioning == "class" and list(info.class_names or ()) != list(manifest.class_names or ()):
        problems.append(f"its classes are {info.class_names}, these latents' {list(manifest.class_names or ())}")
    if problems:
        raise InputError(f"{where}: cannot start from that model: {'; '.join(problems)}")
    return ParentModel(registered.uri if registered else str(folder), folder)


def grid_prompts(urls: list[str], limit: int = 10) -> list[str]:
    """The prompts of text-model grids, from the first latent shard: the first caption of each
    label, in label order, where samples are labelled (a row per class however the captions
    are phrased); otherwise its distinct captions, sorted."""
    stream = shard_stream.ShardStream(urls[:1], shuffle_buffer=0, decode=latent_shards.decode_latent)
    first_by_label: dict[int, str] = {}
    captions: set[str] = set()
    for sample in stream:
        if sample.caption:
            captions.add(sample.caption)
            if sample.label >= 0:
                first_by_label.setdefault(sample.label, sample.caption)
    if first_by_label:
        return [first_by_label[label] for label in sorted(first_by_label)][:limit]
    return sorted(captions)[:limit]
