"""The ``ldmflow`` command line: one subcommand per stage, each a thin call of its flow.

Every subcommand takes ``--config FILE`` (YAML; a stage reads its own section) and flags
that override single fields. Heavy imports (Prefect, torch) happen inside the commands,
after the state folder is configured, so ``--help`` is quick.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from flows import runtime

app = typer.Typer(
    name="ldmflow",
    help="Train and serve latent diffusion models: shard images, precompute latents, train, register, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Optional[str], typer.Option("--config", "-c", help="YAML config file; the stage reads its own section (e.g. shard:).")
]


class ImageFormat(str, Enum):
    png = "png"
    jpg = "jpg"


@app.callback()
def main(
    state_dir: Annotated[
        Optional[str],
        typer.Option(help="Local state folder for the embedded services (default: $LDMFLOW_HOME or .ldmflow)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's flow and task logs.")] = False,
) -> None:
    runtime.configure(state_dir, verbose)


@app.command()
def shard(
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
    workers: Annotated[Optional[int], typer.Option(help="Chunks processed concurrently.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Validate, deduplicate and resize a raw image dataset into WebDataset shards.

    Every input that cannot be used is written to rejects.jsonl with its reason; the run
    goes on. Rerunning into the same DEST finishes only the shards that are missing.
    """
    from data import config as configs
    from data import storage
    from data.sharding import ShardConfig
    from data.sources import SourceError
    from flows import shard as shard_flow

    overrides = dict(
        resolution=resolution,
        shard_size=shard_size,
        format=format.value if format else None,
        min_size=min_size,
        max_pixels=max_pixels,
        limit=limit,
        workers=workers,
    )
    try:
        stage_config = configs.load(ShardConfig, config, section="shard", overrides=overrides)
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    try:
        outcome = shard_flow.run(storage.absolute(source), storage.absolute(dest), stage_config, progress=progress)
    except (SourceError, storage.StorageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(outcome.summary())


def _load_config(cls, path: str | None, section: str, overrides: dict):
    from data import config as configs

    try:
        return configs.load(cls, path, section=section, overrides=overrides)
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc


@app.command("train-autoencoder")
def train_autoencoder(
    shards_url: Annotated[str, typer.Argument(metavar="SHARDS", help="Image shards (folder or s3:// prefix with manifest.json).")],
    config: ConfigOption = None,
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny (CPU) or base (f=8, 256 px).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per worker per step.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP ranks).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name in MLflow.")] = None,
) -> None:
    """Train the KL autoencoder on image shards with Ray Train, then register it in MLflow.

    Measures the latent scale factor (1 / std of latents) and stores it in the model's
    config; logs losses, held-out PSNR against a bilinear baseline at the same latent grid,
    and a picture of originals beside reconstructions. Rerunning resumes from checkpoints.
    """
    from flows.autoencoder import train_autoencoder_flow
    from training.autoencoder import AutoencoderConfig

    stage_config = _load_config(AutoencoderConfig, config, "autoencoder",
                                dict(preset=preset, steps=steps, batch_size=batch_size, workers=workers, model_name=model_name))
    trained = train_autoencoder_flow(shards_url, stage_config)
    typer.echo(trained.summary())


