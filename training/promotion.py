"""Promotion behind an evaluation gate: moving the ``production`` alias, or refusing to.

Every trained version gets the alias ``candidate``. :func:`promote` evaluates the newest
version and the one holding ``production`` on the same fixed seeds (unless their
evaluations with this config are recorded), then the gate of :mod:`ldmflow.registry.gate`
moves ``production`` only when the candidate is better by the configured metric and margin
(or when forced, or when there is no production version yet). The decision, both scores,
who and why are tags of the candidate version. The registered model keeps the list of versions that held
``production`` (tag ``ldmflow.production_history``); ``previous`` points at the one before
the current, which :func:`ldmflow.registry.aliases.rollback` restores. Stages (deprecated
in MLflow) are not used.
"""

from __future__ import annotations

import getpass

from ldmflow import configs
from ldmflow.registry import aliases, gate
from ldmflow.registry.aliases import PRODUCTION
from ldmflow.registry.gate import Decision, PromotionConfig
from ldmflow.training import evaluation


def score(name: str, version: str, config: evaluation.EvaluationConfig, progress: bool = False) -> evaluation.Evaluation:
    """The version's evaluation with ``config``: the recorded one, or a fresh one."""
    return evaluation.recorded(name, version, config) or evaluation.evaluate(f"models:/{name}/{version}", config,
                                                                             progress=progress)


def promote(name: str, config: PromotionConfig = PromotionConfig(),
            eval_config: evaluation.EvaluationConfig = evaluation.EvaluationConfig(), *, force: bool = False,
            version: str | None = None, progress: bool = False, who: str = "", why: str = "") -> Decision:
    """Evaluate the newest version of ``name`` (or ``version``) and production's, where not
    evaluated with ``eval_config`` yet, then decide at the gate (:func:`ldmflow.registry.gate.decide`):
    ``production`` moves to it if it is better (``progress``: show each evaluation's images
    drawn). ``who`` defaults to the user running it."""
    candidate = gate.candidate_version(name, version)
    production = aliases.version_of(name, PRODUCTION)
    if production == candidate:
        return Decision(name, candidate, production, False, "the newest version already holds it", config.metric)
    cand_eval = score(name, candidate, eval_config, progress)
    if config.metric not in cand_eval.metrics:
        raise configs.ConfigError(f"promote.metric: {config.metric} is not measured for this model "
                                  f"({', '.join(cand_eval.metrics)})")
    prod_score = None if production is None else score(name, production, eval_config, progress).metrics[config.metric]
    return gate.decide(name, candidate, production, config, cand_eval.metrics[config.metric], prod_score, force=force,
                       who=who or getpass.getuser(), why=why)
