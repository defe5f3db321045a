"""The autoencoder: diffusers' ``AutoencoderKL`` sized by named presets, and its folder
format, defined once: written by training, read by precompute, diffusion training and the
sampler.

A folder holds diffusers' own files for ``AutoencoderKL`` (``config.json`` and
``diffusion_pytorch_model.safetensors``: weights as safetensors, config as JSON, nothing
pickled) plus ``ldmflow.json``: its kind and format version, the latent scale factor (also stored as diffusers'
``scaling_factor``), the latent geometry, the sha256 of the weights (the autoencoder's
identity for lineage checks) and the training config and lineage.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldmflow.errors import LdmflowError
from ldmflow.model import meta

KIND = "ldmflow.autoencoder"
VERSION = 1  # of this folder's format: another is refused (:func:`ldmflow.model.meta.check_version`)
META = meta.NAME
WEIGHTS = "diffusion_pytorch_model.safetensors"


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: f=4, 4-channel latents (32 px → 8×8×4).
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                 mid_block_add_attention=False),
    # Stable Diffusion's geometry: f=8, 4-channel latents (256 px → 32×32×4).
    "base": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32),
}


def build(preset: str, resolution: int):
    """A fresh ``AutoencoderKL`` of the named preset for ``resolution``-pixel images."""
    from diffusers import AutoencoderKL

    sizes = PRESETS[preset]
    depth = len(sizes["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        sample_size=resolution,
        **sizes,
    )


class AutoencoderError(LdmflowError, ValueError):
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
    version: int = VERSION

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
        weights_sha256=meta.file_sha256(folder / WEIGHTS),
        config=config,
        lineage=lineage,
    )
    (folder / META).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    return info


def read_info(folder: str | Path) -> AutoencoderInfo:
    """``ldmflow.json`` of an autoencoder folder, checked."""
    return meta.read(Path(folder) / META, KIND, VERSION, AutoencoderInfo, AutoencoderError)


def load(folder: str | Path, device: str = "cpu", verify: bool = True):
    """The ``AutoencoderKL`` in ``folder`` (eval mode, on ``device``) and its info."""
    from diffusers import AutoencoderKL

    info = read_info(folder)
    weights = Path(folder) / WEIGHTS
    if verify:
        if not weights.exists():
            raise AutoencoderError(f"{folder}: weights file {WEIGHTS} is missing")
        actual = meta.file_sha256(weights)
        if actual != info.weights_sha256:
            raise AutoencoderError(f"{folder}: weights sha256 {actual[:12]}… does not match ldmflow.json")
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    return vae.to(device).eval(), info


def load_files(files: dict[str, bytes], device: str = "cpu"):
    """``load`` of an autoencoder folder passed as its files (name -> bytes), as Ray ships it
    to actors and workers; the weights are copied into memory, so the scratch folder goes."""
    with tempfile.TemporaryDirectory(prefix="ldmflow-vae-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return load(folder, device)
