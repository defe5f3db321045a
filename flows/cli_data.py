"""The data-side subcommands: ``shard``, ``train-autoencoder``, ``precompute``, ``train``,
``inspect``. Each is a thin call of its flow (registered on the app in :mod:`ldmflow.flows.cli`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldmflow.flows import runtime
from ldmflow.flows.cli_options import ConfigOption, ImageFormat, fail, load_config


def shard_images(
    source: Annotated[
        str,
        typer.Argument(
            help="Raw images: a folder, an s3:// prefix, a .tar (or a folder of tars), builtin:digits or builtin:mnist."
        ),
    ],
    dest: Annotated[str, typer.Argument(help="Output folder or s3:// prefix for shards, manifest.json and rejects.jsonl.")],
    config: ConfigOption = None,
    resolution: Annotated[Optional[int], typer.Option(help="Output side in pixels (short side resized, centre crop).")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Inputs per shard.")] = None,
    format: Annotated[Optional[ImageFormat], typer.Option("--format", help="Image encoding inside the shards.")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="Refuse images whose short side is smaller (0: accept any).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images with more pixels (decompression bombs).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Take only the first N inputs in sorted order (0: all).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Images processed concurrently, and chunks in flight.")] = None,
    runner: Annotated[Optional[str], typer.Option(
        help="Where chunks run: threads (this process), ray (Ray tasks on RAY_ADDRESS's cluster), auto.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Validate, deduplicate and resize a raw image dataset into WebDataset shards.

    Every input that cannot be used is written to rejects.jsonl with its reason; the run
    goes on. Rerunning into the same DEST finishes only the shards that are missing; after
    the source changed, it rewrites only the shards whose inputs changed; with nothing
    changed, it lists the source and DEST once and stops.
    """
    from ldmflow.data import storage
    from ldmflow.data.sharding import ShardConfig
    from ldmflow.data.sources import SourceError

    overrides = dict(
        resolution=resolution,
        shard_size=shard_size,
        format=format.value if format else None,
        min_size=min_size,
        max_pixels=max_pixels,
        limit=limit,
        workers=workers,
        runner=runner,
    )
    stage_config = load_config(ShardConfig, config, "shard", overrides)  # a usage error before any server starts
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows import shard

    try:
        outcome = shard.run(storage.absolute(source), storage.absolute(dest), stage_config, progress=progress)
    except (SourceError, storage.StorageError) as exc:
        raise fail(exc) from exc
    typer.echo(outcome.summary())


def train_autoencoder(
    shards_url: Annotated[str, typer.Argument(metavar="SHARDS", help="Image shards (folder or s3:// prefix with manifest.json).")],
    config: ConfigOption = None,
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny (CPU) or base (f=8, 256 px).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per worker per step.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP ranks); 0: the loop in this process (Ray Train's local mode).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name in MLflow.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress line (step, loss, steps/s, ETA).")] = True,
) -> None:
    """Train the KL autoencoder on image shards with Ray Train, then register it in MLflow.

    Measures the latent scale factor (1 / std of latents) and stores it in the model's
    config; logs losses, held-out PSNR against a bilinear baseline at the same latent grid,
    and a picture of originals beside reconstructions. Rerunning resumes from checkpoints.
    """
    from ldmflow.training.stage_configs import AutoencoderConfig

    stage_config = load_config(AutoencoderConfig, config, "autoencoder",
                                dict(preset=preset, steps=steps, batch_size=batch_size, model_name=model_name,
                                     ray_train={"workers": workers}))
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows.autoencoder import train_autoencoder_flow

    trained = train_autoencoder_flow(shards_url, stage_config, progress)
    typer.echo(trained.summary())