@app.command()
def precompute(
    shards_url: Annotated[str, typer.Argument(metavar="SHARDS", help="Image shards (folder or s3:// prefix with manifest.json).")],
    dest: Annotated[str, typer.Argument(help="Output folder or s3:// prefix for the latent shards and manifest.")],
    autoencoder: Annotated[str, typer.Option(help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH or a local folder.")],
    config: ConfigOption = None,
    actors: Annotated[Optional[int], typer.Option(help="Encoder actors (0: one per CPU or GPU of the cluster).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per encoder call.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Encode every image shard once into latent shards, on a pool of Ray actors.

    One shard per task; finished shards are skipped on a rerun; a shard that keeps failing
    is listed in the manifest and the summary, and the command exits 1.
    """
    from data.precompute import PrecomputeConfig
    from flows.precompute import precompute_flow
    from training.tracking import ModelNotFound

    stage_config = _load_config(PrecomputeConfig, config, "precompute", dict(actors=actors, batch_size=batch_size))
    try:
        outcome = precompute_flow(shards_url, dest, autoencoder, stage_config, progress)
    except (ModelNotFound, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(outcome.summary())
    if outcome.manifest.failed_shards:
        raise typer.Exit(1)


@app.command()
def train(
    latents_url: Annotated[str, typer.Argument(metavar="LATENTS", help="Latent shards (folder or s3:// prefix with manifest.json).")],
    config: ConfigOption = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Latents per worker per micro-batch.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers (DDP ranks).")] = None,
    autoencoder: Annotated[Optional[str], typer.Option(help="Autoencoder URI (default: the one named by the latents).")] = None,
) -> None:
    """Train the denoising UNet on precomputed latents with Ray Train (DDP), EMA and checkpoints.

    Refuses latents made by another autoencoder than the configured one. Logs losses,
    learning rate, gradient norm and throughput to MLflow, a grid of samples decoded with
    the autoencoder, and the EMA model. Rerunning the same job resumes from its checkpoint.
    """
    from data.autoencoder import AutoencoderError
    from data.latents import LineageError
    from flows.train import train_flow
    from training.tracking import ModelNotFound
    from training.train import DiffusionConfig

    stage_config = _load_config(DiffusionConfig, config, "train",
                                dict(steps=steps, batch_size=batch_size, workers=workers, autoencoder=autoencoder))
    try:
        trained = train_flow(latents_url, stage_config)
    except (LineageError, ModelNotFound, AutoencoderError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(trained.summary())


@app.command()
def inspect(dataset: Annotated[str, typer.Argument(help="A shard folder or s3:// prefix (or its manifest.json).")]) -> None:
    """Print a dataset's manifest summary: counts, classes, statistics, lineage and shards.

    Works for image shards and latent shards alike.
    """
    import json

    from data import latents, shards, storage

    try:
        kind = json.loads(storage.read_text(shards.manifest_url(dataset))).get("format")
        manifest = latents.read_manifest(dataset) if kind == latents.FORMAT_NAME else shards.read_manifest(dataset)
    except (shards.ManifestError, storage.StorageError, ValueError) as exc:
        message = f"{shards.manifest_url(dataset)}: no manifest" if isinstance(exc, storage.NotFound) else str(exc)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(manifest.summary())
    if isinstance(manifest, latents.LatentManifest):
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


ModelUri = Annotated[
    str, typer.Argument(metavar="MODEL_URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder.")
]


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


@app.command()
def evaluate(
    model_uri: ModelUri,
    config: ConfigOption = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Generated images (spread over the classes).")] = None,
    features: Annotated[Optional[str], typer.Option(help="auto, inception or domain.")] = None,
    inception_path: Annotated[Optional[str], typer.Option(help="Local TorchScript Inception file (never downloaded).")] = None,
) -> None:
    """Score a model's samples on fixed seeds: Fréchet distance, KID and class accuracy.

    Features come from Inception when its weights are on this machine, otherwise from a
    classifier trained on the real images; the output says which. Scores of a registered
    version are recorded as its tags.
    """
    from flows.promote import evaluate_flow
    from training.evaluation import EvaluationConfig
    from training.tracking import ModelNotFound

    stage_config = _load_config(EvaluationConfig, config, "evaluate",
                                dict(num_samples=num_samples, features=features, inception_path=inception_path))
    try:
        result = evaluate_flow(model_uri, stage_config)
    except (ModelNotFound, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(result.summary())


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    config: ConfigOption = None,
    metric: Annotated[Optional[str], typer.Option(help="fd, kid or class_accuracy.")] = None,
    margin: Annotated[Optional[float], typer.Option(help="How much better the candidate must be.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the candidate is not better.")] = False,
) -> None:
    """Move the production alias to the newest version if it beats the current one.

    Both versions are evaluated on the same fixed seeds (recorded scores are reused); the
    decision and both scores become tags of the candidate. Refusing is not an error (exit 0).
    """
    from flows.promote import promote_flow
    from training.evaluation import EvaluationConfig
    from training.registry import PromotionConfig, RegistryError
    from training.tracking import ModelNotFound

    promotion = _load_config(PromotionConfig, config, "promote", dict(metric=metric, margin=margin))
    evaluation = _load_config(EvaluationConfig, config, "evaluate", {})
    try:
        decision = promote_flow(name, promotion, evaluation, force)
    except (RegistryError, ModelNotFound, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(decision.summary())


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Give the production alias back to the version that held it before the current one."""
    from training.registry import RegistryError, rollback as do_rollback

    try:
        typer.echo(do_rollback(name).summary())
    except RegistryError as exc:
        raise _fail(exc) from exc


@app.command()
def export(
    model_uri: ModelUri,
    dest: Annotated[str, typer.Argument(metavar="DIR", help="Folder to write the diffusers pipeline to.")],
) -> None:
    """Write a model as a diffusers pipeline folder.

    Load it with DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True); the
    pipeline class is the folder's pipeline.py.
    """
    from serving.export import export as do_export
    from serving.model import ModelError
    from training.tracking import ModelNotFound

    try:
        folder = do_export(model_uri, dest)
    except (ModelNotFound, ModelError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"export: {model_uri} -> {folder} (diffusers pipeline)")


@app.command()
def sample(
    model_uri: ModelUri,
    out: Annotated[str, typer.Option(help="Folder for the PNGs and grid.png.")] = "samples",
    label: Annotated[Optional[int], typer.Option(help="Class index (class-conditioned models).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text (text-conditioned models).")] = None,
    n: Annotated[int, typer.Option(help="Number of images.")] = 8,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm, ddim or dpm++ (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int, typer.Option(help="Image i is drawn with seed + i.")] = 0,
    init_image: Annotated[Optional[str], typer.Option(help="Edit this image (SDEdit) or, with --mask, inpaint it.")] = None,
    strength: Annotated[float, typer.Option(help="Edit strength: 0 returns the image, 1 ignores it.")] = 0.6,
    mask: Annotated[Optional[str], typer.Option(help="Inpainting mask image: white where new content goes.")] = None,
) -> None:
    """Draw images from a model and write them as PNGs plus a grid."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from serving.model import ModelError
    from serving.sampler import grid, load, to_pil
    from training.tracking import ModelNotFound

    try:
        model, _ = load(model_uri)
        fields = dict(n=n, label=label, prompt=prompt, steps=steps, sampler=sampler, guidance=guidance, seed=seed)
        if init_image:
            fields["image"] = model.image_tensor(Image.open(init_image))
            fields["strength"] = 1.0 if mask else strength
        if mask:
            if not init_image:
                raise ValueError("--mask needs --init-image")
            fields["mask"] = model.mask_tensor(Image.open(mask))
        job = model.job(**fields)
        model.check(job)
        images = model.run([job])[0]
    except (ModelNotFound, ModelError, ValueError, OSError, UnidentifiedImageError) as exc:
        raise _fail(exc) from exc
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_pil(images)):
        image.save(folder / f"{seed + i:06d}.png")
    grid([images]).save(folder / "grid.png")
    typer.echo(f"sample: {n} images from {model_uri} -> {folder}/ (grid.png)")


@app.command()
def serve(
    model_uri: ModelUri,
    config: ConfigOption = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port.")] = None,
    num_replicas: Annotated[Optional[int], typer.Option(help="Replicas (the minimum when autoscaling).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscale up to this many replicas.")] = None,
    num_gpus: Annotated[Optional[float], typer.Option(help="GPUs per replica (a fraction shares one).")] = None,
) -> None:
    """Serve a model over HTTP with Ray Serve until interrupted.

    POST /v1/generate, /v1/edit, /v1/inpaint; GET /v1/model, /healthz; the OpenAPI document
    at /openapi.json. With models:/NAME@ALIAS the server follows the alias: a promotion is
    picked up without downtime.
    """
    from serving import app as serve_app
    from serving.model import ModelError
    from training.tracking import ModelNotFound

    stage_config = _load_config(serve_app.ServeConfig, config, "serve",
                                dict(host=host, port=port, num_replicas=num_replicas, max_replicas=max_replicas,
                                     num_gpus=num_gpus))
    try:
        serve_app.load_model(model_uri)  # fail here, with one line, rather than in a replica
        url = serve_app.run(model_uri, stage_config)
    except (ModelNotFound, ModelError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"serve: {model_uri} at {url} (OpenAPI: {url}/openapi.json); Ctrl-C to stop")
    _wait_then_stop_serve()


@app.command()
def pipeline(
    config: ConfigOption = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage even if it is done (repeatable).")] = None,
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help="Run only these stages (repeatable); the others must be done.")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the production model until interrupted.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run everything: shard → autoencoder → precompute → train → evaluate → promote (→ serve).

    Each stage is skipped when its inputs and config are unchanged since it last finished
    (a record under STORAGE/NAME/_stages/), so a rerun after a failure resumes at the failed
    stage, and training resumes from its checkpoint. Stages: shard, autoencoder, precompute,
    train, evaluate, promote, serve. Endpoints come from pipeline.endpoints in the config or
    from AWS_ENDPOINT_URL, RAY_ADDRESS, PREFECT_API_URL and MLFLOW_TRACKING_URI.
    """
    from data import config as configs
    from flows.settings import load_endpoints

    try:
        load_endpoints(config).apply()  # before Prefect is imported
    except configs.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    from flows.pipeline import StageNotRun, run as run_pipeline
    from flows.settings import STAGES

    for option, names in (("--force", force or []), ("--stage", stage or [])):
        unknown = sorted(set(names) - set(STAGES))
        if unknown:
            raise typer.BadParameter(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}",
                                     param_hint=option)
    stages = list(stage or [])
    if serve:
        stages = [*(stages or load_spec_stages(config)), "serve"]
    try:
        outcome = run_pipeline(config, force=list(force or []), stages=stages or None, progress=progress)
    except configs.ConfigError as exc:
        raise _fail(exc, 2) from exc
    except (StageNotRun, ValueError) as exc:
        raise _fail(exc) from exc
    typer.echo(outcome.summary())
    if serve:
        _wait_then_stop_serve()


def load_spec_stages(config: str | None) -> list[str]:
    from data import config as configs
    from flows.settings import PipelineConfig

    return list(configs.load(PipelineConfig, config, section="pipeline").stages)


def _wait_then_stop_serve() -> None:
    """Block until Ctrl-C or SIGTERM (a container stopping), then shut Serve down cleanly."""
    import signal
    import sys
    import time

    def interrupt(*_):
        raise KeyboardInterrupt

    sys.stdout.flush()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@app.command()
def deploy(
    file: Annotated[str, typer.Option("--file", help="Prefect deployments file.")] = "prefect.yaml",
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Only this deployment (repeatable).")] = None,
) -> None:
    """Register the scheduled deployments of prefect.yaml with the Prefect server.

    The server is PREFECT_API_URL (or Prefect's profile); work pools named by the
    deployments are created when missing. Workers then run them:
    prefect worker start --pool ldmflow-cpu (and ldmflow-gpu on GPU nodes).
    """
    from flows.deploy import DeployError, deploy as do_deploy

    try:
        deployed = do_deploy(file, names=list(name or []))
    except DeployError as exc:
        raise _fail(exc) from exc
    for line in deployed:
        typer.echo(f"deploy: {line}")


if __name__ == "__main__":
    app()
