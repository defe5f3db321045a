"""The evaluation and promotion flows: score a model version on fixed seeds, and move the
``production`` alias only past the gate (:mod:`ldmflow.training.promotion`)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ldmflow.training.evaluation import Evaluation, EvaluationConfig, evaluate
from ldmflow.registry.gate import Decision, PromotionConfig
from ldmflow.training.promotion import promote


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(model_uri: str, config: EvaluationConfig, progress: bool) -> Evaluation:
    return evaluate(model_uri, config, progress=progress)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(name: str, config: PromotionConfig, eval_config: EvaluationConfig, force: bool,
                 version: str | None, progress: bool, why: str = "") -> Decision:
    return promote(name, config, eval_config, force=force, version=version, progress=progress, why=why)


@flow(name="evaluate")
def evaluate_flow(model_uri: str, config: EvaluationConfig = EvaluationConfig(), progress: bool = True) -> Evaluation:
    """Sample ``model_uri`` on fixed seeds and score it against its real images."""
    result = evaluate_task(model_uri, config, progress)
    get_run_logger().info(result.summary())
    return result


@flow(name="promote")
def promote_flow(name: str, config: PromotionConfig = PromotionConfig(),
                 eval_config: EvaluationConfig = EvaluationConfig(), force: bool = False,
                 version: str | None = None, progress: bool = True, why: str = "") -> Decision:
    """Evaluate the newest version of ``name`` (or ``version``) against ``production``; move
    the alias if it is better. ``why`` is recorded with the decision, with who ran it."""
    decision = promote_task(name, config, eval_config, force, version, progress, why)
    get_run_logger().info(decision.summary())
    return decision
