"""The promotion gate, one for every way in: a candidate version takes the ``production``
alias only when its evaluation beats production's by the configured metric and margin (or
when forced, or when no version holds it yet), and every decision is recorded on the
candidate with who made it and why.

``ldmflow promote`` (:func:`ldmflow.training.promotion.promote`) evaluates what has no
evaluation yet, then decides here; the sampler's ``POST /v1/promote`` decides here on the
evaluations already recorded (:func:`promote_recorded`), so both leave the same record:
tags ``ldmflow.promotion.*`` on the candidate (decision, reason, metric, both scores, the
production version it was weighed against, forced, who, why, time) and, when promoted, the
alias moves and production history of :mod:`ldmflow.registry.aliases`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ldmflow import configs
from ldmflow.registry import aliases, tracking
from ldmflow.registry.aliases import PRODUCTION, RegistryError
from ldmflow.registry.models import CANDIDATE, EVAL_TAG

DECISION_TAG = "ldmflow.promotion."
# Each evaluation metric, and whether lower is better.
LOWER_IS_BETTER = {"fd": True, "kid": True, "class_accuracy": False, "prompt_accuracy": False,
                   "prompt_accuracy_unseen": False}


@configs.stage_config
class PromotionConfig:
    """Promotion: when a candidate takes the ``production`` alias."""

    metric: Annotated[Literal["fd", "kid", "class_accuracy", "prompt_accuracy", "prompt_accuracy_unseen"], Field(
        description="`fd`, `kid`, `class_accuracy` (class models), `prompt_accuracy` or `prompt_accuracy_unseen` "
                    "(text models)")] = "fd"
    margin: Annotated[float, Field(
        ge=0, description="how much better the candidate must be, in the metric's units")] = 0.0


class GateError(RegistryError):
    """A decision the gate cannot make: a version without the evaluation it needs."""


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


def is_better(candidate: float, production: float, metric: str, margin: float) -> bool:
    if LOWER_IS_BETTER[metric]:
        return candidate < production - margin
    return candidate > production + margin


def candidate_version(name: str, version: str | None = None, *, mark: bool = True) -> str:
    """The version to decide on: ``version`` (a number or an alias), else the newest; with
    ``mark`` it takes the ``candidate`` alias."""
    if version and not str(version).isdigit():
        alias, version = version, aliases.version_of(name, version)
        if version is None:
            raise RegistryError(f"{name}: no version has the alias {alias}")
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
    if mark:
        client.set_registered_model_alias(name, CANDIDATE, candidate)
    return candidate


def decide(name: str, candidate: str, production: str | None, config: PromotionConfig, candidate_score: float,
           production_score: float | None, *, force: bool = False, who: str = "", why: str = "") -> Decision:
    """Weigh ``candidate`` against ``production`` on their scores, record the decision on the
    candidate (with ``who`` made it and ``why``), and move ``production`` when it is promoted."""
    if production is None:
        promoted, reason = True, f"no version held {PRODUCTION} ({config.metric} {candidate_score:.4g})"
    else:
        comparison = (f"{config.metric} {candidate_score:.4g} (version {candidate}) vs {production_score:.4g} "
                      f"(version {production}), margin {config.margin:g}")
        if is_better(candidate_score, production_score, config.metric, config.margin):
            promoted, reason = True, f"better: {comparison}"
        elif force:
            promoted, reason = True, f"forced although not better: {comparison}"
        else:
            promoted, reason = False, f"not better: {comparison}"
    decision = Decision(name, candidate, production, promoted, reason, config.metric, candidate_score, production_score)
    record(decision, {"forced": str(force).lower(), "by": who, "why": why})
    if promoted:
        past = [v for v in aliases.history(name) if v != candidate]
        if production is not None and (not past or past[-1] != production):
            past.append(production)  # production set by hand, outside promote
        aliases.set_production(name, candidate, past + [candidate])
    return decision


def record(decision: Decision, more: dict[str, str]) -> None:
    """The decision's tags on the candidate version."""
    tags = {"decision": "promoted" if decision.promoted else "refused", "reason": decision.reason,
            "metric": decision.metric, "candidate_score": repr(decision.candidate_score),
            "production_version": decision.production or "",
            "production_score": "" if decision.production_score is None else repr(decision.production_score),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **more}
    client = tracking.client()
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.candidate, DECISION_TAG + key, value)


def recorded_score(name: str, version: str, metric: str) -> tuple[float, str]:
    """A version's recorded ``metric`` and the digest of the evaluation config that made it."""
    tags = tracking.client().get_model_version(name, version).tags
    value = tags.get(EVAL_TAG + metric)
    if value is None:
        raise GateError(f"{name} version {version} has no recorded {metric}: evaluate it first "
                        f"(ldmflow evaluate models:/{name}/{version})")
    return float(value), tags.get(EVAL_TAG + "config", "")


def promote_recorded(name: str, version: str, config: PromotionConfig = PromotionConfig(), *, force: bool = False,
                     who: str = "", why: str = "") -> Decision:
    """The gate on the evaluations already recorded: ``version`` against the one holding
    ``production``, both scored with the same evaluation config (refused otherwise)."""
    candidate = candidate_version(name, version)
    production = aliases.version_of(name, PRODUCTION)
    if production == candidate:
        return Decision(name, candidate, production, False, f"version {candidate} already holds {PRODUCTION}",
                        config.metric)
    candidate_score, digest = recorded_score(name, candidate, config.metric)
    production_score = None
    if production is not None:
        production_score, production_digest = recorded_score(name, production, config.metric)
        if production_digest != digest:
            raise GateError(f"{name} versions {candidate} and {production} were evaluated with different configs: "
                            f"evaluate both with one (ldmflow promote evaluates what it needs)")
    return decide(name, candidate, production, config, candidate_score, production_score, force=force, who=who,
                  why=why)


def reject(name: str, version: str, *, who: str = "", why: str = "") -> Decision:
    """Record that a person looked at ``version`` and refused it; nothing moves, no alias either."""
    candidate = candidate_version(name, version, mark=False)
    production = aliases.version_of(name, PRODUCTION)
    decision = Decision(name, candidate, production, False, f"rejected by {who or 'a reviewer'}: {why}".rstrip(": "),
                        "")
    record(decision, {"decision": "rejected", "forced": "false", "by": who, "why": why})
    return decision
