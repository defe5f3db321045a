"""``ldmflow export``: a registered model as a diffusers pipeline folder.

The folder is what ``DiffusionPipeline.save_pretrained`` writes (``model_index.json``,
``unet/``, ``vae/``, ``scheduler/``, safetensors weights) plus ``pipeline.py``, the pipeline
class (:mod:`ldmflow.serving.diffusers_pipeline`), and ``ldmflow.json`` for the class names and
lineage. ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ldmflow.model import model_format, schedules
from ldmflow.registry import models
from ldmflow.serving import diffusers_pipeline


def export(model_uri: str, dest: str | Path) -> Path:
    """Write the model at ``model_uri`` to ``dest`` as a diffusers pipeline folder (not an
    inpainting model's: the pipeline feeds its UNet the noisy latent alone)."""
    folder, _ = models.resolve(model_uri)
    if model_format.read_info(model_format.model_folder(folder)).inpainting:
        raise model_format.ModelError(f"export {model_uri}: trained for inpainting, its UNet takes the known latents "
                                      "and the mask too, which the exported pipeline does not feed: serve it with "
                                      "ldmflow serve")
    unet, vae, info = model_format.load_parts(folder)
    schedule = schedules.NoiseSchedule(**info.noise)
    scheduler = schedules.sampling_scheduler(schedule, info.defaults.sampler)
    pipeline = diffusers_pipeline.LDMFlowPipeline(unet=unet, vae=vae, scheduler=scheduler)
    dest = Path(dest)
    pipeline.save_pretrained(dest, safe_serialization=True)
    index = json.loads((dest / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", diffusers_pipeline.LDMFlowPipeline.__name__]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(diffusers_pipeline.__file__, dest / "pipeline.py")
    shutil.copyfile(model_format.model_folder(folder) / model_format.META, dest / model_format.META)
    return dest
