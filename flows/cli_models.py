"""The model-side subcommands: ``evaluate``, ``promote``, ``rollback``, ``export``,
``sample``, ``serve`` (registered on the app in :mod:`ldmflow.flows.cli`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldmflow.flows import runtime
from ldmflow.flows.cli_options import ConfigOption, ModelUri, fail, load_config


def evaluate(
    model_uri: ModelUri,
    config: ConfigOption = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Generated images (spread over the classes).")] = None,
    features: Annotated[Optional[str], typer.Option(help="auto, inception or domain.")] = None,
    inception_path: Annotated[Optional[str], typer.Option(help="Local TorchScript Inception file (never downloaded).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress line (images drawn, images/s, ETA).")] = True,
) -> None:
    """Score a model's samples on fixed seeds: Fréchet distance, KID and class accuracy.

    Features come from Inception when its weights are on this machine, otherwise from a
    classifier trained on the real images; the output says which. Scores of a registered
    version are recorded as its tags.
    """
    from ldmflow.training.evaluation import EvaluationConfig

    stage_config = load_config(EvaluationConfig, config, "evaluate",
                                dict(num_samples=num_samples, features=features, inception_path=inception_path))
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows.promote import evaluate_flow
    from ldmflow.registry.models import ModelNotFound

    try:
        result = evaluate_flow(model_uri, stage_config, progress)
    except ModelNotFound as exc:
        raise fail(exc) from exc
    typer.echo(result.summary())


def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    config: ConfigOption = None,
    metric: Annotated[Optional[str], typer.Option(help="fd, kid, class_accuracy, prompt_accuracy or prompt_accuracy_unseen.")] = None,
    margin: Annotated[Optional[float], typer.Option(help="How much better the candidate must be.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the candidate is not better.")] = False,
    reason: Annotated[str, typer.Option(help="Why: recorded with the decision, and who ran it.")] = "",
    progress: Annotated[bool, typer.Option(help="Show a progress line (images drawn, images/s, ETA).")] = True,
) -> None:
    """Move the production alias to the newest version if it beats the current one.

    Both versions are evaluated on the same fixed seeds (recorded scores are reused); the
    decision, both scores, who ran it and --reason become tags of the candidate, as a
    promotion from the sampler's page records them. Refusing is not an error (exit 0).
    """
    from ldmflow.training.evaluation import EvaluationConfig
    from ldmflow.registry.gate import PromotionConfig

    promotion = load_config(PromotionConfig, config, "promote", dict(metric=metric, margin=margin))
    evaluation = load_config(EvaluationConfig, config, "evaluate", {})
    runtime.prefect_api()  # before Prefect is imported
    from ldmflow.flows.promote import promote_flow
    from ldmflow.registry.aliases import RegistryError
    from ldmflow.registry.models import ModelNotFound

    try:
        decision = promote_flow(name, promotion, evaluation, force, progress=progress, why=reason)
    except (RegistryError, ModelNotFound) as exc:
        raise fail(exc) from exc
    typer.echo(decision.summary())


def rollback(name: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Give the production alias back to the version that held it before the current one."""
    from ldmflow.registry import aliases

    try:
        typer.echo(aliases.rollback(name).summary())
    except aliases.RegistryError as exc:
        raise fail(exc) from exc


