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

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger

from ldmflow import configs
from ldmflow.data import image_shards, storage
from ldmflow.errors import LdmflowError
from ldmflow.flows.settings import STAGES, Spec, load_spec
from ldmflow.registry import models, tracking
from ldmflow.state import state_dir


class StageNotRun(LdmflowError, RuntimeError):
    """A stage left out of this run whose output a later stage needs, and that has no record."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    skipped: bool
    outputs: dict[str, Any]
    seconds: float = 0.0

    def line(self) -> str:
        what = "skipped (done before with the same inputs and config)" if self.skipped else f"ran in {self.seconds:.0f} s"
        shown = [f"{k}={_short(self.outputs[k])}" for k in _SHOWN if k in self.outputs]
        return f"  {self.stage:12s} {what}  {' '.join(shown)}"


RECORD_VERSION = 1  # of a stage record's format
_SHOWN = ("images", "latents", "model_uri", "fd", "class_accuracy", "decision", "production", "url")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def local_grid(train_outputs: dict[str, Any]) -> str:
    """The training run's sample grid as a file under the state folder, fetched from MLflow
    when this machine does not have it (the run was trained elsewhere, or before)."""
    grid = train_outputs["grid"]
    run_id = train_outputs["run_id"]
    trained_here = next(state_dir().glob(f"runs/*-{run_id[:8]}/samples.png"), None)
    if trained_here is not None:
        return str(trained_here)
    folder = state_dir() / "runs" / run_id
    path = folder / "samples.png"
    if not path.exists():
        import mlflow.artifacts

        try:
            mlflow.artifacts.download_artifacts(artifact_uri=grid, dst_path=str(folder),
                                                tracking_uri=tracking.tracking_uri())
        except Exception as exc:  # the summary still stands without the picture
            return f"{grid} (not fetched: {str(exc).splitlines()[0][:200]})"
    return str(path)


@dataclass
class PipelineOutcome:
    results: list[StageResult] = field(default_factory=list)

    def __getitem__(self, stage: str) -> StageResult:
        return next(r for r in self.results if r.stage == stage)

    def outputs(self, stage: str) -> dict[str, Any]:
        return self[stage].outputs

    @property
    def skipped(self) -> list[str]:
        return [r.stage for r in self.results if r.skipped]

    def summary(self) -> str:
        lines = ["pipeline:"] + [r.line() for r in self.results]
        stages = {r.stage for r in self.results}
        if "train" in stages:
            train = self.outputs("train")
            lines.append(f"sample grid:       {local_grid(train)}")
            lines.append(f"MLflow run:        {train['run_id']} (experiment {train['experiment']})")
            lines.append(f"registered model:  {train['model_uri']}")
        if "promote" in stages:
            promote = self.outputs("promote")
            lines.append(f"production:        models:/{promote['name']}/{promote['production']} "
                         f"(models:/{promote['name']}@production)")
            lines.append(f"serve it:          ldmflow serve models:/{promote['name']}@production")
        uri = tracking.tracking_uri()
        lines.append(f"MLflow UI:         {uri}" if uri.startswith(("http://", "https://"))
                     else f"MLflow UI:         mlflow ui --backend-store-uri {uri}")
        return "\n".join(lines)


def manifest_sha(dataset: str) -> str:
    return hashlib.sha256(storage.read_text(image_shards.manifest_url(dataset)).encode()).hexdigest()


class Stages:
    """Runs or skips each stage by its record; keeps the results in order."""

    def __init__(self, base: str, spec: Spec, force: set[str], progress: bool = False) -> None:
        self.base, self.spec, self.force = base, spec, force
        self.selected = set(spec.pipeline.stages) | force
        self.order = STAGES[: max(STAGES.index(stage) for stage in self.selected) + 1]
        self.outcome = PipelineOutcome()
        self.log = get_run_logger()
        self.progress = progress

    def say(self, stage: str, what: str) -> None:
        """With progress on: which stage, what happens to it, which stages are left."""
        if self.progress:
            index = self.order.index(stage)
            left = self.order[index + 1 :]
            then = f" (then {', '.join(left)})" if left else ""
            print(f"pipeline: {index + 1}/{len(self.order)} {stage}: {what}{then}", file=sys.stderr, flush=True)

    def record_url(self, stage: str, key: str) -> str:
        return storage.join(self.base, "_stages", f"{stage}-{key}.json")

    def record(self, stage: str, key: str) -> dict | None:
        """The stage's record for ``key``; None when it has none, or one of another format
        version (the stage then runs again: a record is never converted)."""
        try:
            record = json.loads(storage.read_text(self.record_url(stage, key)))
        except storage.NotFound:
            return None
        if record.get("version", 0) != RECORD_VERSION:
            self.say(stage, f"its record is of format version {record.get('version', 0)}, not {RECORD_VERSION}: "
                            "not used")
            return None
        return record

    def run(self, stage: str, key: str, body: Callable[[], dict], still_there: Callable[[dict], bool],
            always: bool = False) -> dict:
        """The stage's outputs: from its record when it has one whose outputs are still there
        (unless forced, or selected and ``always``: then ``body`` decides, returning
        ``unchanged`` with the record's outputs when it found nothing to do), else from ``body``."""
        record_url = self.record_url(stage, key)
        record = self.record(stage, key)
        decides = always and stage in self.selected
        if record is not None and stage not in self.force and still_there(record["outputs"]) and not decides:
            result = StageResult(stage, key, True, record["outputs"])
            self.say(stage, "done before for these inputs, skipped")
        elif stage not in self.selected:
            raise StageNotRun(f"stage {stage} is not selected and has not run for these inputs (key {key}); "
                              f"add it to pipeline.stages")
        else:
            self.say(stage, "running")
            started = time.perf_counter()
            outputs = body()
            unchanged = outputs.pop("unchanged", False)
            result = StageResult(stage, key, unchanged, outputs, time.perf_counter() - started)
        if not result.skipped:
            storage.write_text(record_url, json.dumps({
                "version": RECORD_VERSION, "stage": stage, "key": key, "outputs": outputs, "config": self.config_of(stage),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2, sort_keys=True) + "\n")
        self.log.info(result.line())
        self.outcome.results.append(result)
        return result.outputs

    def config_of(self, stage: str) -> dict:
        section = getattr(self.spec, stage, None)
        return configs.to_dict(section) if section is not None else {}


def _lineage(run_id: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    client = tracking.client()
    for prefix, values in (("input", inputs), ("output", outputs)):
        for key, value in values.items():
            client.set_tag(run_id, f"ldmflow.{prefix}.{key}", str(value))


def _stage_run(stage: str, key: str, experiment: str, config, inputs: dict, outputs: dict) -> str:
    """An MLflow run for a stage that has none of its own (shard, precompute): config and lineage."""
    from ldmflow.training import runs

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


@flow(name="pipeline")
def pipeline_flow(config: str | None = None, force: list[str] | None = None, stages: list[str] | None = None,
                  progress: bool = False) -> PipelineOutcome:
    """Raw images to a promoted model, skipping every stage whose inputs and config are unchanged.

    ``config``: the YAML file with every stage's section; ``force``: stages to rerun anyway;
    ``stages``: the stages to run (default: ``pipeline.stages``); a stage left out must have
    run before for the same inputs.
    """
    from ldmflow.data.precompute import encoding_precision
    from ldmflow.flows.autoencoder import train_autoencoder_flow
    from ldmflow.flows.precompute import precompute_flow
    from ldmflow.flows.promote import evaluate_flow, promote_flow
    from ldmflow.flows import shard
    from ldmflow.flows.train import train_flow

    spec = load_spec(config, {"stages": stages} if stages else None)
    force_set = set(force or ())
    unknown = force_set - set(STAGES)
    if unknown:
        raise configs.ConfigError(f"force: unknown stage(s) {', '.join(sorted(unknown))}: choose from "
                                  f"{', '.join(STAGES)}")
    p = spec.pipeline
    endpoints = p.endpoints.apply()
    get_run_logger().info("endpoints: %s", {k: v or "(embedded)" for k, v in endpoints.items()})
    root = storage.absolute(p.storage) if p.storage else str(state_dir() / "datasets")
    base = storage.join(root, p.name)
    runner = Stages(base, spec, force_set, progress)
    experiment = spec.train.experiment
    last = max(STAGES.index(stage) for stage in runner.selected)

    def done(stage: str) -> bool:
        """Whether no selected stage comes after ``stage``: the run ends there."""
        return STAGES.index(stage) >= last

    # 1. shard: raw images → image shards
    source = storage.absolute(p.source) if not p.source.startswith("builtin:") else p.source
    key = configs.key(spec.shard, source=source)
    images = storage.join(base, f"images-{key}")

    def write_shards() -> dict:
        if "shard" in force_set:
            for entry in list(storage.list_prefix(images)):
                storage.delete(entry.url)
        outcome = shard.run(source, images, spec.shard, progress)
        outputs = {"images": images, "manifest_sha256": manifest_sha(images), "samples": outcome.manifest.num_samples}
        record = runner.record("shard", key)
        if outcome.unchanged and record and record["outputs"].get("manifest_sha256") == outputs["manifest_sha256"]:
            return record["outputs"] | {"unchanged": True}
        outputs["run_id"] = _stage_run("shard", key, experiment, spec.shard, {"source": source}, outputs)
        return outputs

    shard_out = runner.run("shard", key, write_shards, lambda out: storage.exists(image_shards.manifest_url(out["images"])),
                           always=True)
    if done("shard"):
        return runner.outcome

    # 2. autoencoder: train one (or reuse the configured one)
    if p.autoencoder:
        autoencoder_uri = p.autoencoder  # a concrete version, so the cache key changes when an alias moves
        if autoencoder_uri.startswith("models:/"):
            autoencoder_uri = models.resolve_version(autoencoder_uri).uri
        key = configs.key(reuse=autoencoder_uri)
        runner.run("autoencoder", key, lambda: {"model_uri": autoencoder_uri, "reused": True}, lambda out: True)
    else:
        key = configs.key(spec.autoencoder, images=shard_out["manifest_sha256"])

        def autoencoder() -> dict:
            trained = train_autoencoder_flow(images, spec.autoencoder, progress)
            outputs = {"model_uri": trained.model_uri, "run_id": trained.run_id,
                       "weights_sha256": trained.info.weights_sha256, "psnr": trained.metrics.get("psnr")}
            _lineage(trained.run_id, {"images": images, "images_manifest_sha256": shard_out["manifest_sha256"]},
                     {"model_uri": trained.model_uri, "weights_sha256": trained.info.weights_sha256})
            return outputs

        autoencoder_uri = runner.run("autoencoder", key, autoencoder, lambda out: _model_exists(out["model_uri"]))["model_uri"]
    if done("autoencoder"):
        return runner.outcome

    # 3. precompute: image shards → latent shards (a folder per image folder, autoencoder and
    # config: new image shards are encoded into it, the unchanged ones skipped)
    encoding = encoding_precision(spec.precompute)  # bf16 on GPUs under `auto`: other latents, another folder
    key = configs.key(spec.precompute, images=shard_out["manifest_sha256"], autoencoder=autoencoder_uri, encoding=encoding)
    latents = storage.join(base, "latents-" + configs.key(spec.precompute, images=images, autoencoder=autoencoder_uri,
                                                          encoding=encoding))

    def precompute() -> dict:
        outcome = precompute_flow(shard_out["images"], latents, autoencoder_uri, spec.precompute, progress)
        if outcome.manifest.failed_shards:
            raise RuntimeError(f"precompute: {len(outcome.manifest.failed_shards)} shards failed: "
                               f"{outcome.manifest.failed_shards[0]['error']} (rerun to retry them)")
        outputs = {"latents": latents, "manifest_sha256": manifest_sha(latents)}
        outputs["run_id"] = _stage_run("precompute", key, experiment, spec.precompute,
                                       {"images": shard_out["images"], "images_manifest_sha256": shard_out["manifest_sha256"],
                                        "autoencoder": autoencoder_uri}, outputs)
        return outputs

    latent_out = runner.run("precompute", key, precompute, lambda out: storage.exists(image_shards.manifest_url(out["latents"])))
    if done("precompute"):
        return runner.outcome

    # 4. train: latents → registered model version (alias candidate)
    train_spec = spec.train
    if train_spec.init_from.startswith("models:/"):  # a concrete parent: the key changes when an alias moves
        train_spec = replace(train_spec, init_from=models.resolve_version(train_spec.init_from).uri)
    key = configs.key(train_spec, latents=latent_out["manifest_sha256"])

    def train() -> dict:
        train_config = train_spec
        if "train" in force_set:  # a fresh run, not a resumption of the finished one
            checkpoints = train_config.checkpoint_storage or str(state_dir() / "ray_results")
            train_config = replace(train_config, checkpoint_storage=f"{checkpoints.rstrip('/')}/forced-{int(time.time())}")
        trained = train_flow(latent_out["latents"], train_config, progress)
        # The grid by its MLflow artifact URI: a stage record names nothing on this machine.
        outputs = {"model_uri": trained.model_uri, "run_id": trained.run_id, "grid": f"runs:/{trained.run_id}/samples.png",
                   "experiment": experiment, **trained.metrics}
        _lineage(trained.run_id, {"latents": latent_out["latents"], "latents_manifest_sha256": latent_out["manifest_sha256"],
                                  "autoencoder": autoencoder_uri}, {"model_uri": trained.model_uri})
        return outputs

    train_out = runner.run("train", key, train, lambda out: _model_exists(out["model_uri"]))
    if done("train"):
        return runner.outcome
    model_uri = train_out["model_uri"]
    name, version = model_uri[len("models:/"):].split("/")

    # 5. evaluate the new version (scores become its tags)
    key = configs.key(spec.evaluate, model=model_uri)

    def evaluate() -> dict:
        result = evaluate_flow(model_uri, spec.evaluate, progress)
        return {"model_uri": model_uri, "features": result.features, **result.metrics}

    runner.run("evaluate", key, evaluate, lambda out: True)
    if done("evaluate"):
        return runner.outcome

    # 6. promote it past the gate (or not)
    key = configs.key(spec.promote, model=model_uri, evaluation=configs.key(spec.evaluate))

    def promote() -> dict:
        decision = promote_flow(name, spec.promote, spec.evaluate, False, version, progress)
        production = str(models.resolve_version(f"models:/{name}@production").version)
        return {"name": name, "candidate": version, "production": production,
                "decision": "promoted" if decision.promoted else "refused", "reason": decision.reason}

    runner.run("promote", key, promote, lambda out: _model_exists(f"models:/{name}/{out['production']}"))
    if done("promote"):
        return runner.outcome

    # 7. serve (never cached: it starts or updates the running application)
    from ldmflow.serving import app

    url = app.run(f"models:/{name}@production", spec.serve)
    runner.outcome.results.append(StageResult("serve", "", False, {"url": url}))
    return runner.outcome


def run(config: str | None, force: list[str] | None = None, stages: list[str] | None = None,
        progress: bool = False) -> PipelineOutcome:
    """Run the pipeline with every service endpoint from ``pipeline.endpoints`` or the environment."""
    return pipeline_flow(config=str(Path(config).absolute()) if config else None, force=force, stages=stages,
                         progress=progress)
