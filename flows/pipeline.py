"""The end-to-end flow: raw images → shards → autoencoder → latents → diffusion model →
evaluation → promotion (→ serving), each stage a subflow that also runs alone.

Every stage has a cache key: the hash of what it reads (the input manifest's sha256, or
the model version) and its own config. The shard stage is the exception: it always runs,
and its flow finds in one listing of the source whether anything changed since its
manifest (nothing: done; an input added: one shard rewritten). A finished stage writes a
record, ``STORAGE/NAME/_stages/STAGE-KEY.json``, with its inputs and outputs; a later run
with the same key finds the record (and its outputs still there) and skips the stage. So a
rerun after a failure resumes at the failed stage (and inside it: shards and latents skip
what is complete, training resumes from its Ray Train checkpoint), a rerun with unchanged
inputs skips everything, and a changed config reruns only what depends on it.
``force`` reruns the named stages whatever their records say.

Outputs that are folders carry in their name the key of their config and where they read
from (``images-KEY``: source and shard config; ``latents-KEY``: image folder, autoencoder,
precompute config and the encoder's precision as resolved on the cluster), so a new config never overwrites the data an older model was trained
on, and a source that grows updates its folders in place, shard by shard. Every stage's MLflow
run carries the URLs and hashes of its inputs and outputs (tags ``ldmflow.input.*`` and
``ldmflow.output.*``); shard and precompute, which have no run of their own, get one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ldmflow import configs
from ldmflow.data import image_shards, storage
from ldmflow.flows.settings import STAGES, load_spec
from ldmflow.flows.stage_runner import PipelineOutcome, Runner, Stage, manifest_sha
from ldmflow.registry import models, runs, tracking
from ldmflow.state import state_dir


def _lineage(run_id: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    client = tracking.client()
    for prefix, values in (("input", inputs), ("output", outputs)):
        for key, value in values.items():
            client.set_tag(run_id, f"ldmflow.{prefix}.{key}", str(value))


def _stage_run(stage: str, key: str, experiment: str, config, inputs: dict, outputs: dict) -> str:
    """An MLflow run for a stage that has none of its own (shard, precompute): config and lineage."""
    run_id = runs.start(experiment, f"{stage}-{key[:12]}", config, tags={"ldmflow.stage": stage, "ldmflow.cache_key": key})
    _lineage(run_id, inputs, outputs)
    tracking.client().set_terminated(run_id)
    return run_id


def _model_exists(uri: str) -> bool:
    try:
        models.resolve_version(uri)
        return True
    except models.ModelNotFound:
        return False


def _dataset_exists(url_field: str) -> Callable[[dict], bool]:
    return lambda outputs: storage.exists(image_shards.manifest_url(outputs[url_field]))


# ---------------------------------------------------------------------------------------
# The stages, in order: each made from the runner (the spec and the outputs before it)


def shard_stage(runner: Runner) -> Stage:
    """Raw images → image shards, in ``images-KEY`` (KEY: the source and the shard config)."""
    from ldmflow.flows import shard

    spec = runner.spec
    source = spec.pipeline.source if spec.pipeline.source.startswith("builtin:") else storage.absolute(spec.pipeline.source)
    key = configs.key(spec.shard, source=source)
    images = storage.join(runner.base, f"images-{key}")

    def write() -> dict:
        if "shard" in runner.force:
            for entry in list(storage.list_prefix(images)):
                storage.delete(entry.url)
        outcome = shard.run(source, images, spec.shard, runner.progress)
        outputs = {"images": images, "manifest_sha256": manifest_sha(images), "samples": outcome.manifest.num_samples}
        record = runner.record("shard", key)
        if outcome.unchanged and record and record["outputs"].get("manifest_sha256") == outputs["manifest_sha256"]:
            return record["outputs"] | {"unchanged": True}
        outputs["run_id"] = _stage_run("shard", key, runner.experiment, spec.shard, {"source": source}, outputs)
        return outputs

    return Stage("shard", key, write, _dataset_exists("images"), always=True)


def autoencoder_stage(runner: Runner) -> Stage:
    """Image shards → a registered autoencoder; or the configured one, reused."""
    from ldmflow.flows.autoencoder import train_autoencoder_flow

    spec, images = runner.spec, runner.outputs["shard"]
    if spec.pipeline.autoencoder:
        uri = spec.pipeline.autoencoder  # a concrete version, so the cache key changes when an alias moves
        if uri.startswith("models:/"):
            uri = models.resolve_version(uri).uri
        return Stage("autoencoder", configs.key(reuse=uri), lambda: {"model_uri": uri, "reused": True})

    def train() -> dict:
        trained = train_autoencoder_flow(images["images"], runner.fresh_run("autoencoder", spec.autoencoder),
                                         runner.progress)
        _lineage(trained.run_id, {"images": images["images"], "images_manifest_sha256": images["manifest_sha256"]},
                 {"model_uri": trained.model_uri, "weights_sha256": trained.info.weights_sha256})
        return {"model_uri": trained.model_uri, "run_id": trained.run_id,
                "weights_sha256": trained.info.weights_sha256, "psnr": trained.metrics.get("psnr")}

    key = configs.key(spec.autoencoder, images=images["manifest_sha256"])
    return Stage("autoencoder", key, train, lambda out: _model_exists(out["model_uri"]))


def precompute_stage(runner: Runner) -> Stage:
    """Image shards → latent shards, in ``latents-KEY`` (KEY: the image folder, autoencoder,
    config and encoding precision): new image shards are encoded into it, the unchanged ones
    skipped."""
    from ldmflow.data.precompute import encoding_precision
    from ldmflow.flows.precompute import precompute_flow

    spec, images, autoencoder = runner.spec, runner.outputs["shard"], runner.outputs["autoencoder"]["model_uri"]
    encoding = encoding_precision(spec.precompute)  # bf16 on GPUs under `auto`: other latents, another folder
    key = configs.key(spec.precompute, images=images["manifest_sha256"], autoencoder=autoencoder, encoding=encoding)
    latents = storage.join(runner.base, "latents-" + configs.key(spec.precompute, images=images["images"],
                                                                 autoencoder=autoencoder, encoding=encoding))

    def encode() -> dict:
        outcome = precompute_flow(images["images"], latents, autoencoder, spec.precompute, runner.progress)
        if outcome.manifest.failed_shards:
            raise RuntimeError(f"precompute: {len(outcome.manifest.failed_shards)} shards failed: "
                               f"{outcome.manifest.failed_shards[0]['error']} (rerun to retry them)")
        outputs = {"latents": latents, "manifest_sha256": manifest_sha(latents)}
        outputs["run_id"] = _stage_run("precompute", key, runner.experiment, spec.precompute,
                                       {"images": images["images"], "images_manifest_sha256": images["manifest_sha256"],
                                        "autoencoder": autoencoder}, outputs)
        return outputs

    return Stage("precompute", key, encode, _dataset_exists("latents"))


def train_stage(runner: Runner) -> Stage:
    """Latents → a registered model version (alias ``candidate``)."""
    from ldmflow.flows.train import train_flow

    config, latents = runner.spec.train, runner.outputs["precompute"]
    if config.init_from.startswith("models:/"):  # a concrete parent: the key changes when an alias moves
        config = replace(config, init_from=models.resolve_version(config.init_from).uri)
    key = configs.key(config, latents=latents["manifest_sha256"])

    def train() -> dict:
        trained = train_flow(latents["latents"], runner.fresh_run("train", config), runner.progress)
        _lineage(trained.run_id, {"latents": latents["latents"], "latents_manifest_sha256": latents["manifest_sha256"],
                                  "autoencoder": runner.outputs["autoencoder"]["model_uri"]},
                 {"model_uri": trained.model_uri})
        # The grid by its MLflow artifact URI: a stage record names nothing on this machine.
        return {"model_uri": trained.model_uri, "run_id": trained.run_id, "grid": f"runs:/{trained.run_id}/samples.png",
                "experiment": runner.experiment, **trained.metrics}

    return Stage("train", key, train, lambda out: _model_exists(out["model_uri"]))


def evaluate_stage(runner: Runner) -> Stage:
    """The new version's scores (they become its tags)."""
    from ldmflow.flows.promote import evaluate_flow

    model_uri = runner.outputs["train"]["model_uri"]

    def evaluate() -> dict:
        result = evaluate_flow(model_uri, runner.spec.evaluate, runner.progress)
        return {"model_uri": model_uri, "features": result.features, **result.metrics}

    return Stage("evaluate", configs.key(runner.spec.evaluate, model=model_uri), evaluate)