def export_model(
    model_uri: ModelUri,
    dest: Annotated[str, typer.Argument(metavar="DIR", help="Folder to write the diffusers pipeline to.")],
) -> None:
    """Write a model as a diffusers pipeline folder.

    Load it with DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True); the
    pipeline class is the folder's pipeline.py.
    """
    from ldmflow.model.model_format import ModelError
    from ldmflow.registry.models import ModelNotFound
    from ldmflow.serving.export import export

    try:
        folder = export(model_uri, dest)
    except (ModelNotFound, ModelError) as exc:
        raise fail(exc) from exc
    typer.echo(f"export: {model_uri} -> {folder} (diffusers pipeline)")


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
    interpolate_to: Annotated[Optional[int], typer.Option(
        help="Draw the n images along the path from --seed's noise to this seed's (slerp).")] = None,
    label_to: Annotated[Optional[int], typer.Option(help="Interpolate the class from --label to this one.")] = None,
    prompt_to: Annotated[Optional[str], typer.Option(help="Interpolate the text from --prompt to this one.")] = None,
    init_image: Annotated[Optional[str], typer.Option(help="Edit this image (SDEdit) or, with --mask, inpaint it.")] = None,
    strength: Annotated[Optional[float], typer.Option(
        help="Edit strength: 0 returns the image, 1 ignores it (default 0.6).")] = None,
    mask: Annotated[Optional[str], typer.Option(help="Inpainting mask image: white where new content goes.")] = None,
    jump_length: Annotated[Optional[int], typer.Option(
        help="Zero-shot inpainting's resampling (RePaint): steps each jump goes back.")] = None,
    jump_count: Annotated[Optional[int], typer.Option(
        help="Zero-shot inpainting's resampling (ddpm, ddim): times each stretch of --jump-length steps runs "
             "(default 1: none).")] = None,
    infer_label: Annotated[Optional[bool], typer.Option(
        "--infer-label/--no-infer-label",
        help="Without --label, condition an edit or inpainting of a class model on the label the image fits best; "
             "an inpainting is drawn under the three labels that fit best and the completion its label explains "
             "best is kept (default: on for --mask and --restore).")] = None,
    restore: Annotated[bool, typer.Option(
        help="Restore a noisy --init-image: SDEdit at the strength chosen for the noise it carries.")] = False,
    invert: Annotated[bool, typer.Option(
        help="Edit by inversion: DDIM-invert --init-image to its noise, then draw from that noise under --label/--prompt.")] = False,
    source_label: Annotated[Optional[int], typer.Option(help="With --invert: the input image's own class, if known.")] = None,
    source_prompt: Annotated[Optional[str], typer.Option(help="With --invert: the input image's own text, if known.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress line (denoising step, steps/s, ETA).")] = True,
) -> None:
    """Draw images from a model and write them as PNGs plus a grid.

    With --interpolate-to (and/or --label-to, --prompt-to) the n images run along the path
    between two seeds' noises (and two conditions): the first equals --seed's image, the
    last --interpolate-to's, each drawn alone with --n 1. With --init-image: SDEdit at
    --strength, a restoration with --restore (SDEdit at the strength its noise needs),
    inpainting with --mask, or with --invert the image's own noise (DDIM inversion under
    --source-label/--source-prompt) drawn again under --label/--prompt.
    """
    from pathlib import Path

    from ldmflow.console import Progress
    from ldmflow.data import jobs
    from ldmflow.model.grids import grid, to_pil
    from ldmflow.model.model_format import ModelError
    from ldmflow.registry.models import ModelNotFound, load_sampler

    try:
        model, _ = load_sampler(model_uri)
        fields = dict(n=n, label=label, prompt=prompt, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                      to_seed=interpolate_to, to_label=label_to, to_prompt=prompt_to, strength=strength,
                      source_label=source_label, source_prompt=source_prompt, jump_length=jump_length,
                      jump_count=jump_count, infer_label=infer_label,
                      mode="invert" if invert else "restore" if restore else None,
                      image=Path(init_image).read_bytes() if init_image else None,
                      mask=Path(mask).read_bytes() if mask else None)
        job = jobs.build(model, fields)  # as an HTTP request or a pyfunc row is, with the same limits
    except jobs.RequestError as exc:  # the request's refusal, as the HTTP API words it
        raise fail(exc, 2) from exc
    except (ModelNotFound, ModelError, OSError) as exc:
        raise fail(exc) from exc
    with Progress("sample", job.denoising_steps, "step", enabled=progress) as bar:
        drawn = model.run([job], on_step=bar.advance)[0]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_pil(drawn)):
        image.save(folder / (f"path-{i:03d}.png" if job.interpolates else f"{seed + i:06d}.png"))
    grid([drawn]).save(folder / "grid.png")
    chosen = f" at strength {job.strength:.2f}" if restore else ""
    typer.echo(f"sample: {n} images from {model_uri}{chosen} -> {folder}/ (grid.png)")


def serve_model(
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
    picked up without downtime. API keys come from LDMFLOW_API_KEYS or serve.api_keys_file;
    with them every route but /healthz needs `Authorization: Bearer KEY`. Without keys the
    server binds only a loopback address unless serve.allow_unauthenticated is true.
    """
    from ldmflow.model.model_format import ModelError
    from ldmflow.registry.models import ModelNotFound
    from ldmflow.serving import app
    from ldmflow.serving.config import ServeConfig
    from ldmflow.serving.follower import load_model

    from ldmflow.registry.gate import PromotionConfig

    stage_config = load_config(ServeConfig, config, "serve",
                                dict(host=host, port=port, num_replicas=num_replicas, max_replicas=max_replicas,
                                     num_gpus=num_gpus))
    promotion = load_config(PromotionConfig, config, "promote", {})
    app.key_digests(stage_config, stage_config.host)  # before anything starts
    try:
        load_model(model_uri)  # fail here, with one line, rather than in a replica
        url = app.run(model_uri, stage_config, promotion=promotion)
    except (ModelNotFound, ModelError) as exc:
        raise fail(exc) from exc
    typer.echo(f"serve: {model_uri} at {url} (OpenAPI: {url}/openapi.json); Ctrl-C to stop")
    wait_then_stop_serve()


def wait_then_stop_serve() -> None:
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
        from ray import serve

        serve.shutdown()
