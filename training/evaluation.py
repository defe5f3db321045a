"""Sample quality: Fréchet distance, KID and class accuracy of a model's samples against the
real images it was trained on, on fixed seeds; for a text model, how often a prompt's samples
are its class, on the training captions and on phrasings never seen in training.

The distances are torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` over features of :mod:`ldmflow.training.features`: Inception's
when its weights are on the machine (then they are the usual FID and KID), otherwise the
domain classifier's. The reference side's features are cached per dataset manifest and
extractor. Every result says which features it used: the numbers of two feature spaces are
not comparable.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ldmflow import configs
from ldmflow.errors import InputError
from ldmflow.console import Progress
from ldmflow.data import builtin
from ldmflow.registry import models, tracking
from ldmflow.registry.gate import LOWER_IS_BETTER
from ldmflow.training import features



@configs.stage_config
class EvaluationConfig:
    """Evaluation: FD, KID and class accuracy of a model's samples on fixed seeds."""

    num_samples: Annotated[int, Field(ge=1, description="generated images")] = 500
    reference_samples: Annotated[int, Field(
        ge=1, description="real images, drawn at random (seeded by `seed`) from every shard of the reference; "
                          "all of a smaller dataset")] = 2000
    reference: Annotated[str, Field(
        description="image dataset to compare with; empty: the one the model was trained on")] = ""
    seed: Annotated[int, Field(description="image *i* is drawn with seed + i; the real images are drawn from it too")] = 0
    sampler: Annotated[str, Field(description="empty: the model's default")] = ""
    steps: Annotated[int, Field(ge=0, description="0: the model's default")] = 0
    guidance: Annotated[float, Field(ge=0, description="0: the model's default")] = 0.0
    batch_size: Annotated[int, Field(
        ge=1, description="images per sampler call and per feature batch")] = configs.execution(100)
    workers: Annotated[int, Field(
        ge=0, description="Ray tasks that draw the images, each a contiguous share of the seeds (a GPU each where "
                          "the cluster has them); 0: in this process. The images are the same either way")
    ] = configs.execution(0)
    features: Annotated[Literal["auto", "inception", "domain"], Field(
        description="`auto` (Inception when `inception_path` is set), `inception` or `domain`")] = "auto"
    inception_path: Annotated[str, Field(description="local TorchScript Inception file")] = ""
    kid_subset_size: Annotated[int, Field(ge=2, description="samples per KID subset")] = 100
    kid_subsets: Annotated[int, Field(ge=1, description="KID subsets averaged")] = 50
    held_out_prompts: Annotated[dict[str, list[str]], Field(
        description="text models on a labelled dataset: per class name, prompts no training caption uses, "
                    "whose samples score `prompt_accuracy_unseen`; empty: a built-in source's held-out "
                    "phrasings")] = field(default_factory=dict)

    def digest(self) -> str:
        """Identifies the evaluation: results with the same digest are comparable and reusable
        (``reference``: how the real images are drawn; scores of first-N references differ)."""
        return configs.key(self, reference="random")


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # fd, kid; class_accuracy (class models); prompt_accuracy[_unseen] (text)
    features: str  # "inception" or "domain-classifier"
    num_samples: int
    num_reference: int
    reference: str
    config_digest: str
    model_uri: str = ""

    def summary(self) -> str:
        parts = [f"{k} {v:.4g}" for k, v in sorted(self.metrics.items())]
        return (f"evaluate: {self.model_uri or 'model'}: {', '.join(parts)} ({self.features} features, "
                f"{self.num_samples} samples vs {self.num_reference} real images of {self.reference})")


class _Given(torch.nn.Module):
    """The "feature extractor" of metrics fed features computed (and cached) beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def distances(fake: torch.Tensor, real: torch.Tensor, *, kid_subset_size: int = 100, kid_subsets: int = 50,
              seed: int = 0) -> dict[str, float]:
    """FD (Heusel et al. 2017) and KID (Bińkowski et al. 2018, cubic polynomial kernel) between
    two feature sets (N, D), by torchmetrics; KID's random subsets are drawn from ``seed``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    given = _Given(real.shape[1])
    size = min(kid_subset_size, len(fake), len(real))
    if size < 2:
        raise InputError("evaluate: KID needs at least two samples in each set (num_samples, reference_samples, "
                         "kid_subset_size)")
    fid = FrechetInceptionDistance(feature=given)
    with warnings.catch_warnings():  # that it keeps every feature: the sets here are small and bounded
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer", category=UserWarning)
        kid = KernelInceptionDistance(feature=given, subsets=kid_subsets, subset_size=size)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, _ = kid.compute()
    return {"fd": float(fid.compute()), "kid": float(kid_mean)}


# ---------------------------------------------------------------------------------------
# Evaluating a model


