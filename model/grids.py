"""Pictures of a model: images as PIL, or as base64 PNG (the way the HTTP API and the MLflow
pyfunc both return them), rows of images as one grid, and the fixed-seed sample grid every
trained model is judged by at a glance (a row per class, per prompt, or one)."""

from __future__ import annotations

import base64
import io

import torch

from ldmflow.model.sampler import Sampler


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [−1, 1] → PIL RGB images."""
    from PIL import Image

    return [Image.fromarray(array) for array in _bytes(images).permute(0, 2, 3, 1).numpy()]


def png_base64(images: torch.Tensor) -> list[str]:
    """(B, 3, H, W) in [−1, 1] → one base64 PNG per image."""
    encoded = []
    for image in to_pil(images):
        out = io.BytesIO()
        image.save(out, format="PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode("ascii"))
    return encoded


def grid(rows: list[torch.Tensor]):
    """A PIL grid with one row per (n, 3, H, W) tensor in [−1, 1] (all of the same n)."""
    from PIL import Image

    body = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)  # (3, rows·H, n·W)
    return Image.fromarray(_bytes(body).permute(1, 2, 0).numpy())


def _bytes(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


def sample_grid(sampler: Sampler, prompts: list[str] | None = None, per_row: int = 8, seed: int = 1234):
    """Fixed-seed samples with the model's sampler defaults, a row per class (``class``), per
    prompt (``text``) or one row (``none``): (PIL grid, {row key: images (B, 3, H, W)})."""
    conditioning = sampler.info.conditioning
    if conditioning == "class":
        keys: list = list(range(len(sampler.info.class_names or ())))
        jobs = [sampler.job(label=k, n=per_row, seed=seed + row * per_row) for row, k in enumerate(keys)]
    elif conditioning == "text":
        keys = list(prompts or [""])
        jobs = [sampler.job(prompt=k, n=per_row, seed=seed + row * per_row) for row, k in enumerate(keys)]
    else:
        keys = [None]
        jobs = [sampler.job(n=per_row, seed=seed)]
    rows = sampler.run(jobs)
    return grid(rows), dict(zip(keys, rows))
