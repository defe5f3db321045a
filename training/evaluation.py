"""Sample quality: Fréchet distance, KID and class accuracy of a model's samples against the
real images it was trained on, on fixed seeds.

Features come from Inception when its weights are on the machine (a TorchScript file at a
configured path, e.g. the ``inception-2015-12-05.pt`` used by FID implementations: then the
distances are the usual FID and KID), otherwise from the *domain classifier*: a small CNN
trained on the real images of the (labelled) dataset, cached per dataset manifest. Nothing
is downloaded. Every result says which features it used: the numbers of two feature
spaces are not comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from data import config as configs
from data import shards, storage
from training import tracking

LOWER_IS_BETTER = {"fd": True, "kid": True, "class_accuracy": False}


@dataclass(frozen=True)
class EvaluationConfig:
    """Configuration of ``ldmflow evaluate`` (section ``evaluate:`` of a config file)."""

    num_samples: int = 500  # generated images, spread evenly over the classes of a class model
    reference_samples: int = 2000  # real images read from the reference dataset (at most)
    reference: str = ""  # image dataset to compare with; empty: the one the model was trained on
    seed: int = 0  # image i is drawn with seed + i
    sampler: str = ""  # empty: the model's default
    steps: int = 0  # 0: the model's default
    guidance: float = 0.0  # 0: the model's default
    batch_size: int = 100
    features: Literal["auto", "inception", "domain"] = "auto"  # auto: inception when inception_path exists
    inception_path: str = ""  # TorchScript Inception feature extractor on this machine (never downloaded)
    kid_subset_size: int = 100
    kid_subsets: int = 50

    def __post_init__(self) -> None:
        for name in ("num_samples", "reference_samples", "batch_size", "kid_subset_size", "kid_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def digest(self) -> str:
        """Identifies the evaluation: results with the same digest are comparable and reusable."""
        return hashlib.sha256(json.dumps(configs.to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # fd, kid, and class_accuracy for class models
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


class DomainClassifier(torch.nn.Module):
    """Two conv blocks, a pooled 1024-d feature, a linear head. Input: (B, 3, H, W) in [-1, 1]."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features_net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
        )
        self.head = torch.nn.Sequential(torch.nn.Linear(1024, 128), torch.nn.ReLU(), torch.nn.Linear(128, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(dataset: str, epochs: int = 8, seed: int = 0) -> tuple[DomainClassifier, float]:
    """Train on every labelled image of ``dataset``; returns the model and its accuracy on a
    held-out tenth (by key) after training on the rest."""
    manifest = shards.read_manifest(dataset)
    if not manifest.class_names:
        raise ValueError(f"{dataset}: a domain classifier needs labelled data")
    samples = [s for s in shards.ShardStream(shards.shard_urls(dataset, manifest), shuffle_buffer=0) if s.label >= 0]
    held = [shards.is_held_out(s.key, 0.1) for s in samples]
    x = torch.stack([torch.from_numpy(s.image) for s in samples])
    y = torch.tensor([s.label for s in samples])
    train_x, train_y = x[[not h for h in held]], y[[not h for h in held]]
    torch.manual_seed(seed)
    model = DomainClassifier(len(manifest.class_names))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    held_mask = torch.tensor(held)
    with torch.no_grad():
        accuracy = (model(x[held_mask]).argmax(1) == y[held_mask]).float().mean().item() if held_mask.any() else float("nan")
    return model, accuracy


def classifier_for(dataset: str) -> DomainClassifier:
    """The domain classifier of an image dataset, trained once and cached in the state folder
    (keyed by the dataset manifest's hash; weights as safetensors)."""
    from safetensors.torch import load_file, save_file

    text = storage.read_text(shards.manifest_url(dataset))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = tracking.state_dir() / "classifiers" / key
    manifest = shards.ImageManifest.from_json(text, where=dataset)
    model = DomainClassifier(len(manifest.class_names or ()))
    if (folder / "classifier.safetensors").exists():
        model.load_state_dict(load_file(folder / "classifier.safetensors"))
        return model.eval()
    model, accuracy = train_classifier(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "classifier.safetensors")
    (folder / "classifier.json").write_text(json.dumps({"dataset": dataset, "held_out_accuracy": accuracy}) + "\n")
    return model


@torch.no_grad()
def class_accuracy(classifier: DomainClassifier, images_by_class: dict[int, torch.Tensor]) -> float:
    """Share of samples drawn for class k that the classifier recognises as k."""
    correct = total = 0
    for label, images in images_by_class.items():
        predicted = classifier(images.float()).argmax(dim=1)
        correct += int((predicted == label).sum())
        total += images.shape[0]
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------
# Distances between feature sets


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):
    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½.

    The matrix square root goes through symmetric eigendecompositions (float64), so a
    rank-deficient covariance (fewer samples than dimensions) stays real and finite.
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 100, subsets: int = 50,
                              seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
    k(x, y) = (xᵀy / d + 1)³, averaged over random subsets of both sets."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        total += ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / subsets)


# ---------------------------------------------------------------------------------------
# Feature extractors


class InceptionFeatures:
    """A TorchScript Inception feature extractor from a local file: images in [−1, 1] are
    resized to 299 px and given as float 0…255 (the convention of the FID TorchScript
    models, which take ``return_features=True`` when their forward has that argument)."""

    name = "inception"

    def __init__(self, path: str) -> None:
        self.module = torch.jit.load(path, map_location="cpu").eval()
        arguments = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in arguments else {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.module((x + 1) * 127.5, **self.kwargs).flatten(1).numpy()


class DomainFeatures:
    """The pooled 1024-d features of the domain classifier of the reference dataset."""

    name = "domain-classifier"

    def __init__(self, classifier: DomainClassifier) -> None:
        self.classifier = classifier

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images.float()).numpy()


def feature_extractor(config: EvaluationConfig, reference: str, classifier: DomainClassifier | None):
    wants_inception = config.features == "inception" or (config.features == "auto" and config.inception_path)
    if wants_inception:
        if not config.inception_path or not Path(config.inception_path).is_file():
            raise ValueError(f"inception_path: no TorchScript Inception file at {config.inception_path!r} "
                             "(weights are never downloaded; set the path, or use features: domain)")
        return InceptionFeatures(config.inception_path)
    if classifier is None:
        raise ValueError(f"{reference}: unlabelled data has no domain classifier; set inception_path to a local "
                         "TorchScript Inception file to evaluate it")
    return DomainFeatures(classifier)


# ---------------------------------------------------------------------------------------
# Evaluating a model


def reference_images(dataset: str, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``limit`` real images (N, 3, H, W) in [−1, 1] in shard order, with their captions."""
    manifest = shards.read_manifest(dataset)
    images, captions = [], []
    for sample in shards.ShardStream(shards.shard_urls(dataset, manifest), shuffle_buffer=0):
        images.append(torch.from_numpy(sample.image))
        captions.append(sample.caption)
        if len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{dataset}: no readable images to compare with")
    return torch.stack(images), captions


def draw(sampler, config: EvaluationConfig, captions: list[str]) -> tuple[torch.Tensor, list[int | None]]:
    """``num_samples`` images on fixed seeds: evenly over the classes of a class model, on the
    reference captions (cycled) for a text model, unconditional otherwise."""
    info = sampler.info
    n = config.num_samples
    if info.conditioning == "class":
        classes = len(info.class_names or ())
        labels: list[int | None] = [i * classes // n for i in range(n)]
    else:
        labels = [None] * n
    prompts = [captions[i % len(captions)] for i in range(n)] if info.conditioning == "text" else [None] * n
    settings = dict(sampler=config.sampler or None, steps=config.steps or None, guidance=config.guidance or None)
    images = []
    for start in range(0, n, config.batch_size):
        jobs = [sampler.job(n=1, seed=config.seed + i, label=labels[i], prompt=prompts[i], **settings)
                for i in range(start, min(n, start + config.batch_size))]
        images.extend(sampler.run(jobs))
    return torch.cat(images), labels


def evaluate(model_uri: str, config: EvaluationConfig = EvaluationConfig()) -> Evaluation:
    """Sample the model on fixed seeds and score the samples against real images; the result
    is also recorded on the model version (tags) and its training run (metrics)."""
    from serving.sampler import load

    sampler, registered = load(model_uri)
    reference = config.reference or sampler.info.lineage.get("image_dataset", "")
    if not reference:
        raise ValueError(f"{model_uri}: the model names no image dataset; set evaluate.reference")
    real, captions = reference_images(reference, config.reference_samples)
    labelled = bool(shards.read_manifest(reference).class_names)
    classifier = classifier_for(reference) if labelled else None
    extract = feature_extractor(config, reference, classifier)
    fake, labels = draw(sampler, config, captions)
    if fake.shape[-2:] != real.shape[-2:]:
        fake = F.interpolate(fake, size=real.shape[-2:], mode="bilinear", align_corners=False)
    real_features = np.concatenate([extract(chunk) for chunk in real.split(config.batch_size)])
    fake_features = np.concatenate([extract(chunk) for chunk in fake.split(config.batch_size)])
    metrics = {
        "fd": frechet_distance(fake_features, real_features),
        "kid": kernel_inception_distance(fake_features, real_features, config.kid_subset_size, config.kid_subsets,
                                         config.seed),
    }
    if classifier is not None and sampler.info.conditioning == "class":
        by_class: dict[int, list[torch.Tensor]] = {}
        for image, label in zip(fake, labels):
            by_class.setdefault(label, []).append(image)
        metrics["class_accuracy"] = class_accuracy(classifier, {k: torch.stack(v) for k, v in by_class.items()})
    result = Evaluation(metrics, extract.name, len(fake), len(real), reference, config.digest(), model_uri)
    if registered is not None:
        record(registered, result)
    return result


EVAL_TAG = "ldmflow.eval."


def record(registered, result: Evaluation) -> None:
    """Scores as tags of the model version (``ldmflow.eval.*``) and metrics of its run."""
    client = tracking.client()
    tags = {f"{EVAL_TAG}{k}": repr(v) for k, v in result.metrics.items()}
    tags |= {f"{EVAL_TAG}features": result.features, f"{EVAL_TAG}config": result.config_digest,
             f"{EVAL_TAG}num_samples": str(result.num_samples), f"{EVAL_TAG}num_reference": str(result.num_reference),
             f"{EVAL_TAG}reference": result.reference}
    for key, value in tags.items():
        client.set_model_version_tag(registered.name, registered.version, key, value)
    if registered.run_id:
        for key, value in result.metrics.items():
            client.log_metric(registered.run_id, f"eval_{key}", value)


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
