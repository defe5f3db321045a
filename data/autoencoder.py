"""The autoencoder folder format, defined once: written by training, read by precompute,
diffusion training and the sampler.

A folder holds diffusers' own files for ``AutoencoderKL`` (``config.json`` and
``diffusion_pytorch_model.safetensors``: weights as safetensors, config as JSON, nothing
pickled) plus ``ldmflow.json``: the latent scale factor (also stored as diffusers'
``scaling_factor``), the latent geometry, the sha256 of the weights (the autoencoder's
identity for lineage checks) and the training config and lineage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KIND = "ldmflow.autoencoder"
META = "ldmflow.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class AutoencoderError(ValueError):
    """A folder that is not a complete ldmflow autoencoder."""


@dataclass(frozen=True)
class AutoencoderInfo:
    scale_factor: float  # latents are multiplied by this before diffusion (1 / their std)
    latent_channels: int
    downsample_factor: int  # image side / latent side
    resolution: int  # image side it was trained at
    weights_sha256: str
    config: dict[str, Any] = field(default_factory=dict)  # the training stage's config
    lineage: dict[str, Any] = field(default_factory=dict)  # dataset manifest hash, run id, …
    kind: str = KIND

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = (resolution or self.resolution) // self.downsample_factor
        return (self.latent_channels, side, side)


def downsample_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def save(vae, folder: str | Path, *, scale_factor: float, resolution: int, config: dict, lineage: dict) -> AutoencoderInfo:
    """Write ``vae`` (with ``scale_factor`` in its config) and ``ldmflow.json`` to ``folder``."""
    folder = Path(folder)
    vae.register_to_config(scaling_factor=float(scale_factor))
    vae.save_pretrained(folder, safe_serialization=True)
    info = AutoencoderInfo(
        scale_factor=float(scale_factor),
        latent_channels=int(vae.config.latent_channels),
        downsample_factor=downsample_factor(vae),
        resolution=int(resolution),
        weights_sha256=_sha256(folder / WEIGHTS),
        config=config,
        lineage=lineage,
    )
    (folder / META).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    return info


def read_info(folder: str | Path) -> AutoencoderInfo:
    """``ldmflow.json`` of an autoencoder folder, checked."""
    from data import config as configs

    return configs.read_meta(Path(folder) / META, KIND, AutoencoderInfo, AutoencoderError)


def load(folder: str | Path, device: str = "cpu", verify: bool = True):
    """The ``AutoencoderKL`` in ``folder`` (eval mode, on ``device``) and its info."""
    from diffusers import AutoencoderKL

    info = read_info(folder)
    weights = Path(folder) / WEIGHTS
    if verify:
        if not weights.exists():
            raise AutoencoderError(f"{folder}: weights file {WEIGHTS} is missing")
        actual = _sha256(weights)
        if actual != info.weights_sha256:
            raise AutoencoderError(f"{folder}: weights sha256 {actual[:12]}… does not match ldmflow.json")
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    return vae.to(device).eval(), info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
