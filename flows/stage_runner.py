"""How the pipeline runs a stage: the one shape every stage has (:class:`Stage`), the runner
that skips a stage whose record says it is done for these inputs and records it when it ran
(:class:`Runner`), and what a run did (:class:`PipelineOutcome`, its summary).

A record is ``STORAGE/NAME/_stages/STAGE-KEY.json``: its format version, the key, the
outputs, the stage's config and when it finished.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from prefect import get_run_logger

from ldmflow import configs
from ldmflow.data import image_shards, storage
from ldmflow.errors import LdmflowError
from ldmflow.flows.settings import STAGES, Spec
from ldmflow.registry import tracking
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


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, in the one shape every step has: its cache key, the work
    (returning its outputs), and whether a record's outputs are still there to be reused.

    ``always``: when selected, the work runs even with a record and decides itself (the shard
    stage, whose flow finds in one listing whether the source changed; it returns
    ``unchanged`` with the record's outputs when nothing did). ``cached`` False: never
    recorded or skipped (serving, which starts or updates a running application)."""

    name: str
    key: str
    run: Callable[[], dict]
    still_there: Callable[[dict], bool] = lambda outputs: True
    always: bool = False
    cached: bool = True


class Runner:
    """Runs or skips each stage by its record; keeps every stage's outputs and the results in order."""

    def __init__(self, base: str, spec: Spec, force: set[str], progress: bool = False) -> None:
        self.base, self.spec, self.force, self.progress = base, spec, force, progress
        self.selected = set(spec.pipeline.stages) | force
        self.order = STAGES[: max(STAGES.index(stage) for stage in self.selected) + 1]
        self.outcome = PipelineOutcome()
        self.outputs: dict[str, dict[str, Any]] = {}  # each stage's, by name, for the stages after it
        self.log = get_run_logger()

    @property
    def experiment(self) -> str:
        return self.spec.train.experiment

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

    def fresh_run(self, stage: str, config: Any) -> Any:
        """A training stage's ``config``, with its Ray Train checkpoints in a new place when the
        stage is forced, so it starts afresh instead of resuming its finished run."""
        if stage not in self.force:
            return config
        checkpoints = config.ray_train.checkpoint_storage or str(state_dir() / "ray_results")
        fresh = f"{checkpoints.rstrip('/')}/forced-{int(time.time())}"
        return replace(config, ray_train=replace(config.ray_train, checkpoint_storage=fresh))

    def run(self, stage: Stage) -> dict:
        """The stage's outputs: from its record when it has one whose outputs are still there
        (unless forced, or selected and ``always``), else from its work; recorded when it ran."""
        record = self.record(stage.name, stage.key) if stage.cached else None
        decides = stage.always and stage.name in self.selected
        if record is not None and stage.name not in self.force and stage.still_there(record["outputs"]) and not decides:
            result = StageResult(stage.name, stage.key, True, record["outputs"])
            self.say(stage.name, "done before for these inputs, skipped")
        elif stage.name not in self.selected:
            raise StageNotRun(f"stage {stage.name} is not selected and has not run for these inputs (key {stage.key}); "
                              f"add it to pipeline.stages")
        else:
            self.say(stage.name, "running")
            started = time.perf_counter()
            outputs = stage.run()
            unchanged = outputs.pop("unchanged", False)
            result = StageResult(stage.name, stage.key, unchanged, outputs, time.perf_counter() - started)
        if stage.cached and not result.skipped:
            storage.write_text(self.record_url(stage.name, stage.key), json.dumps({
                "version": RECORD_VERSION, "stage": stage.name, "key": stage.key, "outputs": result.outputs,
                "config": self.config_of(stage.name), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2, sort_keys=True) + "\n")
        self.log.info(result.line())
        self.outcome.results.append(result)
        self.outputs[stage.name] = result.outputs
        return result.outputs

    def config_of(self, stage: str) -> dict:
        section = getattr(self.spec, stage, None)
        return configs.to_dict(section) if section is not None else {}
