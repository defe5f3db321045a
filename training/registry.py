"""Promotion behind an evaluation gate, and rollback: aliases of MLflow registered models.

Every trained version gets the alias ``candidate``. :func:`promote` evaluates the newest
version against the one holding ``production`` on the same fixed seeds and moves
``production`` only when the candidate is better by the configured metric and margin (or
when forced, or when there is no production version yet). The decision and both scores are
tags of the candidate version. The registered model keeps the list of versions that held
``production`` (tag ``ldmflow.production_history``); ``previous`` points at the one before
the current, which :func:`rollback` restores. Stages (deprecated in MLflow) are not used.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training import evaluation, tracking

CANDIDATE = "candidate"
PRODUCTION = "production"
PREVIOUS = "previous"
HISTORY_TAG = "ldmflow.production_history"
DECISION_TAG = "ldmflow.promotion."


@dataclass(frozen=True)
class PromotionConfig:
    """Configuration of ``ldmflow promote`` (section ``promote:`` of a config file)."""

    metric: Literal["fd", "kid", "class_accuracy"] = "fd"
    margin: float = 0.0  # the candidate must beat production by more than this (in the metric's units)

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError("margin must be non-negative")


class RegistryError(LookupError):
    """A registered model or alias that is not there, or a history with nothing to go back to."""


@dataclass(frozen=True)
class Decision:
    name: str
    candidate: str  # version
    production: str | None  # the version that held production before, if any
    promoted: bool
    reason: str
    metric: str
    candidate_score: float | None = None
    production_score: float | None = None

    def summary(self) -> str:
        verb = "promoted" if self.promoted else "kept"
        subject = f"version {self.candidate}" if self.promoted else f"version {self.production}"
        return f"promote: {self.name}: {verb} {subject} at {PRODUCTION}: {self.reason}"


def register(model_folder: str | Path, name: str, run_id: str):
    """Log the model folder to ``run_id`` as an MLflow pyfunc model (artifact path ``model``)
    and register it as a new version of ``name`` with the alias ``candidate``; the version's
    tags carry the model's lineage."""
    from serving import model as model_format

    info = model_format.read_info(model_format.model_folder(model_folder))
    with tempfile.TemporaryDirectory() as scratch:
        packaged = model_format.package_mlflow(model_folder, Path(scratch) / "model")
        tracking.client().log_artifacts(run_id, str(packaged), "model")
    registered = tracking.register_folder(name, run_id, "model", tags=lineage_tags(info))
    tracking.client().set_registered_model_alias(name, CANDIDATE, registered.version)
    return registered


def lineage_tags(info) -> dict[str, str]:
    """Model-version tags that link back through training run, latents, autoencoder and images."""
    tags = {f"ldmflow.{key}": str(value) for key, value in info.lineage.items()}
    tags["ldmflow.autoencoder"] = str(info.autoencoder.get("uri", ""))
    tags["ldmflow.autoencoder_sha256"] = str(info.autoencoder.get("weights_sha256", ""))
    tags["ldmflow.conditioning"] = info.conditioning
    return tags


def _alias_version(name: str, alias: str) -> str | None:
    try:
        return str(tracking.client().get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def history(name: str) -> list[str]:
    """Versions that held ``production``, oldest first, the current one last."""
    tags = tracking.client().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _set_production(name: str, version: str, versions: list[str]) -> None:
    client = tracking.client()
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(versions))
    client.set_registered_model_alias(name, PRODUCTION, version)
    if len(versions) > 1:
        client.set_registered_model_alias(name, PREVIOUS, versions[-2])
    elif _alias_version(name, PREVIOUS) is not None:
        client.delete_registered_model_alias(name, PREVIOUS)


def score(name: str, version: str, config: evaluation.EvaluationConfig) -> evaluation.Evaluation:
    """The version's evaluation with ``config``: the recorded one, or a fresh one."""
    return evaluation.recorded(name, version, config) or evaluation.evaluate(f"models:/{name}/{version}", config)


def is_better(candidate: float, production: float, metric: str, margin: float) -> bool:
    if evaluation.LOWER_IS_BETTER[metric]:
        return candidate < production - margin
    return candidate > production + margin


def promote(name: str, config: PromotionConfig = PromotionConfig(),
            eval_config: evaluation.EvaluationConfig = evaluation.EvaluationConfig(), *, force: bool = False,
            version: str | None = None) -> Decision:
    """Evaluate the newest version of ``name`` (or ``version``) and move ``production`` to it
    if it is better."""
    client = tracking.client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        raise RegistryError(f"{name}: not in the model registry at {tracking.tracking_uri()}") from exc
    if not versions:
        raise RegistryError(f"{name}: no registered versions")
    candidate = str(version) if version else str(max(int(v.version) for v in versions))
    if candidate not in {str(v.version) for v in versions}:
        raise RegistryError(f"{name}: no version {candidate}")
    client.set_registered_model_alias(name, CANDIDATE, candidate)
    production = _alias_version(name, PRODUCTION)
    if production == candidate:
        return Decision(name, candidate, production, False, "the newest version already holds it", config.metric)

    cand_eval = score(name, candidate, eval_config)
    if config.metric not in cand_eval.metrics:
        raise ValueError(f"metric: {config.metric} is not measured for this model ({', '.join(cand_eval.metrics)})")
    cand_score = cand_eval.metrics[config.metric]
    prod_score = None
    if production is None:
        promoted, reason = True, f"no version held {PRODUCTION} ({config.metric} {cand_score:.4g})"
    else:
        prod_score = score(name, production, eval_config).metrics[config.metric]
        better = is_better(cand_score, prod_score, config.metric, config.margin)
        comparison = (f"{config.metric} {cand_score:.4g} (version {candidate}) vs {prod_score:.4g} "
                      f"(version {production}), margin {config.margin:g}")
        if better:
            promoted, reason = True, f"better: {comparison}"
        elif force:
            promoted, reason = True, f"forced although not better: {comparison}"
        else:
            promoted, reason = False, f"not better: {comparison}"
    decision = Decision(name, candidate, production, promoted, reason, config.metric, cand_score, prod_score)
    tags = {"decision": "promoted" if promoted else "refused", "reason": reason, "metric": config.metric,
            "candidate_score": repr(cand_score), "production_version": production or "",
            "production_score": "" if prod_score is None else repr(prod_score), "forced": str(force).lower(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate, DECISION_TAG + key, value)
    if promoted:
        past = [v for v in history(name) if v != candidate]
        if production is not None and (not past or past[-1] != production):
            past.append(production)  # production set by hand, outside promote
        _set_production(name, candidate, past + [candidate])
    return decision


@dataclass(frozen=True)
class Rollback:
    name: str
    restored: str
    replaced: str

    def summary(self) -> str:
        return f"rollback: {self.name}: {PRODUCTION} is version {self.restored} again (was {self.replaced})"


def rollback(name: str) -> Rollback:
    """Move ``production`` back to the version that held it before the current one."""
    past = history(name)
    current = _alias_version(name, PRODUCTION)
    if current is None:
        raise RegistryError(f"{name}: no version holds {PRODUCTION}")
    if past and past[-1] == current:
        past = past[:-1]
    if not past:
        raise RegistryError(f"{name}: version {current} is the first to hold {PRODUCTION}; there is nothing to roll back to")
    restored = past[-1]
    _set_production(name, restored, past)
    tracking.client().set_model_version_tag(name, restored, "ldmflow.rollback",
                                            f"restored {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                                            f"replacing version {current}")
    return Rollback(name, restored, current)
