"""The MLflow pyfunc face of a registered model (``loader_module`` of its ``MLmodel``).

``mlflow.pyfunc.load_model("models:/NAME@production")`` calls :func:`_load_pyfunc` with the
model folder; nothing is unpickled (weights are safetensors, configs JSON). ``predict``
takes a DataFrame with one row per image (columns of :func:`ldmflow.registry.models.signature`, all
optional) and returns one row per image: the PNG as base64 and the seed it was drawn with.
"""

from __future__ import annotations

import math

_INTEGER = ("label", "seed", "steps")


class PyfuncSampler:
    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def predict(self, model_input, params=None):
        import pandas as pd

        from ldmflow.model.sampler import batches
        from ldmflow.serving.codec import png_base64

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        jobs = [self.sampler.job(n=1, **_fields(row)) for row in rows]
        for job in jobs:
            self.sampler.check(job)
        pngs: list = [None] * len(jobs)
        for indices in batches(jobs):
            for i, result in zip(indices, self.sampler.run([jobs[i] for i in indices])):
                pngs[i] = png_base64(result)[0]
        return pd.DataFrame({"image": pngs, "seed": [job.seed for job in jobs]})


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
