"""Sample-quality evaluation in the domain's own terms: a classifier trained on the real data.

With no Inception weights on the machine (nothing is downloaded), the yardstick for a
labelled dataset is a small CNN trained on its real images: how often a sample drawn for
class k is recognised as class k, and (later) distances in its feature space.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F

from data import shards, storage
from training import tracking


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