def precompute(
    shards_url: Annotated[str, typer.Argument(metavar="SHARDS", help="Image shards (folder or s3:// prefix with manifest.json).")],
    dest: Annotated[str, typer.Argument(help="Output folder or s3:// prefix for the latent shards and manifest.")],
    autoencoder: Annotated[str, typer.Option(help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH or a local folder.")],
    config: ConfigOption = None,
    actors: Annotated[Optional[int], typer.Option(
        help="Encoder actors (0: one per GPU, or about one per CPU with a quarter kept for decoding).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="Torch threads per CPU encoder actor (0: the cores shared by the actors).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per encoder call.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Encode every image shard once into latent shards, in a Ray Data pipeline.

    Shards are read and decoded by CPU tasks, encoded by a pool of encoder actors (GPUs
    where the cluster has them) and written by CPU tasks, streamed. Finished shards are
    skipped on a rerun (so after a shard rerun, only the image shards it rewrote are
    encoded, and latents of shards it dropped removed); a shard that keeps failing is listed in the manifest and the
    summary, and the command exits 1.
    """
    from ldmflow.data.precompute import PrecomputeConfig

    stage_config = load_config(PrecomputeConfig, config, "precompute", dict(actors=actors, threads=threads, batch_size=batch_size))
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.registry.models import ModelNotFound

    try:
        outcome = precompute_flow(shards_url, dest, autoencoder, stage_config, progress)
    except ModelNotFound as exc:
        raise fail(exc) from exc
    typer.echo(outcome.summary())
    if outcome.manifest.failed_shards:
        raise typer.Exit(1)


def train(
    latents_url: Annotated[str, typer.Argument(metavar="LATENTS", help="Latent shards (folder or s3:// prefix with manifest.json).")],
    config: ConfigOption = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Latents per worker per micro-batch.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP ranks); 0: the loop in this process (Ray Train's local mode).")] = None,
    autoencoder: Annotated[Optional[str], typer.Option(help="Autoencoder URI (default: the one named by the latents).")] = None,
    init_from: Annotated[Optional[str], typer.Option(
        "--init-from", metavar="MODEL_URI",
        help="Fine-tune: start from this model's EMA weights (same autoencoder, conditioning, preset and classes). "
             "Give the run a warm-up of about half its steps (train.warmup_steps): docs/training.md.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(
        "--lora-rank", metavar="R",
        help="Train rank-R LoRA adapters on the UNet's attention and projection layers instead of every weight; "
             "they are merged into the registered model.")] = None,
    inpainting: Annotated[Optional[bool], typer.Option(
        "--inpainting/--no-inpainting",
        help="A model trained for inpainting: the UNet also takes the known latents and the mask, on random masks; "
             "with --init-from a plain model it starts from its weights (docs/training.md).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name in MLflow.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress line (step, loss, steps/s, ETA).")] = True,
) -> None:
    """Train the denoising UNet on precomputed latents with Ray Train (DDP), EMA and checkpoints.

    Refuses latents made by another autoencoder than the configured one. Logs losses,
    learning rate, gradient norm and throughput to MLflow, a grid of samples decoded with
    the autoencoder, and the EMA model. Rerunning the same job resumes from its checkpoint.
    With --init-from the run starts from a registered model's weights, with its own
    learning-rate schedule, and the new version names it as ldmflow.parent_model. With
    --inpainting it is a model trained for inpainting, registered as one.
    """
    from ldmflow.data.latent_shards import LineageError
    from ldmflow.training.stage_configs import DiffusionConfig

    stage_config = load_config(DiffusionConfig, config, "train",
                                dict(steps=steps, batch_size=batch_size, autoencoder=autoencoder, init_from=init_from,
                                     lora_rank=lora_rank, inpainting=inpainting, model_name=model_name,
                                     ray_train={"workers": workers}))
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows.train import train_flow
    from ldmflow.model.autoencoders import AutoencoderError
    from ldmflow.registry.models import ModelNotFound

    try:
        trained = train_flow(latents_url, stage_config, progress)
    except (LineageError, ModelNotFound, AutoencoderError) as exc:
        raise fail(exc) from exc
    typer.echo(trained.summary())


def inspect(dataset: Annotated[str, typer.Argument(help="A shard folder or s3:// prefix (or its manifest.json).")]) -> None:
    """Print a dataset's manifest summary: counts, classes, statistics, lineage and shards.

    Works for image shards and latent shards alike.
    """
    import json

    from ldmflow.data import image_shards, latent_shards, storage

    try:
        kind = json.loads(storage.read_text(image_shards.manifest_url(dataset))).get("format")
        manifest = latent_shards.read_manifest(dataset) if kind == latent_shards.FORMAT_NAME else image_shards.read_manifest(dataset)
    except (image_shards.ManifestError, storage.StorageError, ValueError) as exc:
        message = f"{image_shards.manifest_url(dataset)}: no manifest" if isinstance(exc, storage.NotFound) else str(exc)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(manifest.summary())
    if isinstance(manifest, latent_shards.LatentManifest):
        typer.echo(f"image dataset: {manifest.image_dataset} (manifest sha256 {manifest.image_manifest_sha256[:16]}…)")
        typer.echo(f"autoencoder weights sha256: {manifest.autoencoder.weights_sha256[:16]}…")
        for shard in manifest.shards:
            typer.echo(f"  {shard.url}  {shard.num_samples:6d} samples  {shard.bytes:>12,d} bytes  from {shard.source_shard}")
        return
    if manifest.class_names:
        typer.echo(f"classes: {', '.join(manifest.class_names)}")
    typer.echo(f"pixel mean {manifest.stats['mean']}  std {manifest.stats['std']}")
    for shard in manifest.shards:
        typer.echo(f"  {shard.url}  {shard.num_samples:6d} samples  {shard.bytes:>12,d} bytes  {shard.sha256[:16]}")