def promote_stage(runner: Runner) -> Stage:
    """The new version past the promotion gate, or refused."""
    from ldmflow.flows.promote import promote_flow

    spec = runner.spec
    model_uri = runner.outputs["train"]["model_uri"]
    name, version = model_uri[len("models:/"):].split("/")

    def promote() -> dict:
        decision = promote_flow(name, spec.promote, spec.evaluate, False, version, runner.progress)
        production = str(models.resolve_version(f"models:/{name}@production").version)
        return {"name": name, "candidate": version, "production": production,
                "decision": "promoted" if decision.promoted else "refused", "reason": decision.reason}

    key = configs.key(spec.promote, model=model_uri, evaluation=configs.key(spec.evaluate))
    return Stage("promote", key, promote, lambda out: _model_exists(f"models:/{name}/{out['production']}"))


def serve_stage(runner: Runner) -> Stage:
    """Production, served (never cached: it starts or updates the running application)."""
    from ldmflow.serving import app

    name = runner.outputs["train"]["model_uri"][len("models:/"):].split("/")[0]
    return Stage("serve", "", lambda: {"url": app.run(f"models:/{name}@production", runner.spec.serve,
                                                       promotion=runner.spec.promote)}, cached=False)


STAGE_MAKERS: dict[str, Callable[[Runner], Stage]] = {
    "shard": shard_stage, "autoencoder": autoencoder_stage, "precompute": precompute_stage, "train": train_stage,
    "evaluate": evaluate_stage, "promote": promote_stage, "serve": serve_stage,
}


