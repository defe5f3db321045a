"""The HTTP API's schemas: what each route accepts and returns, and the error a refused
request gets (``{"error": "FIELD: reason", "field": FIELD}`` with a 4xx status)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int | None = Field(None, description="Class index (class-conditioned models).")
    prompt: str | None = Field(None, max_length=1000, description="Text (text-conditioned models).")
    n: int = Field(1, ge=1, description="Number of images.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Image i uses seed + i; random when absent.")
    steps: int | None = Field(None, ge=1, description="Denoising steps (the model's default when absent).")
    sampler: Literal["ddpm", "ddim", "dpm++"] | None = None
    guidance: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance scale.")


class EditRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG to edit.")
    strength: float = Field(0.6, ge=0, le=1, description="Share of the schedule re-run: 0 returns the input.")


class InpaintRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG.")
    mask: str = Field(description="Base64 image of the same size: white where new content goes.")


class ModelRef(BaseModel):
    name: str | None
    version: str | None
    uri: str


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    seeds: list[int]
    model: ModelRef
    batch: int = Field(description="Requests sampled together with this one (itself included).")


class RequestError(Exception):
    """A request this server refuses: ``status`` and the field to blame."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    @classmethod
    def of(cls, exc: ValueError, status: int = 422) -> "RequestError":
        """From the sampler's "field: message" errors."""
        field, _, message = str(exc).partition(":")
        return cls(field, message.strip(), status)


def jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic's error records as JSON: tuples as lists, anything else odd as text."""

    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        return value if isinstance(value, (str, int, float, list, type(None))) else str(value)

    return [{k: plain(v) for k, v in error.items() if k != "ctx"} for error in errors]
