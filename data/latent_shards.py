"""The latent-shard format, defined once: writer, manifest, lineage guard and reader.

Same layout as image shards (``data/image_shards.py``), one tar per image shard, same keys:

=============  ===========================================================
``KEY.mean.npy``    latent posterior mean, fp16, (C, h, w)
``KEY.logvar.npy``  its log-variance, fp16 (absent with ``moments: mean``)
``KEY.text.npy``    the caption's embedding by the text encoder the manifest names,
                    float32 (D,) (absent without a caption or ``caption_embeddings``)
``KEY.txt``, ``KEY.cls``, ``KEY.json``  carried over from the image shard
=============  ===========================================================

Arrays are ``.npy`` read with ``allow_pickle=False``. The manifest names the image
dataset (and its manifest's sha256) and the autoencoder (URI, registry version, weights
sha256, scale factor), so :func:`check_lineage` can refuse to pair a latent set with any
other autoencoder.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ldmflow.data import image_shards
from ldmflow.errors import LdmflowError

FORMAT_NAME = "ldmflow.latent-shards"
FORMAT_VERSION = 1
KEY_MEAN = "mean.npy"
KEY_LOGVAR = "logvar.npy"
KEY_TEXT = "text.npy"


class LineageError(LdmflowError, ValueError):
    """Latents paired with an autoencoder other than the one that made them."""


def encode_array(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class AutoencoderRef:
    """Which autoencoder made a latent set."""

    uri: str
    weights_sha256: str
    scale_factor: float
    name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class LatentShardInfo:
    url: str  # relative to the manifest
    num_samples: int
    bytes: int
    sha256: str
    source_shard: str  # the image shard it was encoded from
    source_sha256: str


@dataclass(frozen=True)
class LatentManifest:
    image_dataset: str
    image_manifest_sha256: str
    autoencoder: AutoencoderRef
    latent_shape: tuple[int, ...]  # (C, h, w)
    moments: str  # "mean_logvar" or "mean"
    num_samples: int
    shards: tuple[LatentShardInfo, ...]
    failed_shards: tuple[dict[str, str], ...]  # {"source_shard", "error"}: never silently dropped
    class_names: tuple[str, ...] | None
    config: dict[str, Any] = field(default_factory=dict)
    text_encoder: str | None = None  # the encoder of the stored caption embeddings, if any
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        body = asdict(self)
        body["latent_shape"] = list(self.latent_shape)
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "latent manifest") -> LatentManifest:
        body = image_shards.parse_manifest(text, where, FORMAT_NAME, FORMAT_VERSION)
        try:
            return cls(
                image_dataset=body["image_dataset"],
                image_manifest_sha256=body["image_manifest_sha256"],
                autoencoder=AutoencoderRef(**body["autoencoder"]),
                latent_shape=tuple(body["latent_shape"]),
                moments=body["moments"],
                num_samples=body["num_samples"],
                shards=tuple(LatentShardInfo(**s) for s in body["shards"]),
                failed_shards=tuple(body["failed_shards"]),
                class_names=tuple(body["class_names"]) if body["class_names"] is not None else None,
                config=body["config"],
                text_encoder=body.get("text_encoder"),
            )
        except (KeyError, TypeError) as exc:
            raise image_shards.ManifestError(f"{where}: missing or malformed field: {exc}") from exc

    def summary(self) -> str:
        failed = f", {len(self.failed_shards)} shards FAILED" if self.failed_shards else ""
        return (
            f"{self.num_samples} latents {tuple(self.latent_shape)} in {len(self.shards)} shards"
            f" from autoencoder {self.autoencoder.uri} (scale factor {self.autoencoder.scale_factor:.4f}){failed}"
        )


def read_manifest(dataset: str) -> LatentManifest:
    url, text = image_shards.read_manifest_text(dataset, "precompute")
    return LatentManifest.from_json(text, where=url)


def shard_urls(dataset: str, manifest: LatentManifest) -> list[str]:
    return image_shards.shard_urls(dataset, manifest)


def check_lineage(manifest: LatentManifest, weights_sha256: str, expected_uri: str | None = None) -> None:
    """Refuse latents made by another autoencoder than the one identified by ``weights_sha256``."""
    if manifest.autoencoder.weights_sha256 != weights_sha256:
        wanted = f" ({expected_uri})" if expected_uri else ""
        raise LineageError(
            f"these latents were made by autoencoder {manifest.autoencoder.uri} "
            f"(weights {manifest.autoencoder.weights_sha256[:12]}…), not by the configured one{wanted} "
            f"(weights {weights_sha256[:12]}…): rerun precompute with that autoencoder"
        )


def latent_sample(mean: np.ndarray, logvar: np.ndarray | None) -> dict[str, bytes]:
    members = {KEY_MEAN: encode_array(mean.astype(np.float16))}
    if logvar is not None:
        members[KEY_LOGVAR] = encode_array(logvar.astype(np.float16))
    return members


@dataclass
class LatentSample:
    key: str
    mean: np.ndarray  # (C, h, w) float32
    logvar: np.ndarray | None
    label: int
    caption: str
    meta: dict[str, Any]
    text: np.ndarray | None = None  # the stored caption embedding


def decode_latent(raw: dict[str, Any]) -> LatentSample:
    """A raw member dict of a latent shard; ``ValueError`` for a corrupt or incomplete one."""
    if KEY_MEAN not in raw:
        raise ValueError(f"latent sample {raw.get('__key__')!r} in {raw.get('__url__')} has no {KEY_MEAN}")
    try:
        mean = decode_array(raw[KEY_MEAN]).astype(np.float32)
        logvar = decode_array(raw[KEY_LOGVAR]).astype(np.float32) if KEY_LOGVAR in raw else None
        text = decode_array(raw[KEY_TEXT]).astype(np.float32) if KEY_TEXT in raw else None
    except Exception as exc:
        raise ValueError(f"latent sample {raw['__key__']!r} in {raw.get('__url__')}: corrupt array: {exc}") from exc
    label = int(raw[image_shards.KEY_LABEL].decode("ascii")) if image_shards.KEY_LABEL in raw else -1
    caption = raw[image_shards.KEY_CAPTION].decode("utf-8") if image_shards.KEY_CAPTION in raw else ""
    meta = json.loads(raw[image_shards.KEY_META]) if image_shards.KEY_META in raw else {}
    return LatentSample(raw["__key__"], mean, logvar, label, caption, meta, text)
