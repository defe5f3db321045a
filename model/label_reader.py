"""The label reader: a small classifier of what is known of a latent, saved beside a class
model's UNet, that helps an inpainting without a label choose the labels to draw it under.

A class model reads the label of an image's known latents itself
(:mod:`ldmflow.model.self_classifier`), but not equally well under every mask: on the
benchmark's held-out digits with their bottom 40% masked, its probe and analysis by synthesis
read about 0.86-0.89 of them. The reader is trained for exactly that question: the clean
latents of the training set under the inpainting model's random masks
(:func:`ldmflow.model.inpainting.training_masks`), the masked cells zeroed and the mask
beside them (:func:`ldmflow.model.inpainting.conditioning_channels`), to the label. It reads
the bottom-40% digits better than the UNet (0.92) and a centred square far worse (0.68):
the sampler uses both, ranking the finalists with both and letting the reader weigh in the
choice among their completions only where it is sure
(:func:`ldmflow.model.self_classifier.read_finalists`). Trained by
:mod:`ldmflow.training.label_reader`.

Files, in a model folder's ``label_reader/``: ``config.json`` (channels, classes, width) and
``model.safetensors``; nothing pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FOLDER = "label_reader"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
WIDTH = 64


class LabelReader(nn.Module):
    """(B, C + 1, h, w) known latents and latent mask → (B, classes) logits: three 3×3
    convolutions (the second halving the grid), average pooling, dropout, a linear layer."""

    def __init__(self, latent_channels: int, num_classes: int, width: int = WIDTH) -> None:
        super().__init__()
        self.shape = {"latent_channels": latent_channels, "num_classes": num_classes, "width": width}
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width, num_classes))

    def forward(self, channels: torch.Tensor) -> torch.Tensor:
        return self.net(channels)


def save(folder: str | Path, reader: LabelReader) -> None:
    """Write ``reader`` into the model folder ``folder`` (its :data:`FOLDER`)."""
    from safetensors.torch import save_file

    where = Path(folder) / FOLDER
    where.mkdir(parents=True, exist_ok=True)
    (where / CONFIG).write_text(json.dumps(reader.shape, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in reader.state_dict().items()}, where / WEIGHTS)


def load(folder: str | Path, device: str = "cpu") -> LabelReader:
    """The reader of the model folder ``folder``, in eval mode on ``device``."""
    from safetensors.torch import load_file

    where = Path(folder) / FOLDER
    shape = json.loads((where / CONFIG).read_text())
    reader = LabelReader(int(shape["latent_channels"]), int(shape["num_classes"]), int(shape["width"]))
    reader.load_state_dict(load_file(where / WEIGHTS))
    return reader.to(device).eval()
