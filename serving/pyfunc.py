"""The MLflow pyfunc face of a registered model (``loader_module`` of its ``MLmodel``).

``mlflow.pyfunc.load_model("models:/NAME@production")`` calls :func:`_load_pyfunc` with the
model folder; nothing is unpickled (weights are safetensors, configs JSON). ``predict``
takes a DataFrame with one row per image (columns of :func:`ldmflow.registry.models.signature`, all
optional) and returns one row per image: the PNG as base64 and the seed it was drawn with.
A row with ``to_seed``, ``to_label`` or ``to_prompt`` is one image of an interpolation, at
``at`` (0: ``seed``, ``label``, ``prompt``; 1: the ``to_`` ones) along the path. A row with
``image`` (base64 PNG or JPEG) edits it: ``mode`` ``sdedit`` (the default) at ``strength``,
or ``invert`` (DDIM inversion under ``source_label``/``source_prompt``, then sampling).
"""

from __future__ import annotations

import math

_INTEGER = ("label", "seed", "steps", "to_seed", "to_label", "source_label")


class PyfuncSampler:
    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def predict(self, model_input, params=None):
        import pandas as pd

        from ldmflow.model.sampler import batches
        from ldmflow.serving.codec import png_base64

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        jobs = [self.sampler.job(n=1, **self._edit(_fields(row))) for row in rows]
        for job in jobs:
            self.sampler.check(job)
        pngs: list = [None] * len(jobs)
        for indices in batches(jobs):
            for i, result in zip(indices, self.sampler.run([jobs[i] for i in indices])):
                pngs[i] = png_base64(result)[0]
        return pd.DataFrame({"image": pngs, "seed": [job.seeds()[0] for job in jobs]})


    def _edit(self, fields: dict) -> dict:
        """A row's ``image`` (base64) and ``mode`` as the job fields of an edit."""
        import base64

        from ldmflow.data import images

        mode = fields.pop("mode", "sdedit")
        if mode not in ("sdedit", "invert"):
            raise ValueError(f"mode: must be sdedit or invert, got {mode!r}")
        data = fields.pop("image", None)
        if data is None:
            return fields
        if data.startswith("data:"):
            data = data.partition(",")[2]
        side = self.sampler.info.resolution
        decoded = images.preprocess(base64.b64decode(data, validate=True), side)
        fields["image"] = images.model_input(decoded.image, side)
        if mode == "invert":
            fields.update(invert=True, strength=1.0)
        return fields


def _fields(row: dict) -> dict:
    """A DataFrame row as Job fields: a missing optional value (None or NaN) is left out, and
    integer columns that pandas widened to float (because of a missing value) are ints again."""
    fields = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = value.item() if hasattr(value, "item") else value
        fields[key] = int(value) if key in _INTEGER else value
    return fields


def _load_pyfunc(data_path: str) -> PyfuncSampler:
    from ldmflow.model.sampler import Sampler

    return PyfuncSampler(Sampler.from_folder(data_path))
