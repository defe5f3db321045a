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

import bisect
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmflow.data import image_shards, shard_stream, storage
from ldmflow.errors import InputError
from ldmflow.model import meta
from ldmflow.state import state_dir

CLASSIFIER_SAMPLES = 20_000  # the domain classifier's training set, at most: memory stays bounded
# Trained unshifted for 8 epochs, it read 91.5% of benchmarks/restore.py's held-out digits;
# shifted by up to 2 px for 20 epochs, 96.0% (in twice the time: 7 s on 2 cores).
CLASSIFIER_EPOCHS = 20
CLASSIFIER_SHIFT = 2
CLASSIFIER_VERSION = 2  # in the cache key: a classifier cached by an older recipe is not reused


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [−1, 1] → uint8 in [0, 255], rounded as when the images are saved."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True)
class Reference:
    """A real image dataset to compare with, its manifest read once: ``key`` (the manifest's
    sha256, 16 hex digits) is its identity for every cache here."""

    url: str
    manifest: image_shards.ImageManifest
    key: str

    @classmethod
    def read(cls, url: str) -> Reference:
        where, text = image_shards.read_manifest_text(url, "shard")
        manifest = image_shards.ImageManifest.from_json(text, where=where)
        return cls(url, manifest, hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def resolution(self) -> int:
        return int(self.manifest.config["resolution"])

    def picks(self, limit: int, seed: int) -> dict[int, set[int]]:
        """``limit`` samples drawn at random from the whole dataset, every shard alike (all of
        them when it holds no more): shard index → positions in that shard. Seeded, so the
        same ``(limit, seed)`` draws the same samples; nothing is read to draw them."""
        counts = [shard.num_samples for shard in self.manifest.shards]
        total = sum(counts)
        drawn = range(total) if limit >= total else random.Random(f"reference:{seed}").sample(range(total), limit)
        starts = [0]
        for count in counts[:-1]:
            starts.append(starts[-1] + count)
        picked: dict[int, set[int]] = {}
        for index in drawn:
            shard = bisect.bisect_right(starts, index) - 1
            picked.setdefault(shard, set()).add(index - starts[shard])
        return picked

    def drawn(self, limit: int, seed: int, decode: Callable[[dict], object]) -> list:
        """The drawn samples (:meth:`picks`) through ``decode``, in shard order; only their
        shards are read, only they are decoded, and one that cannot be is skipped."""
        urls = image_shards.shard_urls(self.url, self.manifest)
        skips, found = shard_stream.SkipCounter(), []
        for shard, positions in sorted(self.picks(limit, seed).items()):
            last = max(positions)
            for position, raw in enumerate(shard_stream.iter_raw_samples([urls[shard]], skips)):
                if position > last:  # the rest of the shard holds none of them
                    break
                if position in positions:
                    try:
                        found.append(decode(raw))
                    except ValueError as exc:
                        skips(exc)
        return found

    def images(self, limit: int, seed: int = 0) -> torch.Tensor:
        """Up to ``limit`` images (N, 3, H, W) in [−1, 1], drawn at random from every shard."""
        images = [torch.from_numpy(sample.image) for sample in self.drawn(limit, seed, image_shards.decode_sample)]
        if not images:
            raise ValueError(f"{self.url}: no readable images to compare with")
        return torch.stack(images)

    def captioned(self, limit: int, seed: int = 0) -> list[tuple[str, int]]:
        """Up to ``limit`` (caption, label) pairs drawn as :meth:`images` draws, without
        decoding an image (label -1 where a sample has none)."""
        def caption(raw: dict) -> tuple[str, int]:
            label = raw.get(image_shards.KEY_LABEL)
            return raw.get(image_shards.KEY_CAPTION, b"").decode("utf-8"), int(label) if label is not None else -1

        return self.drawn(limit, seed, caption)


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


def train_classifier(reference: Reference, epochs: int = CLASSIFIER_EPOCHS, seed: int = 0,
                     limit: int = CLASSIFIER_SAMPLES) -> tuple[DomainClassifier, float]:
    """Train on the labelled images among ``limit`` drawn from ``reference`` (all of a smaller
    dataset) by :func:`fit_classifier`; returns the model and its accuracy on a held-out
    tenth (by key) after training on the rest."""
    if not reference.manifest.class_names:
        raise InputError(f"{reference.url}: a domain classifier needs labelled data")
    samples = [s for s in reference.drawn(limit, seed, image_shards.decode_sample) if s.label >= 0]
    held = torch.tensor([shard_stream.is_held_out(s.key, 0.1) for s in samples], dtype=torch.bool)
    x = torch.stack([torch.from_numpy(s.image) for s in samples])
    y = torch.tensor([s.label for s in samples])
    model = fit_classifier(x[~held], y[~held], len(reference.manifest.class_names), epochs, seed)
    with torch.no_grad():
        accuracy = (model(x[held]).argmax(1) == y[held]).float().mean().item() if held.any() else float("nan")
    return model, accuracy


def fit_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = CLASSIFIER_EPOCHS,
                   seed: int = 0) -> DomainClassifier:
    """A :class:`DomainClassifier` trained on images ``x`` (N, 3, H, W) in [-1, 1] with labels
    ``y``: Adam, batches of 64, each shifted by up to :data:`CLASSIFIER_SHIFT` pixels; in eval mode."""
    torch.manual_seed(seed)
    model = DomainClassifier(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            dy, dx = (int(v) for v in torch.randint(-CLASSIFIER_SHIFT, CLASSIFIER_SHIFT + 1, (2,), generator=generator))
            loss = F.cross_entropy(model(torch.roll(x[index], (dy, dx), (2, 3))), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def classifier_for(reference: Reference) -> DomainClassifier:
    """The domain classifier of an image dataset, trained once and cached in the state folder
    (keyed by the dataset manifest's hash and the recipe's version; weights as safetensors)."""
    from safetensors.torch import load_file, save

    limited = "" if reference.manifest.num_samples <= CLASSIFIER_SAMPLES else f"-{CLASSIFIER_SAMPLES}"
    folder = state_dir() / "classifiers" / f"{reference.key}{limited}-v{CLASSIFIER_VERSION}"
    model = DomainClassifier(len(reference.manifest.class_names or ()))
    if (folder / "classifier.safetensors").exists():
        model.load_state_dict(load_file(folder / "classifier.safetensors"))
        return model.eval()
    model, accuracy = train_classifier(reference)
    recipe = {"epochs": CLASSIFIER_EPOCHS, "shift_pixels": CLASSIFIER_SHIFT, "version": CLASSIFIER_VERSION}
    description = json.dumps({"dataset": reference.url, "held_out_accuracy": accuracy, **recipe}) + "\n"
    _write_cached(folder / "classifier.json", description.encode())
    _write_cached(folder / "classifier.safetensors", save(model.state_dict()))  # last: its presence is the cache hit
    return model


def _write_cached(path: Path, data: bytes) -> None:
    """A cache file written whole or not at all: evaluations on several workers may fill the
    same cache at once, and each reads a file only once it exists."""
    with storage.open_write(str(path)) as handle:
        handle.write(data)


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
        return f"inception-{meta.file_sha256(self.path)[:16]}"


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


def extractor(features: str, inception_path: str, reference: Reference, classifier: DomainClassifier | None):
    """The feature extractor an evaluation config asks for (``auto``: Inception when a path is set)."""
    if features == "inception" or (features == "auto" and inception_path):
        if not inception_path or not Path(inception_path).is_file():
            raise ValueError(f"inception_path: no TorchScript Inception file at {inception_path!r} "
                             "(weights are never downloaded; set the path, or use features: domain)")
        return InceptionFeatures(inception_path)
    if classifier is None:
        raise ValueError(f"{reference.url}: unlabelled data has no domain classifier; set inception_path to a local "
                         "TorchScript Inception file to evaluate it")
    return DomainFeatures(classifier, reference.key)


def reference_features(extract, reference: Reference, limit: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """(N, D) features of ``limit`` images drawn at random from every shard of ``reference``
    (N ≤ ``limit``): computed once per (dataset manifest, extractor, limit, seed), then read
    from the state folder (safetensors) without decoding a single image again."""
    from safetensors.torch import load_file, save

    key = hashlib.sha256(f"{reference.key} {extract.identity()} {limit} random:{seed}".encode()).hexdigest()[:16]
    path = state_dir() / "reference-features" / f"{key}.safetensors"
    if path.exists():
        return load_file(path)["features"]
    images = to_uint8(reference.images(limit, seed))
    features = torch.cat([extract(chunk) for chunk in images.split(batch_size)])
    _write_cached(path, save({"features": features.contiguous()}))
    return features
