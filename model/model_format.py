"""The diffusion model folder format, defined once: written by training, read by the sampler,
the MLflow pyfunc loader, evaluation and export.

A model folder holds everything sampling needs and nothing pickled::

    ldmflow.json     kind and format version, conditioning, noise schedule, latent geometry, scale factor,
                     class names, text encoder, sampler defaults, lineage, training config, and
                     whether the UNet is trained for inpainting
    unet/            the EMA UNet (diffusers' config.json + safetensors)
    autoencoder/     a copy of the autoencoder folder (:mod:`ldmflow.model.autoencoders`): the
                     decoder (and encoder, for editing and inpainting) with its scale factor
    label_reader/    class models, where one is trained: the classifier of masked latents that
                     picks an inpainting's labels (:mod:`ldmflow.model.label_reader`)

A registered model version is an MLflow pyfunc model (:mod:`ldmflow.registry.models`) whose
``data/ldm`` is that folder, loaded by :mod:`ldmflow.registry.pyfunc` without unpickling
anything.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldmflow.errors import LdmflowError
from ldmflow.model import autoencoders, meta

KIND = "ldmflow.diffusion"
VERSION = 1  # of this folder's format: another is refused (:func:`ldmflow.model.meta.check_version`)
META = meta.NAME
UNET = "unet"
AUTOENCODER = "autoencoder"
MLFLOW_DATA = "ldm"  # the model folder's name inside an MLflow model's data/
TEXT_ENCODER = "all-MiniLM-L6-v2"


class ModelError(LdmflowError, ValueError):
    """A folder that is not a complete ldmflow diffusion model."""


@dataclass(frozen=True)
class SamplerDefaults:
    """What a request that says nothing gets; the training config's sampling settings."""

    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 3.0


@dataclass(frozen=True)
class ModelInfo:
    """``ldmflow.json`` of a diffusion model folder."""

    conditioning: str  # class | text | none
    noise: dict[str, Any]  # ldmflow.model.schedules.NoiseSchedule as a dict
    latent_shape: list[int]  # (C, h, w)
    resolution: int  # image side in pixels
    scale_factor: float  # latent = autoencoder mean × scale_factor
    class_names: list[str] | None
    text_encoder: str | None
    defaults: SamplerDefaults
    autoencoder: dict[str, Any]  # uri, weights_sha256, scale_factor of the one that made the latents
    lineage: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the diffusion stage's config
    inpainting: bool = False  # the UNet takes ldmflow.model.inpainting's extra input channels
    label_reader: bool = False  # the folder holds a label reader (ldmflow.model.label_reader)
    kind: str = KIND
    version: int = VERSION

    @property
    def null_label(self) -> int:
        """The class index that means "no class" (classifier-free guidance's unconditional)."""
        return len(self.class_names or ())


def save(folder: str | Path, unet, autoencoder_folder: str | Path, info: ModelInfo, reader=None) -> None:
    """Write the UNet, a copy of the autoencoder folder, the label reader (where ``info`` says
    there is one) and ``ldmflow.json`` into ``folder``."""
    from ldmflow.model import label_reader

    if info.label_reader != (reader is not None):
        raise ValueError("save: info.label_reader says whether a label reader is given")
    folder = Path(folder)
    unet.save_pretrained(folder / UNET, safe_serialization=True)
    if reader is not None:
        label_reader.save(folder, reader)
    shutil.copytree(autoencoder_folder, folder / AUTOENCODER, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".*"))
    (folder / META).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")


def model_folder(path: str | Path) -> Path:
    """The model folder inside ``path``: ``path`` itself, or the data folder of an MLflow model."""
    import yaml

    path = Path(path)
    if (path / META).exists():
        return path
    mlmodel = path / "MLmodel"
    if mlmodel.exists():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        data = path / str(flavor.get("data", f"data/{MLFLOW_DATA}"))
        if (data / META).exists():
            return data
    raise ModelError(f"{path}: not an ldmflow diffusion model (no {META}, and no MLmodel pointing at one)")


def read_info(folder: str | Path) -> ModelInfo:
    def prepare(body: dict) -> dict:
        return {**body, "defaults": SamplerDefaults(**body.get("defaults", {}))}

    return meta.read(Path(folder) / META, KIND, VERSION, ModelInfo, ModelError, prepare)


def load_reader(folder: str | Path, info: ModelInfo, device: str = "cpu"):
    """The label reader of a model folder, in eval mode on ``device``; None where it has none."""
    from ldmflow.model import label_reader

    return label_reader.load(model_folder(folder), device) if info.label_reader else None


def load_parts(folder: str | Path, device: str = "cpu"):
    """(UNet, autoencoder, info) of a model folder, in eval mode on ``device``."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    folder = model_folder(folder)
    info = read_info(folder)
    cls = UNet2DConditionModel if info.conditioning == "text" else UNet2DModel
    unet = cls.from_pretrained(folder / UNET, use_safetensors=True, low_cpu_mem_usage=False).to(device).eval()
    vae, _ = autoencoders.load(folder / AUTOENCODER, device=device)
    return unet, vae, info
