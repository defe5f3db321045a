"""Images over the wire: sampled images as base64 PNG, the way the HTTP API and the MLflow
pyfunc both return them."""

from __future__ import annotations

import base64
import io

import torch

from ldmflow.model.grids import to_pil


def png_base64(images: torch.Tensor) -> list[str]:
    """(B, 3, H, W) in [−1, 1] → one base64 PNG per image."""
    encoded = []
    for image in to_pil(images):
        out = io.BytesIO()
        image.save(out, format="PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode("ascii"))
    return encoded