def draw(sampler, config: EvaluationConfig, captions: list[str],
         progress: Progress | None = None, model_uri: str = "") -> tuple[torch.Tensor, list[int | None]]:
    """``num_samples`` images on fixed seeds: evenly over the classes of a class model, on the
    reference captions (cycled) for a text model, unconditional otherwise (on ``workers``
    Ray tasks, which load the model from ``model_uri``, when both are set)."""
    info = sampler.info
    n = config.num_samples
    if info.conditioning == "class":
        classes = len(info.class_names or ())
        labels: list[int | None] = [i * classes // n for i in range(n)]
    else:
        labels = [None] * n
    prompts = [captions[i % len(captions)] for i in range(n)] if info.conditioning == "text" else [None] * n
    return _sample(sampler, config, labels, prompts, progress, model_uri=model_uri), labels


def _sample(sampler, config: EvaluationConfig, labels: list[int | None], prompts: list[str | None],
            progress: Progress | None, first_seed: int = 0, model_uri: str = "") -> torch.Tensor:
    """Image *i* under ``labels[i]`` or ``prompts[i]``, seed ``config.seed + first_seed + i``."""
    if config.workers > 0 and model_uri and len(labels) > 1:
        return _sample_on_workers(model_uri, config, labels, prompts, progress, first_seed)
    settings = dict(sampler=config.sampler or None, steps=config.steps or None, guidance=config.guidance or None)
    images = []
    for start in range(0, len(labels), config.batch_size):
        jobs = [sampler.job(n=1, seed=config.seed + first_seed + i, label=labels[i], prompt=prompts[i], **settings)
                for i in range(start, min(len(labels), start + config.batch_size))]
        images.extend(sampler.run(jobs))
        if progress is not None:
            progress.advance(len(jobs))
    return torch.cat(images)


def _sample_on_workers(model_uri: str, config: EvaluationConfig, labels: list[int | None], prompts: list[str | None],
                       progress: Progress | None, first_seed: int) -> torch.Tensor:
    """:func:`_sample` split into ``config.workers`` contiguous shares of the seeds, each a Ray
    task that loads the model itself; the images come back in seed order."""
    import ray

    from ldmflow.data import cluster

    cluster.ensure_ray()
    shares = min(config.workers, len(labels))
    bounds = [len(labels) * k // shares for k in range(shares + 1)]
    env = cluster.storage_runtime_env().get("env_vars", {}) | {tracking.ENV_TRACKING_URI: tracking.tracking_uri()}
    draw_share = ray.remote(num_cpus=1, num_gpus=1 if cluster.use_gpu("auto") else 0, max_retries=2,
                            runtime_env={"env_vars": env})(_draw_share)
    refs = {draw_share.remote(model_uri, config, labels[a:b], prompts[a:b], first_seed + a): k
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))}
    shares_drawn: dict[int, torch.Tensor] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        k = refs[done[0]]
        shares_drawn[k] = torch.from_numpy(ray.get(done[0]).copy())  # Ray hands back a read-only array
        if progress is not None:
            progress.advance(bounds[k + 1] - bounds[k])
    return torch.cat([shares_drawn[k] for k in range(shares)])


def _draw_share(model_uri: str, config: EvaluationConfig, labels: list[int | None], prompts: list[str | None],
                first_seed: int):
    """One Ray task's share of :func:`_sample` (as an array: Ray's own serialisation)."""
    from dataclasses import replace

    from ldmflow.data import cluster

    sampler, _ = models.load_sampler(model_uri, device="cuda" if cluster.use_gpu("auto") and torch.cuda.is_available()
                                     else "cpu")
    return _sample(sampler, replace(config, workers=0), labels, prompts, None, first_seed).numpy()


def held_out_prompts(config: EvaluationConfig, real: features.Reference) -> list[tuple[str, int]]:
    """(prompt, class index) pairs for ``prompt_accuracy_unseen``: the configured ones, or a
    built-in source's held-out phrasings; none for a dataset without class names."""
    names = list(real.manifest.class_names or ())
    if not names:
        return []
    if config.held_out_prompts:
        unknown = sorted(set(config.held_out_prompts) - set(names))
        if unknown:
            raise InputError(f"evaluate.held_out_prompts: {', '.join(unknown)} not among the dataset's classes "
                             f"({', '.join(names)})")
        return [(prompt, names.index(name)) for name, prompts in config.held_out_prompts.items() for prompt in prompts]
    if builtin.is_builtin(real.manifest.source):
        return [(prompt, digit) for digit, prompts in builtin.held_out_prompts().items() for prompt in prompts]
    return []


def _by_class(images: torch.Tensor, labels: list[int]) -> dict[int, torch.Tensor]:
    by_class: dict[int, list[torch.Tensor]] = {}
    for image, label in zip(images, labels):
        by_class.setdefault(label, []).append(image)
    return {k: torch.stack(v) for k, v in by_class.items()}


