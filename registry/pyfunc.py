"""The MLflow pyfunc face of a registered model (``loader_module`` of its ``MLmodel``).

``mlflow.pyfunc.load_model("models:/NAME@production")`` calls :func:`_load_pyfunc` with the
model folder; nothing is unpickled (weights are safetensors, configs JSON). ``predict``
takes a DataFrame with one row per image (columns of :func:`ldmflow.registry.models.signature`, all
optional) and returns one row per image: the PNG as base64 and the seed it was drawn with.
A row with ``to_seed``, ``to_label`` or ``to_prompt`` is one image of an interpolation, at
``at`` (0: ``seed``, ``label``, ``prompt``; 1: the ``to_`` ones) along the path. A row with
``image`` (base64 PNG or JPEG) edits it: ``mode`` ``sdedit`` (the default) at ``strength``,
or ``invert`` (DDIM inversion under ``source_label``/``source_prompt``, then sampling); with
``mask`` too, it is inpainted. Rows are parsed as the HTTP API's bodies are.
"""

from __future__ import annotations

import math

from ldmflow.data import jobs


class PyfuncSampler:
    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def predict(self, model_input, params=None):
        """One image per row, each row parsed as an HTTP request is (:func:`ldmflow.data.jobs.build`,
        with the default limits): the same refusals, as :class:`~ldmflow.data.jobs.RequestError`."""
        import pandas as pd

        from ldmflow.model.sampling import batch_groups
        from ldmflow.model.grids import png_base64

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        todo = []
        for row in rows:
            fields = _fields(row)
            if fields.get("n", 1) != 1:
                raise jobs.RequestError("n", "one image per row")
            todo.append(jobs.build(self.sampler, fields))
        pngs: list = [None] * len(todo)
        for indices in batch_groups(todo):
            for i, result in zip(indices, self.sampler.run([todo[i] for i in indices])):
                pngs[i] = png_base64(result)[0]
        return pd.DataFrame({"image": pngs, "seed": [job.seeds()[0] for job in todo]})


def _fields(row: dict) -> dict:
    """A DataFrame row as request fields: a missing optional value (None or NaN) is left out,
    and integer columns that pandas widened to float (because of a missing value) are ints again."""
    fields = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = value.item() if hasattr(value, "item") else value
        fields[key] = int(value) if key in jobs.INTEGERS else value
    return fields


def _load_pyfunc(data_path: str) -> PyfuncSampler:
    from ldmflow.model.sampler import Sampler

    return PyfuncSampler(Sampler.from_folder(data_path))
