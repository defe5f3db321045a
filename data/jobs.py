"""A sampling request turned into a model :class:`~ldmflow.model.sampling.Job`: one parser,
one set of limits and one set of refusals for the HTTP API, the MLflow pyfunc model and
``ldmflow sample``.

A request is a mapping of :data:`FIELDS`, every one optional. Uploads (``image``, ``mask``)
are base64, or a ``data:`` URL of base64, from HTTP and pyfunc, and bytes from the command
line; each goes through the shard stage's validation (:func:`ldmflow.data.images.preprocess`:
size, decompression bombs, any mode to RGB) before it becomes a tensor. A refusal is a
:class:`RequestError` naming the field, with the HTTP status it gets.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ldmflow.data import images
from ldmflow.errors import LdmflowError
from ldmflow.model import restoration

# Every field of a request, with its MLflow column type (the pyfunc signature is made from it).
FIELDS: dict[str, str] = {
    "label": "long", "prompt": "string", "n": "long", "seed": "long", "steps": "long", "sampler": "string",
    "guidance": "double", "to_seed": "long", "to_label": "long", "to_prompt": "string", "at": "double",
    "image": "string", "mode": "string", "strength": "double", "source_label": "long", "source_prompt": "string",
    "mask": "string", "jump_length": "long", "jump_count": "long", "infer_label": "boolean",
}
INTEGERS = frozenset(name for name, kind in FIELDS.items() if kind == "long")
MODES = ("sdedit", "invert", "restore")
EDIT_STRENGTH = 0.6  # an SDEdit's strength when the request gives none
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask (``serve:`` sets them for the HTTP API; the defaults hold
    for pyfunc and the command line)."""

    max_images: int = 16
    max_steps: int = 100
    max_image_bytes: int = 4_000_000
    max_image_pixels: int = 4_194_304


class RequestError(LdmflowError, ValueError):
    """A request refused: ``status`` and the field to blame; ``str()`` is "field: reason"."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    @classmethod
    def of(cls, exc: ValueError, status: int = 422) -> RequestError:
        """From the sampler's "field: message" errors."""
        field, _, message = str(exc).partition(":")
        return cls(field, message.strip(), status)


def build(sampler, fields: Mapping[str, Any], limits: Limits = Limits()) -> Any:
    """The job ``fields`` ask of ``sampler`` (a :class:`~ldmflow.model.sampler.Sampler`), or
    :class:`RequestError`. A missing ``seed`` is drawn at random; an ``image`` alone is an
    SDEdit (``mode: sdedit``, at ``strength``, 0.6 unless given), a restoration (``mode:
    restore``: an SDEdit at the strength chosen for the image's noise,
    :func:`ldmflow.model.restoration.strength`) or an inversion (``mode: invert``, under
    ``source_label``/``source_prompt``); with a ``mask`` of its size, an inpainting."""
    given = {name: value for name, value in fields.items() if value is not None}
    for name in given:
        if name not in FIELDS:
            raise RequestError(name, "not a field of a request")
    n = given.get("n", 1)
    if n > limits.max_images:
        raise RequestError("n", f"at most {limits.max_images} images per request")
    if "seed" not in given:
        given["seed"] = secrets.randbelow(MAX_SEED - limits.max_images)
    mode = given.pop("mode", "sdedit")
    if mode not in MODES:
        raise RequestError("mode", f"must be {' or '.join(MODES)}, got {mode!r}")
    image, mask = given.pop("image", None), given.pop("mask", None)
    if image is None:
        if mask is not None:
            raise RequestError("mask", "inpainting needs an image")
        for name in ("strength", "source_label", "source_prompt", "infer_label"):
            if name in given:
                raise RequestError(name, "an edit's: give an image")
        if mode == "invert":
            raise RequestError("mode", "invert needs an image")
    else:
        side = sampler.info.resolution
        picture, size = decode_upload("image", image, side, limits)
        given["image"] = images.image_to_model(picture, side)
        if mask is not None:
            drawn, mask_size = decode_upload("mask", mask, side, limits, "nearest")
            if mask_size != size:
                raise RequestError("mask", f"{mask_size[0]}x{mask_size[1]} does not match the image's "
                                           f"{size[0]}x{size[1]}")
            given["mask"] = images.mask_input(drawn, side)
        if mode == "invert":
            given.update(invert=True, strength=1.0)
        elif mode == "restore" and ("strength" in given or mask is not None):
            raise RequestError("strength" if mask is None else "mask",
                               "mode restore chooses the strength for the image's noise, and takes no mask")
        elif mode == "restore" and "label" not in given and sampler.info.conditioning == "class":
            given.setdefault("infer_label", True)  # restore the digit that is there
        elif "source_label" in given or "source_prompt" in given:
            raise RequestError("source_label" if "source_label" in given else "source_prompt",
                               "the input's own condition is for mode invert")
        elif mask is None:
            given.setdefault("strength", EDIT_STRENGTH)
    job = sampler.job(**given)
    if job.steps > limits.max_steps:
        raise RequestError("steps", f"at most {limits.max_steps}")
    if mode == "restore" and image is not None:
        job = replace(job, strength=restoration.strength(sampler, job.image, job.steps, job.sampler, job.seed))
    try:
        sampler.check(job)
    except ValueError as exc:
        raise RequestError.of(exc) from exc
    return job


def decode_upload(field: str, data: str | bytes, side: int, limits: Limits = Limits(), resample: str = "bicubic"):
    """An upload (base64 text, a ``data:`` URL, or bytes) as (an RGB PIL image at the model's
    resolution, its original size). Decoding a large upload takes a while: a server runs it
    in a thread, off its event loop."""
    if isinstance(data, str):
        if data.startswith("data:"):  # a data URL: data:image/png;base64,....
            header, _, data = data.partition(",")
            if not header.endswith(";base64"):
                raise RequestError(field, "a data: URL must be base64 (data:image/png;base64,…)")
        if len(data) > limits.max_image_bytes * 4 // 3 + 4:
            raise RequestError(field, f"larger than {limits.max_image_bytes} bytes", 413)
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(field, f"not valid base64: {exc}") from exc
    if len(data) > limits.max_image_bytes:
        raise RequestError(field, f"larger than {limits.max_image_bytes} bytes", 413)
    try:
        decoded = images.preprocess(data, side, max_pixels=limits.max_image_pixels, resample=resample)
    except images.Rejected as exc:
        status = 413 if "decompression bomb" in str(exc) else 422
        raise RequestError(field, str(exc), status) from exc
    return decoded.image, (decoded.width, decoded.height)