@flow(name="pipeline")
def pipeline_flow(config: str | None = None, force: list[str] | None = None, stages: list[str] | None = None,
                  progress: bool = False) -> PipelineOutcome:
    """Raw images to a promoted model, skipping every stage whose inputs and config are unchanged.

    ``config``: the YAML file with every stage's section; ``force``: stages to rerun anyway;
    ``stages``: the stages to run (default: ``pipeline.stages``); a stage left out must have
    run before for the same inputs. The run ends with the last stage selected.
    """
    spec = load_spec(config, {"stages": stages} if stages else None)
    force_set = set(force or ())
    unknown = force_set - set(STAGES)
    if unknown:
        raise configs.ConfigError(f"force: unknown stage(s) {', '.join(sorted(unknown))}: choose from "
                                  f"{', '.join(STAGES)}")
    endpoints = spec.pipeline.endpoints.apply()
    get_run_logger().info("endpoints: %s", {k: v or "(embedded)" for k, v in endpoints.items()})
    root = storage.absolute(spec.pipeline.storage) if spec.pipeline.storage else str(state_dir() / "datasets")
    runner = Runner(storage.join(root, spec.pipeline.name), spec, force_set, progress)
    for name in runner.order:
        runner.run(STAGE_MAKERS[name](runner))
    return runner.outcome


def run(config: str | None, force: list[str] | None = None, stages: list[str] | None = None,
        progress: bool = False) -> PipelineOutcome:
    """Run the pipeline with every service endpoint from ``pipeline.endpoints`` or the environment."""
    return pipeline_flow(config=str(Path(config).absolute()) if config else None, force=force, stages=stages,
                         progress=progress)
