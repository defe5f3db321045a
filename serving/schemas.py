"""The HTTP API's schemas: what each route accepts and returns, and the error a refused
request gets (``{"error": "FIELD: reason", "field": FIELD}`` with a 4xx status). A body is
turned into a job by :func:`ldmflow.data.jobs.build`, as pyfunc rows and the command line are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VERSION_PATTERN = r"^([0-9]+|[A-Za-z][A-Za-z0-9_-]{0,63})$"  # a version number or an alias


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int | None = Field(None, description="Class index (class-conditioned models).")
    prompt: str | None = Field(None, max_length=1000, description="Text (text-conditioned models).")
    n: int = Field(1, ge=1, description="Number of images.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Image i uses seed + i; random when absent.")
    steps: int | None = Field(None, ge=1, description="Denoising steps (the model's default when absent).")
    sampler: Literal["ddpm", "ddim", "dpm++"] | None = None
    guidance: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance scale.")
    version: str | None = Field(
        None, pattern=VERSION_PATTERN,
        description="Another version of the served model, by number or alias (`candidate`, `production`): drawn "
                    "beside the one this server follows; that one when absent.")


class InterpolateRequest(GenerateRequest):
    n: int = Field(8, ge=1, description="Images along the path, the first at seed's noise, the last at to_seed's.")
    to_seed: int | None = Field(None, ge=0, le=2**31 - 1,
                                description="The seed at the path's end (the noise is slerped from seed's to it).")
    to_label: int | None = Field(None, description="The class at the path's end (embeddings mixed linearly).")
    to_prompt: str | None = Field(None, max_length=1000, description="The text at the path's end (embeddings slerped).")


class EditRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG to edit, or a data: URL of one.")
    mode: Literal["sdedit", "restore", "invert"] = Field(
        "sdedit", description="sdedit: noise the input to strength and denoise; restore: sdedit at the strength "
                              "chosen for the noise the input carries (a noisy photo); invert: DDIM-invert it to "
                              "its noise (under source_label/source_prompt) and draw from that noise.")
    strength: float | None = Field(None, ge=0, le=1, description="sdedit: share of the schedule re-run; 0 returns "
                                                                 "the input (0.6 when absent).")
    source_label: int | None = Field(None, description="invert: the input's own class, where known.")
    source_prompt: str | None = Field(None, max_length=1000, description="invert: the input's own text, where known.")
    infer_label: bool | None = Field(None, description="A class model without a label: condition on the label the "
                                                       "input fits best (the model as its own classifier); on by "
                                                       "default for restore.")


class InpaintRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG, or a data: URL of one.")
    mask: str = Field(description="Base64 image (or data: URL) of the same size: white where new content goes.")
    jump_length: int | None = Field(None, ge=1, description="Zero-shot resampling (RePaint): steps each jump goes "
                                                            "back (the sampler's default when absent).")
    jump_count: int | None = Field(None, ge=1, le=10, description="Zero-shot resampling: times each stretch of "
                                                                  "jump_length steps runs; 1: none.")
    infer_label: bool | None = Field(None, description="A class model without a label: inpaint under the three "
                                                       "labels the kept region fits best and return the completion "
                                                       "its label explains best (on by default; false: "
                                                       "unconditional).")


class ModelRef(BaseModel):
    name: str | None
    version: str | None
    uri: str


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    seeds: list[int]
    model: ModelRef
    batch: int = Field(description="Requests sampled together with this one (itself included).")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, description="The version to promote, by number or alias.")
    reason: str = Field("", max_length=2000, description="Why: recorded with the decision, with who decided.")
    force: bool = Field(False, description="Promote even if its evaluation is not better than production's.")


class RejectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, description="The version refused, by number or alias.")
    reason: str = Field("", max_length=2000, description="Why: recorded with the decision, with who decided.")


class DecisionResponse(BaseModel):
    name: str
    candidate: str = Field(description="The version decided on.")
    production: str | None = Field(description="The version that held production before.")
    promoted: bool
    reason: str = Field(description="What the gate found, or the reviewer's words.")
    metric: str
    candidate_score: float | None = None
    production_score: float | None = None
    by: str = Field(description="Who decided: the promotion key's holder.")


class VersionInfo(BaseModel):
    version: str
    aliases: list[str]
    run_id: str | None = Field(description="The MLflow run that trained it.")
    created: float = Field(description="When it was registered, in seconds since the epoch.")
    metrics: dict[str, float] = Field(description="Its evaluation scores (fd, kid, class_accuracy…), where evaluated.")
    tags: dict[str, str] = Field(description="Its ldmflow.* tags: lineage, evaluation, promotion decisions.")


class VersionsResponse(BaseModel):
    name: str | None = Field(description="The registered model served (none for a model folder).")
    versions: list[VersionInfo] = Field(description="Newest first.")


class ErrorBody(BaseModel):
    """What a refused request gets back."""

    error: str = Field(description="FIELD: what is wrong with it (several joined by '; ')")
    field: str = Field(description="the field to blame (the first, if several): a body field, `body` or `authorization`")
