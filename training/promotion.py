"""Promotion behind an evaluation gate: moving the ``production`` alias, or refusing to.

Every trained version gets the alias ``candidate``. :func:`promote` evaluates the newest
version against the one holding ``production`` on the same fixed seeds and moves
``production`` only when the candidate is better by the configured metric and margin (or
when forced, or when there is no production version yet). The decision and both scores are
tags of the candidate version. The registered model keeps the list of versions that held
``production`` (tag ``ldmflow.production_history``); ``previous`` points at the one before
the current, which :func:`ldmflow.registry.aliases.rollback` restores. Stages (deprecated
in MLflow) are not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs
from ldmflow.registry import aliases, tracking
from ldmflow.registry.aliases import PRODUCTION, RegistryError
from ldmflow.registry.models import CANDIDATE
from ldmflow.training import evaluation

DECISION_TAG = "ldmflow.promotion."


@configs.stage_config
class PromotionConfig:
    """Promotion: when a candidate takes the ``production`` alias."""

    metric: Annotated[Literal["fd", "kid", "class_accuracy", "prompt_accuracy", "prompt_accuracy_unseen"], Field(
        description="`fd`, `kid`, `class_accuracy` (class models), `prompt_accuracy` or `prompt_accuracy_unseen` "
                    "(text models)")] = "fd"
    margin: Annotated[float, Field(
        ge=0, description="how much better the candidate must be, in the metric's units")] = 0.0


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


def score(name: str, version: str, config: evaluation.EvaluationConfig, progress: bool = False) -> evaluation.Evaluation:
    """The version's evaluation with ``config``: the recorded one, or a fresh one."""
    return evaluation.recorded(name, version, config) or evaluation.evaluate(f"models:/{name}/{version}", config,
                                                                             progress=progress)


def is_better(candidate: float, production: float, metric: str, margin: float) -> bool:
    if evaluation.LOWER_IS_BETTER[metric]:
        return candidate < production - margin
    return candidate > production + margin


def promote(name: str, config: PromotionConfig = PromotionConfig(),
            eval_config: evaluation.EvaluationConfig = evaluation.EvaluationConfig(), *, force: bool = False,
            version: str | None = None, progress: bool = False) -> Decision:
    """Evaluate the newest version of ``name`` (or ``version``) and move ``production`` to it
    if it is better (``progress``: show each evaluation's images drawn)."""
    client = tracking.client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        raise RegistryError(f"{name}: not in the model registry at {tracking.shown_uri()}") from exc
    if not versions:
        raise RegistryError(f"{name}: no registered versions")
    candidate = str(version) if version else str(max(int(v.version) for v in versions))
    if candidate not in {str(v.version) for v in versions}:
        raise RegistryError(f"{name}: no version {candidate}")
    client.set_registered_model_alias(name, CANDIDATE, candidate)
    production = aliases.version_of(name, PRODUCTION)
    if production == candidate:
        return Decision(name, candidate, production, False, "the newest version already holds it", config.metric)

    cand_eval = score(name, candidate, eval_config, progress)
    if config.metric not in cand_eval.metrics:
        raise configs.ConfigError(f"promote.metric: {config.metric} is not measured for this model "
                                  f"({', '.join(cand_eval.metrics)})")
    cand_score = cand_eval.metrics[config.metric]
    prod_score = None
    if production is None:
        promoted, reason = True, f"no version held {PRODUCTION} ({config.metric} {cand_score:.4g})"
    else:
        prod_score = score(name, production, eval_config, progress).metrics[config.metric]
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
        past = [v for v in aliases.history(name) if v != candidate]
        if production is not None and (not past or past[-1] != production):
            past.append(production)  # production set by hand, outside promote
        aliases.set_production(name, candidate, past + [candidate])
    return decision
