"""Feature spaces for comparing generated images with real ones, and the real side's features
cached per dataset.

Two extractors, both ``torch.nn.Module``s that take uint8 images (B, 3, H, W) at their
native size, the way the reference FID implementations feed Inception:

- :class:`InceptionFeatures`: a TorchScript Inception at a configured path (e.g. NVIDIA's
  ``inception-2015-12-05.pt`` used by StyleGAN's and clean-fid's FID), given the uint8
  images unresized: the network resizes to 299 px itself, so its FID is comparable with
  published figures. Weights are never downloaded.
- :class:`DomainFeatures`: the pooled 1024-d features of the *domain classifier*, a small
  CNN trained once on the real images of a labelled dataset and cached per manifest.

Images become uint8 once (:func:`to_uint8`), as a saved PNG would, before either sees them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmflow.data import image_shards, shard_stream, storage
from ldmflow.state import state_dir


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] → uint8 in [0, 255], rounded as when the images are saved."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
    manifest = image_shards.read_manifest(dataset)
    if not manifest.class_names:
        raise ValueError(f"{dataset}: a domain classifier needs labelled data")
    urls = image_shards.shard_urls(dataset, manifest)
    samples = [s for s in shard_stream.ShardStream(urls, shuffle_buffer=0) if s.label >= 0]
    held = [shard_stream.is_held_out(s.key, 0.1) for s in samples]
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


def manifest_key(dataset: str) -> str:
    """The identity of an image dataset: its manifest's sha256, 16 hex digits."""
    return hashlib.sha256(storage.read_text(image_shards.manifest_url(dataset)).encode()).hexdigest()[:16]


def classifier_for(dataset: str) -> DomainClassifier:
    """The domain classifier of an image dataset, trained once and cached in the state folder
    (keyed by the dataset manifest's hash; weights as safetensors)."""
    from safetensors.torch import load_file, save_file

    folder = state_dir() / "classifiers" / manifest_key(dataset)
    model = DomainClassifier(len(image_shards.read_manifest(dataset).class_names or ()))
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


class InceptionFeatures(torch.nn.Module):
    """A TorchScript Inception from a local file, fed uint8 images at their native size; it
    takes ``return_features=True`` when its forward has that argument (the FID models do)."""

    name = "inception"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.module = torch.jit.load(path, map_location="cpu").eval()
        arguments = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in arguments else {}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images, **self.kwargs).flatten(1).float()

    def identity(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"inception-{digest.hexdigest()[:16]}"


class DomainFeatures(torch.nn.Module):
    """The domain classifier's pooled 1024-d features of uint8 images."""

    name = "domain-classifier"

    def __init__(self, classifier: DomainClassifier, dataset_key: str) -> None:
        super().__init__()
        self.classifier, self.dataset_key = classifier, dataset_key

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() / 127.5 - 1.0)

    def identity(self) -> str:
        return f"domain-{self.dataset_key}"


def extractor(features: str, inception_path: str, reference: str, classifier: DomainClassifier | None):
    """The feature extractor an evaluation config asks for (``auto``: Inception when a path is set)."""
    if features == "inception" or (features == "auto" and inception_path):
        if not inception_path or not Path(inception_path).is_file():
            raise ValueError(f"inception_path: no TorchScript Inception file at {inception_path!r} "
                             "(weights are never downloaded; set the path, or use features: domain)")
        return InceptionFeatures(inception_path)
    if classifier is None:
        raise ValueError(f"{reference}: unlabelled data has no domain classifier; set inception_path to a local "
                         "TorchScript Inception file to evaluate it")
    return DomainFeatures(classifier, manifest_key(reference))


def reference_features(extract, dataset: str, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, D) features of a dataset's reference images, computed once per (dataset manifest,
    extractor, images) and cached in the state folder as safetensors."""
    from safetensors.torch import load_file, save_file

    images = to_uint8(images)
    key = hashlib.sha256(f"{manifest_key(dataset)} {extract.identity()} {images.shape[0]}".encode()).hexdigest()[:16]
    path = state_dir() / "reference-features" / f"{key}.safetensors"
    if path.exists():
        return load_file(path)["features"]
    features = torch.cat([extract(chunk) for chunk in images.split(batch_size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous()}, path)
    return features