def evaluate(model_uri: str, config: EvaluationConfig = EvaluationConfig(), *, progress: bool = False) -> Evaluation:
    """Sample the model on fixed seeds and score the samples against real images; the result
    is also recorded on the model version (tags) and its training run (metrics). ``progress``
    shows the images drawn so far."""
    sampler, registered = models.load_sampler(model_uri)
    # The workers load this very version, whatever an alias points to by then.
    concrete = (f"models:/{registered.name}/{registered.version}" if registered is not None
                else model_uri if model_uri.startswith("runs:/") else str(Path(model_uri).absolute()))
    reference = config.reference or sampler.info.lineage.get("image_dataset", "")
    if not reference:
        raise InputError(f"{model_uri}: the model names no image dataset; set evaluate.reference")
    real = features.Reference.read(reference)
    classifier = features.classifier_for(real) if real.manifest.class_names else None
    extract = features.extractor(config.features, config.inception_path, real, classifier)
    text = sampler.info.conditioning == "text"
    captioned = real.captioned(config.reference_samples, config.seed) if text else []
    unseen = held_out_prompts(config, real) if text and classifier is not None else []
    # Half as many images again, each held-out prompt as often as the others, on seeds of their own.
    unseen_n = len(unseen) * math.ceil(config.num_samples / 2 / len(unseen)) if unseen else 0
    with Progress(f"evaluate {model_uri}", config.num_samples + unseen_n, "image", enabled=progress) as bar:
        fake, labels = draw(sampler, config, [caption for caption, _ in captioned], bar, concrete)
        if unseen:
            prompts = [unseen[i % len(unseen)] for i in range(unseen_n)]
            fake_unseen = _sample(sampler, config, [None] * unseen_n, [p for p, _ in prompts], bar, config.num_samples,
                                  concrete)
    real_size = (real.resolution, real.resolution)
    if fake.shape[-1] != real.resolution:
        fake = F.interpolate(fake, size=real_size, mode="bilinear", align_corners=False)
    real_features = features.reference_features(extract, real, config.reference_samples, config.batch_size, config.seed)
    fake_features = torch.cat([extract(chunk) for chunk in features.to_uint8(fake).split(config.batch_size)])
    metrics = distances(fake_features, real_features, kid_subset_size=config.kid_subset_size,
                        kid_subsets=config.kid_subsets, seed=config.seed)
    if classifier is not None and sampler.info.conditioning == "class":
        metrics["class_accuracy"] = features.class_accuracy(classifier, _by_class(fake, labels))
    if classifier is not None and text and all(label >= 0 for _, label in captioned):
        # The training phrasings: image i was drawn on reference caption i (cycled), whose label is known.
        prompted = [captioned[i % len(captioned)][1] for i in range(len(fake))]
        metrics["prompt_accuracy"] = features.class_accuracy(classifier, _by_class(fake, prompted))
    if unseen:
        if fake_unseen.shape[-1] != real.resolution:
            fake_unseen = F.interpolate(fake_unseen, size=real_size, mode="bilinear", align_corners=False)
        metrics["prompt_accuracy_unseen"] = features.class_accuracy(
            classifier, _by_class(fake_unseen, [label for _, label in prompts]))
    result = Evaluation(metrics, extract.name, len(fake), len(real_features), reference, config.digest(), model_uri)
    if registered is not None:
        record(registered, result)
    return result


EVAL_TAG = models.EVAL_TAG


def record(registered, result: Evaluation) -> None:
    """Scores as tags of the model version (``ldmflow.eval.*``), and as metrics (``eval_*``) of
    its training run and of its MLflow logged model."""
    client = tracking.client()
    tags = {f"{EVAL_TAG}{k}": repr(v) for k, v in result.metrics.items()}
    tags |= {f"{EVAL_TAG}features": result.features, f"{EVAL_TAG}config": result.config_digest,
             f"{EVAL_TAG}num_samples": str(result.num_samples), f"{EVAL_TAG}num_reference": str(result.num_reference),
             f"{EVAL_TAG}reference": result.reference}
    for key, value in tags.items():
        client.set_model_version_tag(registered.name, registered.version, key, value)
    if registered.run_id:  # metrics of the training run and of the logged model the version was made from
        for key, value in result.metrics.items():
            client.log_metric(registered.run_id, f"eval_{key}", value, model_id=registered.model_id)


def recorded(name: str, version: str, config: EvaluationConfig) -> Evaluation | None:
    """The evaluation already recorded on a model version with this config, if any."""
    tags = tracking.client().get_model_version(name, version).tags
    if tags.get(f"{EVAL_TAG}config") != config.digest():
        return None
    metrics = {key[len(EVAL_TAG):]: float(value) for key, value in tags.items()
               if key[len(EVAL_TAG):] in LOWER_IS_BETTER}
    return Evaluation(metrics, tags[f"{EVAL_TAG}features"], int(tags[f"{EVAL_TAG}num_samples"]),
                      int(tags[f"{EVAL_TAG}num_reference"]), tags[f"{EVAL_TAG}reference"], config.digest(),
                      f"models:/{name}/{version}")
